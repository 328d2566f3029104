"""The divergence guard: a run stops when its training has visibly gone wrong, before it writes a
result or a checkpoint of the broken state.

A run diverges at the first step where
  * the loss, the gradient norm or any trainable leaf is not finite;
  * a trainable leaf's largest magnitude exceeds `MAGNITUDE_FACTOR` (1e4) times
    max(1, its largest magnitude at step 0) (a Textual Inversion row at lr 1000 grows to 1e35
    with a finite loss long before the loss turns NaN);
  * the gradient norm is exactly 0 for `ZERO_GRAD_STEPS` (10) consecutive steps at a non-zero
    learning rate (an overflow upstream, or nothing reaching the loss); the divergence began at
    the first of them.
The step reports `leaf_max` [n_leaves] (the largest magnitude of every trainable leaf, in
`jax.tree.leaves` order) beside `loss` and `grad_norm`; the loop checks each logging window
before it saves a checkpoint, so a checkpoint is only written from a state checked good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError

MAGNITUDE_FACTOR = 1e4
ZERO_GRAD_STEPS = 10


class DivergenceError(PersonaError):
  """Training diverged (non-finite values, exploding leaves or vanished gradients)."""


def leaf_max(trainable) -> jax.Array:
  """[n_leaves] float32: max |x| of every leaf (NaN if the leaf holds one)."""
  return jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(trainable)])


@dataclasses.dataclass(frozen=True)
class Divergence:
  step: int                          # the step the run diverged at (its first bad step)
  message: str                       # what went wrong, naming the step and the leaf


class Guard:
  """Checks the metrics of consecutive steps (`check`), keeping the zero-gradient streak."""

  def __init__(self, initial_trainable, lr_at: Callable[[int], float]):
    """`initial_trainable`: the step-0 trainable tree; `lr_at(step)`: the learning rate of a
    (1-based) step."""
    flat, _ = jax.tree_util.tree_flatten_with_path(initial_trainable)
    self.paths = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                  for path, _ in flat]
    # One compiled program: eager ops on arrays sharded across processes would each be a
    # collective, and gloo can deadlock on a stream of them.
    initial = np.asarray(jax.device_get(jax.jit(leaf_max)(initial_trainable)), np.float64)
    self.initial = initial
    self.limits = MAGNITUDE_FACTOR * np.maximum(1.0, initial)
    self.lr_at = lr_at
    self.zero_from: int | None = None  # first step of the current zero-gradient streak

  def check(self, metrics: Sequence[dict], first_step: int) -> Divergence | None:
    """`metrics`: the step metrics of steps first_step, first_step + 1, ... (each with loss,
    grad_norm, leaf_max). Returns the first divergence, or None."""
    got = jax.device_get([{k: m[k] for k in ("loss", "grad_norm", "leaf_max")} for m in metrics])
    for i, m in enumerate(got):
      step = first_step + i
      sizes = np.asarray(m["leaf_max"], np.float64)
      bad = np.flatnonzero(~np.isfinite(sizes))
      if bad.size:
        return Divergence(step, f"trainable leaf '{self.paths[bad[0]]}' became {sizes[bad[0]]} "
                                f"at step {step}")
      for name in ("loss", "grad_norm"):
        if not np.isfinite(m[name]):
          return Divergence(step, f"the {name.replace('_', ' ')} became {float(m[name])} at "
                                  f"step {step}")
      over = np.flatnonzero(sizes > self.limits)
      if over.size:
        k = over[np.argmax(sizes[over] / self.limits[over])]
        return Divergence(step, f"trainable leaf '{self.paths[k]}' reached |x| = {sizes[k]:.3g} at "
                                f"step {step}, over {MAGNITUDE_FACTOR:.0e} x max(1, its step-0 "
                                f"{self.initial[k]:.3g})")
      if float(m["grad_norm"]) == 0.0 and self.lr_at(step) != 0.0:
        self.zero_from = step if self.zero_from is None else self.zero_from
        if step - self.zero_from + 1 >= ZERO_GRAD_STEPS:
          return Divergence(self.zero_from, f"the gradient norm was exactly 0 for "
                                            f"{ZERO_GRAD_STEPS} steps ({self.zero_from}-{step}) at a "
                                            "non-zero learning rate")
      else:
        self.zero_from = None
    return None
