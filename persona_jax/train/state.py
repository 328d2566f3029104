"""TrainState: the arrays a run carries from step to step (and checkpoints). Functions (the
optimizer, the models) are not stored in it; the frozen base is not part of it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 scalar: optimizer micro-steps taken
  trainable: Any                # the trainable params (only these get gradients and moments)
  opt_state: Any
  rng: jax.Array                # uint32[2] raw key; step k uses fold_in(rng, k)
  ema: Any = None               # EMA of `trainable`, when enabled


def init_state(trainable, tx, seed: int, ema: bool = False) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed),
                    ema=jax.tree.map(jnp.copy, trainable) if ema else None)
