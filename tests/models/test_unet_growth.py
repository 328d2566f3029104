"""Deepening a UNet (models/unet_growth.py): the deeper UNet computes the same function, its
new layers get gradients, and diffusers loads it (per-block layers_per_block) to the same output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.errors import ConfigError
from persona_jax.models.configs import UNetConfig
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.models.unet_growth import deepen
from tests.torch_reference import require_torch


def inputs(config: UNetConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 8, 8, config.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((2, 7, config.cross_attention_dims[0])).astype(np.float32)
  return x, np.array([3, 950]), ctx


@pytest.fixture(scope="module")
def grown(pipes):
  """{preset: (old config, old params, new raw config, new params)}. Both presets have 2 layers
  per block, a cross-attention top level and a plain bottom level."""
  out = {}
  for preset, layers in (("sd1", (3, 4)), ("sd2", (3, 2))):
    pipe = pipes[preset]
    raw, params = deepen(pipe.raw_configs["unet"], pipe.params["unet"], layers, seed=1)
    out[preset] = (pipe.unet_config, pipe.params["unet"], raw, params)
  return out


def test_deeper_unet_computes_the_same_function(grown):
  """sd2: two transformer layers in the top block and linear projections (sd1 is checked
  against diffusers below)."""
  config, params, raw, new_params = grown["sd2"]
  new_config = UNetConfig.from_dict(raw)
  assert new_config.layers_per_block_list != config.layers_per_block_list
  assert len(tree.flatten(new_params)) > len(tree.flatten(params))
  x, t, ctx = inputs(config)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, x, t, ctx)
    got = jax.jit(UNet2DConditionModel(new_config).apply)({"params": new_params}, x, t, ctx)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_new_layers_get_gradients(grown):
  """The new layers' zeroed outputs (resnet conv2, transformer proj_out) are not dead ends."""
  config, params, raw, new_params = grown["sd1"]
  x, t, ctx = inputs(config, seed=1)
  unet = UNet2DConditionModel(UNetConfig.from_dict(raw))
  loss = lambda p: jnp.mean(unet.apply({"params": p}, x, t, ctx) ** 2)
  grads = tree.flatten(jax.jit(jax.grad(loss))(new_params))
  new = ("down_blocks_0/resnets_2/conv2/kernel", "down_blocks_0/attentions_2/proj_out/kernel",
         "up_blocks_1/resnets_1/conv2/kernel", "up_blocks_1/attentions_1/proj_out/kernel",
         "down_blocks_1/resnets_3/conv2/kernel", "up_blocks_0/resnets_2/conv_shortcut/kernel")
  flat_new = tree.flatten(new_params)
  for name in new:
    if "conv_shortcut" not in name:
      assert not np.any(flat_new[name]), f"{name}: a new layer's output starts at zero"
    assert float(jnp.abs(grads[name]).max()) > 0, name
  # The bottom level (up_blocks_0) went from 2 to 4 layers: its resnets_0 stays, the new ones are
  # 1 and 2, and the old resnets 1 and 2 (the last reads the skip of the level above) are 3 and 4.
  flat_old = tree.flatten(params)
  for was, now in ((0, 0), (1, 3), (2, 4)):
    np.testing.assert_array_equal(flat_new[f"up_blocks_0/resnets_{now}/conv1/kernel"],
                                  flat_old[f"up_blocks_0/resnets_{was}/conv1/kernel"])


def test_fewer_layers_are_refused(pipes):
  pipe = pipes["sd1"]
  with pytest.raises(ConfigError, match="none below the current"):
    deepen(pipe.raw_configs["unet"], pipe.params["unet"], (1, 2))


def test_diffusers_loads_the_deeper_unet(grown, pipes, model_dirs, tmp_path):
  """Written in the diffusers layout, the per-block layers_per_block loads in diffusers and
  gives our output, which is the original UNet's (sd1: from 2 to 3 and 4 layers per block)."""
  require_torch()
  import dataclasses

  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  from persona_jax.pipeline import save_pipeline
  from persona_jax.verify import compare, nchw
  config, _, raw, new_params = grown["sd1"]
  pipe = dataclasses.replace(pipes["sd1"], unet_config=UNetConfig.from_dict(raw),
                             raw_configs={**pipes["sd1"].raw_configs, "unet": raw},
                             params={**pipes["sd1"].params, "unet": new_params})
  x, t, ctx = inputs(config, seed=2)
  def torch_unet(folder):
    ref = TorchUNet.from_pretrained(folder).eval()
    with torch.no_grad():
      return ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
  want = torch_unet(save_pipeline(pipe, tmp_path / "deeper") / "unet")
  assert compare("original", want, torch_unet(model_dirs["sd1"] / "unet")).max_rel < 1e-5
  with jax.default_matmul_precision("highest"):
    got = jax.jit(UNet2DConditionModel(pipe.unet_config).apply)({"params": new_params}, x, t, ctx)
  assert compare("deeper unet", nchw(got), want).max_rel < 1e-4
