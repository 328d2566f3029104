"""Optimizer construction: groups, schedules, clipping, accumulation, EMA; loss weightings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.errors import ConfigError
from persona_jax.diffusion.losses import Objective, min_snr_weights
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.train.optim import OptimConfig, ema_update, learning_rate, make_optimizer

PARAMS = {"unet": {"a": {"kernel": jnp.ones((2, 3))}}, "text_encoder": {"b": {"bias": jnp.ones(3)}},
          "tokens": jnp.ones((1, 3))}


def test_tree_rules():
  assert tree.paths(PARAMS) == ["text_encoder/b/bias", "tokens", "unet/a/kernel"]
  chosen, rest = tree.split(PARAMS, [(r"unet/.*", True)])
  assert tree.paths(chosen) == ["unet/a/kernel"] and "unet" not in rest
  assert tree.paths(tree.merge(chosen, rest)) == tree.paths(PARAMS)
  with pytest.raises(ValueError, match="in two trees"):
    tree.merge(chosen, chosen)
  assert tree.label(PARAMS, [(r"text_encoder/.*", "text"), (r"tokens", "embed")], "unet") == {
      "unet": {"a": {"kernel": "unet"}}, "text_encoder": {"b": {"bias": "text"}}, "tokens": "embed"}


def test_schedule_warmup_and_scale_lr():
  sched, peak = learning_rate(OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine"), 110, 4)
  assert peak == 1e-3
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(5)), 5e-4) and np.isclose(float(sched(10)), 1e-3)
  assert float(sched(110)) < 1e-9
  _, scaled = learning_rate(OptimConfig(lr=1e-3, scale_lr=True, grad_accum=2), 10, 8)
  assert scaled == 1e-3 * 8 * 2
  # Class rows count in the scaled batch only with scale_lr_class_rows (Custom Diffusion's recipe).
  rows = OptimConfig(lr=1e-3, scale_lr=True, scale_lr_class_rows=True)
  assert learning_rate(rows, 10, 8, class_rows=True)[1] == 1e-3 * 16
  assert learning_rate(rows, 10, 8)[1] == learning_rate(OptimConfig(lr=1e-3, scale_lr=True), 10, 8,
                                                        class_rows=True)[1] == 1e-3 * 8


def test_groups_get_their_own_learning_rate():
  """optim.lr_groups are learning rates (the one unit of every lr in a config): Adam's first
  update of a leaf is about its lr in size."""
  config = OptimConfig(lr=1.0, lr_groups=((r"text_encoder/.*", 0.0), (r"unet/a/.*", 0.25)),
                       weight_decay=0.0, clip_grad_norm=0.0)
  tx, _ = make_optimizer(config, PARAMS, total_steps=10, batch_size=1)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert float(jnp.abs(updates["text_encoder"]["b"]["bias"]).max()) == 0.0
  np.testing.assert_allclose(np.abs(updates["unet"]["a"]["kernel"]), 0.25, rtol=1e-5)
  with pytest.raises(ConfigError, match="optim.lr must be > 0"):
    make_optimizer(dataclasses.replace(config, lr=0.0), PARAMS, total_steps=10, batch_size=1)


def test_a_group_can_stop_after_a_fraction_of_the_steps():
  """(regex, lr, stop): pivotal tuning's token rows train for the first half of the steps, then
  get no update (weight decay included); the other leaves go on."""
  config = OptimConfig(lr=0.1, lr_groups=((r"tokens", 0.5, 0.5),), weight_decay=0.01, clip_grad_norm=0.0)
  tx, _ = make_optimizer(config, PARAMS, total_steps=4, batch_size=1)
  state, params = tx.init(PARAMS), PARAMS
  moved = []
  for _ in range(4):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    moved.append((float(jnp.abs(updates["tokens"]).max()), float(jnp.abs(updates["unet"]["a"]["kernel"]).max())))
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  assert [t > 0 for t, _ in moved] == [True, True, False, False] and all(u > 0 for _, u in moved)
  with pytest.raises(ConfigError, match=r"stop is a fraction of the steps in \(0, 1\]"):
    make_optimizer(dataclasses.replace(config, lr_groups=(("tokens", 0.5, 1.5),)), PARAMS,
                   total_steps=4, batch_size=1)


def test_gradient_accumulation_applies_every_k_steps():
  config = OptimConfig(lr=0.1, grad_accum=2, weight_decay=0.0, clip_grad_norm=0.0)
  tx, _ = make_optimizer(config, PARAMS, total_steps=10, batch_size=1)
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  u1, state = tx.update(grads, state, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u1))
  u2, state = tx.update(grads, state, PARAMS)
  assert all(float(jnp.abs(u).min()) > 0 for u in jax.tree.leaves(u2))


def test_clipping():
  config = OptimConfig(lr=1.0, clip_grad_norm=1e-3, weight_decay=0.0)
  tx, _ = make_optimizer(config, PARAMS, total_steps=10, batch_size=1)
  big = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), PARAMS)
  updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_ema():
  ema = ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.9)
  np.testing.assert_allclose(ema["w"], [0.1, 0.1])


def test_min_snr_weights_are_finite_at_the_extremes():
  snr = jnp.array([0.0, 1e-8, 1.0, 5.0, 100.0, jnp.inf])
  eps = min_snr_weights(snr, 5.0, "epsilon")
  v = min_snr_weights(snr, 5.0, "v_prediction")
  assert np.isfinite(eps).all() and np.isfinite(v).all()
  np.testing.assert_allclose(eps, [1, 1, 1, 1, 0.05, 0])
  np.testing.assert_allclose(v, [0, 1e-8, 0.5, 5 / 6, 5 / 101, 0], rtol=1e-6)


def test_objective_per_example_losses_masks_and_offset_noise():
  sched = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction")
  latents = jnp.ones((2, 4, 4, 3))
  predict = lambda noisy, t: (noisy * 0.5, None)
  rng = jax.random.PRNGKey(0)
  loss = lambda objective, mask=None: objective.per_example_loss(latents, predict, rng, mask)[0]
  per_example = loss(Objective(sched, 0.18))
  assert per_example.shape == (2,)
  plain = per_example.mean()
  half_mask = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1)
  masked = loss(Objective(sched, 0.18), half_mask).mean()
  snr_loss = loss(Objective(sched, 0.18, min_snr_gamma=5.0)).mean()
  offset = loss(Objective(sched, 0.18, offset_noise=0.1)).mean()
  for x in (masked, snr_loss, offset):
    assert np.isfinite(float(x))
  assert float(offset) != float(plain) and float(masked) != float(plain)
  # Non-binary masks weight positions (data.mask_loss_weight): the weighted mean of the halves.
  other = loss(Objective(sched, 0.18), 1 - half_mask)
  top = loss(Objective(sched, 0.18), half_mask)
  weighted = loss(Objective(sched, 0.18), 1 + 4 * half_mask)
  np.testing.assert_allclose(weighted, (5 * top + other) / 6, rtol=1e-6)
