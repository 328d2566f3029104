"""The UNet's encoder features (E4T) against diffusers' down/mid block outputs, captured with
forward hooks on the same weights and inputs. float32, highest matmul precision; reached about
1e-6 relative, asserted 1e-5."""

import jax
import numpy as np

from persona_jax.models.configs import UNetConfig
from persona_jax.models.unet import UNetEncoderFeatures, encoder_feature_dim
from persona_jax.verify import compare, nchw
from tests.test_configs import SD15_UNET
from tests.torch_reference import require_torch


def test_sd15_feature_width_is_the_references():
  """mkshing/e4t-diffusion: 320*4 + 640*3 + 1280*5 (12 skips) + 1280 (mid) = 10880."""
  assert encoder_feature_dim(UNetConfig.from_dict(SD15_UNET)) == 10880


def diffusers_features(unet, x, t, ctx):
  """conv_in's output, every down block's residual outputs, the mid block's: pooled, concatenated."""
  import torch
  captured = []
  hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: captured.append(o))]
  for block in unet.down_blocks:
    hooks.append(block.register_forward_hook(lambda m, i, o: captured.extend(o[1])))
  hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o)))
  with torch.no_grad():
    unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx))
  for h in hooks:
    h.remove()
  return torch.cat([h.mean(dim=(2, 3)) for h in captured], dim=1).numpy()


def test_encoder_features_match_diffusers_hooks(pipes, model_dirs):
  """The sd1 preset (the down path is shared with the UNet, whose parity covers sd2 too)."""
  require_torch()
  from diffusers import UNet2DConditionModel
  pipe = pipes["sd1"]
  ref = UNet2DConditionModel.from_pretrained(model_dirs["sd1"] / "unet").eval()
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 16, 8, 4)).astype(np.float32)
  t = np.array([5, 801])
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  want = diffusers_features(ref, x, t, ctx)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(UNetEncoderFeatures(pipe.unet_config).apply)({"params": pipe.params["unet"]},
                                                              x, t, ctx)
  assert got.shape == want.shape == (2, encoder_feature_dim(pipe.unet_config))
  assert compare("features", got, want).max_rel < 1e-5
