"""DreamBooth on the training core: the method test bar for UNet-only and UNet + text encoder,
and the prior-preservation loss against a direct two-forward computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import ConfigError, tree
from persona_jax.data.pipeline import make_iterator
from persona_jax.diffusion.schedules import add_noise, alphas_cumprod, training_target
from persona_jax.data.batch import PRIOR
from persona_jax.methods.base import batch_latents, method_loss
from persona_jax.train import loop
from persona_jax.train.state import init_state
from persona_jax.train.step import train_step
from tests.runs import db_config, one_device_mesh, write_class_images
from tests.markers import slow

VARIANTS = {
    # UNet only: VAE moments and text contexts are cached, nothing else is needed in the step.
    "unet": {},
    # UNet + text encoder (own lr), random crops: the step runs the text encoder and the VAE.
    "unet+text": dict(method=dict(name="dreambooth", train_text_encoder=True),
                      optim=dict(lr_groups=(("text_encoder/.*", 1e-6),)),
                      data=dict(center_crop=False)),
}


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
  return write_class_images(tmp_path_factory.mktemp("class"), n=2)


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, model_dirs, class_dir):
  return loop.build(db_config(model_dirs["sd1"], class_dir, **VARIANTS[request.param]),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def batch(run):
  return jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))


@pytest.fixture(scope="module")
def step(run):
  return jax.jit(functools.partial(train_step, method=run.method, models=run.models,
                                   objective=run.objective, tx=run.tx))


@pytest.fixture(scope="module")
def trajectory(run, batch, step):
  """Steps on one batch. The test config warms up for one step, so step 0 has lr 0 exactly.
  Re-running a state with its step counter at 0 evaluates the loss with step 0's rng (the same
  noise, timesteps and latents), so losses of different params are comparable."""
  frozen_before = jax.tree.map(np.array, run.frozen)
  state0 = init_state(run.trainable, run.tx, seed=0)
  state1, m0 = step(state0, run.frozen, batch)                           # lr 0
  after_lr0 = jax.device_get(state1.trainable)
  state2, _ = step(state1, run.frozen, batch)                            # first lr > 0 step
  after_first = jax.device_get(state2.trainable)
  state = state2
  for _ in range(6):
    state, metrics = step(state, run.frozen, batch)
  _, m_end = step(state.replace(step=jnp.zeros((), jnp.int32)), run.frozen, batch)
  return dict(frozen_before=frozen_before, loss0=float(m0["loss"]), after_lr0=after_lr0,
              after_first=after_first, loss_end=float(m_end["loss"]), metrics=metrics,
              opt_state=state.opt_state)


def trains_text(run):
  return run.config.method.get("train_text_encoder", False)


def test_trainable_set_is_literal(run):
  expected = {"unet/" + p for p in tree.paths(run.pipe.params["unet"])}
  if trains_text(run):
    expected |= {"text_encoder/" + p for p in tree.paths(run.pipe.params["text_encoder"])}
    assert set(run.frozen) == {"vae"}
  else:
    assert run.frozen == {}                      # VAE moments and text contexts are cached
  assert set(tree.paths(run.trainable)) == expected
  assert len(expected) == (len(tree.flatten(run.pipe.params["unet"]))
                           + trains_text(run) * len(tree.flatten(run.pipe.params["text_encoder"])))


def test_batch_holds_instance_then_class_rows(run, batch):
  np.testing.assert_array_equal(batch[PRIOR], [0.0, 1.0])
  if not trains_text(run):
    # The cached contexts are the base text encoder's output of each caption.
    ids = run.tokenize(["a photo of sks toy", "a photo of toy"])
    base = run.models.text_encoder.apply({"params": run.pipe.params["text_encoder"]}, ids)
    np.testing.assert_allclose(batch["context"], base.last_hidden_state, rtol=1e-6, atol=1e-6)


def test_step_zero_reproduces_the_base(run):
  params = run.full_params(run.trainable)
  for name in ("unet", "text_encoder", "vae"):
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(run.pipe.params[name])):
      assert np.array_equal(np.asarray(a), np.asarray(b))


def test_learning_rate_zero_moves_nothing(run, trajectory):
  for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_every_trainable_leaf_gets_a_gradient(run, trajectory):
  # Weight decay is 0 in the test config, so Adam moves a leaf iff its gradient is non-zero.
  still = [p for p, a in tree.flatten(trajectory["after_first"]).items()
           if np.array_equal(a, np.asarray(tree.flatten(run.trainable)[p]))]
  assert not still, f"{len(still)} trainable leaves get no gradient, e.g. {still[:3]}"


def test_loss_falls_and_frozen_stay_bit_identical(run, trajectory):
  assert trajectory["loss_end"] < trajectory["loss0"]
  assert {"instance_loss", "prior_loss"} <= set(trajectory["metrics"])
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))
  # Adam moments exist for the trainable leaves only.
  n_moments = sum(1 for x in jax.tree.leaves(trajectory["opt_state"]) if x.ndim)
  assert n_moments == 2 * len(tree.flatten(run.trainable))


def test_text_encoder_has_its_own_learning_rate(run, trajectory):
  if not trains_text(run):
    assert run.config.optim.lr_groups == ()
    return
  assert run.config.optim.lr_groups == (("text_encoder/.*", 1e-6),)
  # Adam's first update of every leaf is about lr * sign(gradient): at most lr in size (plus
  # float32 rounding of the weights).
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))),
                       trajectory["after_first"], run.trainable)
  assert 0.9e-6 < max(jax.tree.leaves(moved["text_encoder"])) <= 1.05e-6
  assert 0.9e-4 < max(jax.tree.leaves(moved["unet"])) <= 1.05e-4


@pytest.mark.parametrize("base", ["sd1", pytest.param("sd2", marks=slow)])   # epsilon, v-prediction
def test_prior_term_is_the_class_half_with_its_weight(base, model_dirs, class_dir):
  run = loop.build(db_config(model_dirs[base], class_dir, batch_size=2, prior_loss_weight=0.3),
                   mesh=one_device_mesh())
  batch = jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))
  np.testing.assert_array_equal(batch[PRIOR], [0, 0, 1, 1])
  params = run.method.params.apply(run.frozen, run.trainable)
  rng = jax.random.PRNGKey(3)
  loss, metrics = jax.jit(lambda p, b: method_loss(run.method, run.models, run.objective, p, p, b,
                                                   rng))(params, batch)

  # Directly: the same latents, noise and timesteps, two forwards, two means.
  latent_rng, loss_rng = jax.random.split(rng)
  latents = batch_latents(run.models, params, batch, latent_rng)
  noise, t = run.objective.draw(loss_rng, latents.shape)
  ab = jnp.asarray(alphas_cumprod(run.pipe.scheduler_config))
  target = training_target(run.pipe.scheduler_config.prediction_type, ab, latents, noise, t)

  def half_mse(rows):
    noisy = add_noise(ab, latents[rows], noise[rows], t[rows])
    pred = run.models.unet.apply({"params": params["unet"]}, noisy, t[rows], batch["context"][rows])
    return float(jnp.mean(jnp.square(pred - target[rows])))
  instance, prior = half_mse(slice(0, 2)), half_mse(slice(2, 4))
  assert run.pipe.scheduler_config.prediction_type == ("epsilon" if base == "sd1" else "v_prediction")
  np.testing.assert_allclose(float(metrics["instance_loss"]), instance, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["prior_loss"]), prior, rtol=1e-4)
  np.testing.assert_allclose(float(loss), instance + 0.3 * prior, rtol=1e-4)


def test_bad_dreambooth_options(model_dirs, class_dir):
  with pytest.raises(ConfigError, match="optim.lr must be > 0"):
    loop.build(db_config(model_dirs["sd1"], class_dir, method=dict(name="dreambooth"),
                         optim=dict(lr=0.0, lr_groups=(("text_encoder/.*", 1e-6),))),
               mesh=one_device_mesh())
  with pytest.raises(ConfigError, match="prior_loss_weight must be >= 0"):
    db_config(model_dirs["sd1"], class_dir, prior_loss_weight=-1.0)
  with pytest.raises(ConfigError, match="data.class_prompt"):
    loop.build(db_config(model_dirs["sd1"], class_dir, data=dict(class_prompt="")),
               mesh=one_device_mesh())


def test_missing_class_images_without_a_way_to_make_them(model_dirs, tmp_path):
  from persona_jax.data.images import DataError
  folder = write_class_images(tmp_path / "few", n=1)
  with pytest.raises(DataError, match=f"{folder}: 1 class image.*class_generate is off"):
    loop.build(db_config(model_dirs["sd1"], folder), mesh=one_device_mesh())
  with pytest.raises(DataError, match="nowhere: 0 class image"):
    loop.build(db_config(model_dirs["sd1"], tmp_path / "nowhere"), mesh=one_device_mesh())
  with pytest.raises(ConfigError, match="with prior_loss_weight 0 the class images would be"):
    db_config(model_dirs["sd1"], folder, prior_loss_weight=0.0)
