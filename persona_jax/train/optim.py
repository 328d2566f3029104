"""The optimizer of a run: AdamW, Prodigy or schedule-free AdamW (optax.contrib) per param group,
learning-rate schedule with warmup, global-norm clipping, gradient accumulation, EMA. Built only
over the trainable tree; `evaluation_params` is what a run samples and saves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from persona_jax import tree
from persona_jax.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "prodigy", "schedule_free_adamw")


@dataclasses.dataclass(frozen=True)
class ProdigyConfig:
  """Prodigy's own options (optax.contrib.prodigy; Mishchenko & Defazio 2023). It estimates the
  step size D itself; optim.lr multiplies it (1.0, as its authors recommend)."""
  d0: float = 1e-6                  # initial (under-)estimate of D
  d_coef: float = 1.0               # multiplies every estimate of D (0.5: smaller steps, 2: larger)
  beta3: float = 0.0                # decay of D's running sums; 0: sqrt(b2)
  safeguard_warmup: bool = False    # D's sums without the lr (set it with warmup_steps)
  use_bias_correction: bool = True  # Adam's bias correction in the step (optax's and the paper's
                                    # Adam variant; prodigyopt's default is False)


@dataclasses.dataclass(frozen=True)
class ScheduleFreeConfig:
  """Schedule-free AdamW's own option (optax.contrib.schedule_free; Defazio et al. 2024)."""
  weight_lr_power: float = 2.0      # the average of the iterates weighs step t by lr_t ** this


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  # adamw | prodigy (lr: the multiplier of its own step size, 1.0) | schedule_free_adamw (no
  # decay after warmup; samples and results use its averaged params)
  optimizer: str = "adamw"
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
  prodigy: ProdigyConfig = ProdigyConfig()
  schedule_free: ScheduleFreeConfig = ScheduleFreeConfig()


def check(config: OptimConfig) -> None:
  """ConfigError (one line) for an optimizer that is not one, another optimizer's options, or a
  combination the optimizer does not support."""
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ConfigError(f"optim.optimizer: '{name}' is not one of {', '.join(OPTIMIZERS)}")
  for own, options in (("prodigy", config.prodigy), ("schedule_free_adamw", config.schedule_free)):
    changed = [f.name for f in dataclasses.fields(options)
               if getattr(options, f.name) != f.default]
    if name != own and changed:
      key = "prodigy" if own == "prodigy" else "schedule_free"
      raise ConfigError(f"optim.{key}.{changed[0]}: an option of optim.optimizer={own}, but the "
                        f"optimizer is {name}; leave it at its default or set optim.optimizer={own}")
  if name == "prodigy":
    if config.scale_lr:
      raise ConfigError("optim.scale_lr with optim.optimizer=prodigy: Prodigy estimates its step "
                        "size itself; set optim.scale_lr=False")
    small = [("optim.lr", config.lr)] + [(f"optim.lr_groups {g[0]!r}", g[1]) for g in config.lr_groups
                                         if len(g) >= 2]
    for key, value in small:
      if 0 < value < 0.1:
        raise ConfigError(f"{key}={value:g} with optim.optimizer=prodigy: Prodigy's learning rates "
                          "multiply the step size it estimates (its documented value is 1.0); "
                          "set optim.lr=1.0 (group lrs as fractions of it), or tune "
                          "optim.prodigy.d_coef")
  if name == "schedule_free_adamw":
    if config.schedule != "constant":
      raise ConfigError(f"optim.schedule={config.schedule} with optim.optimizer=schedule_free_adamw: "
                        "schedule-free replaces the decay; set optim.schedule=constant (warmup_steps "
                        "still applies)")
    if config.ema_decay:
      raise ConfigError("optim.ema_decay with optim.optimizer=schedule_free_adamw: its evaluation "
                        "params are already an average of the iterates; set optim.ema_decay=0")
    if not 0 < config.b1 < 1:
      raise ConfigError(f"optim.b1={config.b1:g} with optim.optimizer=schedule_free_adamw: its "
                        "interpolation needs 0 < b1 < 1 (0.9 is the documented value)")


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
  """(tx, schedule): the optimizer (`config.optimizer`) over `trainable` with per-group learning
  rates, clipping, accumulation.

  A group's lr follows `lr`'s schedule scaled to its own peak (warmup, decay and `scale_lr` apply
  to every group alike). Prodigy: each group estimates its own step size D. Schedule-free: one
  average over all groups (its weights depend on the lr only up to a group's constant factor)."""
  check(config)
  schedule, _ = learning_rate(config, total_steps, batch_size, class_rows)

  def group_optimizer(multiplier, stop=None):
    def lr(step):
      value = schedule(step) * multiplier
      return value if stop is None else jnp.where(step < stop, value, 0.0)
    if config.optimizer == "prodigy":
      return _prodigy(config, lr)
    if config.optimizer == "schedule_free_adamw":   # AdamW without momentum, under schedule_free
      return optax.chain(
          optax.scale_by_rms(decay=config.b2, eps=config.eps, eps_in_sqrt=False,
                             bias_correction=True),
          optax.add_decayed_weights(config.weight_decay), optax.scale_by_learning_rate(lr))
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
    txs = ({f"group{i}": group_optimizer(m, s) for i, (_, m, s) in enumerate(groups)}
           | {"default": group_optimizer(1.0)})
    tx = optax.multi_transform(txs, labels)
  else:
    tx = group_optimizer(1.0)
  if config.optimizer == "schedule_free_adamw":
    tx = optax.contrib.schedule_free(tx, learning_rate=schedule, b1=config.b1,
                                     weight_lr_power=config.schedule_free.weight_lr_power)
  if config.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  if config.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum)
  return tx, schedule


def _prodigy(config: OptimConfig, lr):
  """optax.contrib.prodigy with the run's betas, eps and weight decay. Its step always carries
  Adam's bias correction sqrt(1 - b2^t) / (1 - b1^t) (t = count + 1) times the lr; without
  `use_bias_correction` the lr is divided by it, which cancels it exactly."""
  p = config.prodigy
  b1, b2 = config.b1, config.b2

  def without_bias_correction(count):
    t = jnp.asarray(count, jnp.float32) + 1.0
    return lr(count) * (1.0 - b1 ** t) / jnp.sqrt(1.0 - b2 ** t)
  prodigy = optax.contrib.prodigy(lr if p.use_bias_correction else without_bias_correction,
                                  betas=(b1, b2), beta3=p.beta3 or None, eps=config.eps,
                                  estim_lr0=p.d0, estim_lr_coef=p.d_coef,
                                  weight_decay=config.weight_decay,
                                  safeguard_warmup=p.safeguard_warmup)
  return optax.GradientTransformationExtraArgs(prodigy.init, _skip_empty_steps(prodigy.update))


def _skip_empty_steps(update):
  """Prodigy's update, a step whose running gradient sum is all zero (an lr-0 warmup step, a zero
  gradient) skipped: no update, only its count advances (the lr schedule's clock). optax divides
  by that sum and would turn D into NaN; prodigyopt skips such a step likewise."""
  def skipping(grads, state, params=None, **extra_args):
    del extra_args
    updates, new = update(grads, state, params)
    empty = optax.tree.sum(jax.tree.map(jnp.abs, new.grad_sum)) == 0
    kept = jax.tree.map(lambda n, o: jnp.where(empty, o, n), new, state._replace(count=new.count))
    return jax.tree.map(lambda u: jnp.where(empty, jnp.zeros_like(u), u), updates), kept
  return skipping


def _states(opt_state, kind) -> list[tuple[str | None, object]]:
  """(lr group label or None, state) of every `kind` state (ProdigyState, ScheduleFreeState)
  inside an optimizer state (chains, groups, accumulation), in the tree's order."""
  found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, kind))[0]
  labels = lambda path: [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # noqa: E731
  return [((labels(path) or [None])[-1], x) for path, x in found if isinstance(x, kind)]


def evaluation_params(state):
  """The params a run samples and saves, from its TrainState: the EMA when it is on; with
  schedule-free AdamW its averaged sequence x (`optax.contrib.schedule_free_eval_params`), not
  the y sequence the gradients are taken at; else the trained params."""
  if state.ema is not None:
    return state.ema
  schedule_free = _states(state.opt_state, optax.contrib.ScheduleFreeState)
  if schedule_free:
    return optax.contrib.schedule_free_eval_params(schedule_free[0][1], state.trainable)
  return state.trainable


def optimizer_metrics(opt_state) -> dict:
  """Scalars of the optimizer's own state worth logging: Prodigy's step-size estimate D
  (`prodigy_d`; one per lr group, `prodigy_d/LABEL`, when there are groups). Host floats."""
  found = _states(opt_state, optax.contrib.ProdigyState)
  if len(found) == 1:
    return {"prodigy_d": float(found[0][1].estim_lr)}
  return {f"prodigy_d/{label}": float(x.estim_lr) for label, x in found}


def ema_update(ema, trainable, decay: float):
  """ema <- decay * ema + (1 - decay) * trainable."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, trainable)


def optimizer_step(step, grad_accum: int):
  """The optimizer step a micro-step belongs to (what the lr schedule sees)."""
  return jnp.asarray(step) // max(1, grad_accum)
