"""Memory options: remat gives the same gradients; bf16 compute keeps float32 trainable params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.data.pipeline import make_iterator
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import one_device_mesh, ti_config


@slow
def test_remat_blocks_gives_the_same_gradients(pipes):
  pipe = pipes["sd1"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  t = jnp.array([10, 700])

  def grads(remat):
    unet = UNet2DConditionModel(dataclasses.replace(pipe.unet_config, remat=remat))
    loss = lambda p: jnp.mean(jnp.square(unet.apply({"params": p}, x, t, ctx)))
    return jax.jit(jax.grad(loss))(pipe.params["unet"])
  plain, remat = grads("none"), grads("blocks")
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_with_float32_trainable_and_random_crops(model_dirs):
  """bf16 compute, and random crops: the VAE encodes pixels inside the step."""
  config = ti_config(model_dirs["sd1"], mixed_precision="bf16", data=dict(center_crop=False))
  run = loop.build(config, mesh=one_device_mesh())
  assert run.models.unet.config.dtype == jnp.bfloat16
  assert set(run.frozen) == {"unet", "text_encoder", "vae"}
  assert {x.dtype for x in jax.tree.leaves(run.frozen)} == {jnp.dtype(jnp.bfloat16)}
  state = loop.initial_state(run)
  step = loop.jit_step(run, jax.tree.map(lambda a: a.sharding, state),
                       jax.tree.map(lambda a: a.sharding, run.frozen))
  batch = jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))
  assert batch["pixels"].shape == (2, 32, 32, 3)
  new, metrics = step(state, run.frozen, batch)
  assert new.trainable["tokens"].dtype == jnp.float32
  assert np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(np.asarray(new.trainable["tokens"]), np.asarray(run.trainable["tokens"]))


def test_a_full_fine_tune_holds_the_base_unet_once(model_dirs, tmp_path):
  """After the step-0 state is made, the run keeps no device copy of the initial trainable
  params: the live arrays grow by the optimizer state alone, not by another UNet."""
  import gc

  from tests.runs import db_config, write_class_images
  class_dir = tmp_path / "class"
  write_class_images(class_dir)
  run = loop.build(db_config(model_dirs["sd1"], class_dir), mesh=one_device_mesh())
  unet_bytes = sum(x.nbytes for x in jax.tree.leaves(run.trainable["unet"]))
  assert all(a is b for a, b in zip(jax.tree.leaves(run.trainable["unet"]),
                                    jax.tree.leaves(run.pipe.params["unet"])))  # shared arrays
  live = lambda: sum(x.nbytes for x in jax.live_arrays())                       # noqa: E731
  gc.collect()
  before = live()
  state = loop.initial_state(run, consume=True)
  run = loop.without_initial_params(run)
  gc.collect()
  grown = live() - before
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  assert opt_bytes >= 2 * unet_bytes                                 # AdamW's two moments
  assert grown < opt_bytes + unet_bytes // 10, (grown, opt_bytes, unet_bytes)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(run.pipe.params["unet"]))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(run.pipe.params["vae"]))
  params = run.full_params(state.trainable)                           # what grids and results read
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
