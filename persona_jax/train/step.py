"""The train step: one pure function for every method. jit, shardings and donation are applied
where the loop is built (train/loop.py), not here."""

from __future__ import annotations

import jax
import optax

from persona_jax.diffusion.losses import Objective
from persona_jax.models.components import SDModels
from persona_jax.methods.base import Method, method_loss
from persona_jax.train.divergence import leaf_max
from persona_jax.train.optim import ema_update
from persona_jax.train.state import TrainState


def train_step(state: TrainState, frozen, batch, *, method: Method, models: SDModels,
               objective: Objective, tx: optax.GradientTransformation, ema_decay: float = 0.0):
  """One optimizer micro-step. Only `state.trainable` is differentiated; `frozen` is an argument,
  not part of the state, so it is never donated, updated or checkpointed.

  Returns:
    (new state, metrics: scalars, and `leaf_max` [n_leaves] for the divergence guard).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(trainable):
    params = method.params.apply(frozen, trainable)
    return method_loss(method, models, objective, params, trainable, batch, rng)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  ema = state.ema if state.ema is None else ema_update(state.ema, trainable, ema_decay)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 update_norm=optax.tree.norm(updates), leaf_max=leaf_max(trainable))
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema), metrics
