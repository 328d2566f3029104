"""The optimizer of a run: AdamW per param group, learning-rate schedule with warmup, global-norm
clipping, gradient accumulation. Built only over the trainable tree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from persona_jax import tree
from persona_jax.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  scale_lr: bool = False         # multiply every lr by the global batch size x gradient accumulation
  scale_lr_class_rows: bool = False   # with scale_lr, class rows count in the batch (Custom Diffusion)
  schedule: str = "constant"     # after warmup: constant | linear | cosine (decay to 0)
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-2
  clip_grad_norm: float = 1.0    # 0: off
  grad_accum: int = 1
  # ((regex over trainable paths, learning rate[, stop]), ...): leaves with their own peak lr, on
  # lr's schedule (first match wins); the rest: lr. `stop` in (0, 1]: the group's lr is 0 from
  # that fraction of the steps on (pivotal tuning's token rows stop half-way).
  lr_groups: tuple = ()
  ema_decay: float = 0.0         # 0: no EMA of the trainable params


def learning_rate(config: OptimConfig, total_steps: int, batch_size: int,
                  class_rows: bool = False):
  """The schedule (optimizer step -> lr) and the peak lr after `scale_lr` (`batch_size` is the
  global batch of one micro-step, over all devices; with `class_rows`, the batch also holds as
  many class examples, which count when `scale_lr_class_rows`)."""
  if config.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule: '{config.schedule}' is not one of {', '.join(SCHEDULES)}")
  rows = batch_size * (2 if class_rows and config.scale_lr_class_rows else 1)
  peak = config.lr * (rows * config.grad_accum if config.scale_lr else 1)
  warmup = max(0, config.warmup_steps)
  decay_steps = max(1, total_steps - warmup)
  if config.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif config.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup]), peak
  return after, peak


def make_optimizer(config: OptimConfig, trainable, *, total_steps: int, batch_size: int,
                   class_rows: bool = False):
  """(tx, schedule): AdamW over `trainable` with per-group learning rates, clipping, accumulation.

  A group's lr follows `lr`'s schedule scaled to its own peak (warmup, decay and `scale_lr` apply
  to every group alike)."""
  schedule, _ = learning_rate(config, total_steps, batch_size, class_rows)

  def adamw(multiplier, stop=None):
    def lr(step):
      value = schedule(step) * multiplier
      return value if stop is None else jnp.where(step < stop, value, 0.0)
    return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay)
  if config.lr_groups and config.lr <= 0:
    raise ConfigError("optim.lr_groups: group learning rates follow optim.lr's schedule; "
                      "optim.lr must be > 0")
  groups = []
  for entry in config.lr_groups:
    if len(entry) not in (2, 3):
      raise ConfigError(f"optim.lr_groups: {entry!r} is not (regex, lr) or (regex, lr, stop)")
    stop = None
    if len(entry) == 3:
      if not 0 < entry[2] <= 1:
        raise ConfigError(f"optim.lr_groups: {entry!r}: stop is a fraction of the steps in (0, 1]")
      stop = int(round(entry[2] * total_steps))
    groups.append((entry[0], float(entry[1] / config.lr), stop))
  if groups:
    labels = tree.label(trainable, [(p, f"group{i}") for i, (p, _, _) in enumerate(groups)], "default")
    txs = {f"group{i}": adamw(m, s) for i, (_, m, s) in enumerate(groups)} | {"default": adamw(1.0)}
    tx = optax.multi_transform(txs, labels)
  else:
    tx = adamw(1.0)
  if config.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  if config.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum)
  return tx, schedule


def ema_update(ema, trainable, decay: float):
  """ema <- decay * ema + (1 - decay) * trainable."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, trainable)


def optimizer_step(step, grad_accum: int):
  """The optimizer step a micro-step belongs to (what the lr schedule sees)."""
  return jnp.asarray(step) // max(1, grad_accum)
