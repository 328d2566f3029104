"""E4T's word-embedding encoder (Gal et al. 2023; layout of mkshing/e4t-diffusion's `E4TEncoder`).

Inputs are the class-token features of every second CLIP image-encoder layer (`clip_features`)
and the pooled UNet encoder features of the noised latent (`models.unet.UNetEncoderFeatures`):

  u   = unet_embed_2(leaky_relu(unet_embed_0(unet_features)))          # [B, W]
  f_k = first_linears_k(feature_linear([h_k ; u]))  for each CLIP feature h_k
  E   = final_linear(leaky_relu(mean_k f_k))                             # [B, text width]

Param names follow the reference (`unet_feature_embedder.0/.2` -> `unet_embed_0/2`). The CLIP
tower is not part of this module: its params stay in the `image_encoder` component.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class E4TEncoderConfig:
  num_features: int          # K: CLIP class-token features (every second layer)
  clip_width: int            # width of each CLIP feature
  unet_features: int         # width of the pooled UNet features (`encoder_feature_dim`)
  width: int                 # hidden width (the reference: the CLIP width)
  out_width: int             # the text encoder's token-embedding width
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class E4TEncoder(nn.Module):
  config: E4TEncoderConfig

  @nn.compact
  def __call__(self, clip_features, unet_features):
    """The predicted embedding offset direction E(x, z_t).

    Args:
      clip_features: [B, K, clip_width]; unet_features: [B, unet_features].
    Returns:
      [B, out_width] float32.
    """
    c = self.config
    dense = lambda n, name: nn.Dense(n, dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    u = dense(c.width, "unet_embed_0")(unet_features.astype(c.dtype))
    u = dense(c.width, "unet_embed_2")(nn.leaky_relu(u))                           # [B, W]
    b, k = clip_features.shape[:2]
    if k != c.num_features:
      raise ValueError(f"E4TEncoder expects {c.num_features} CLIP features, got {k}")
    u = jnp.broadcast_to(u[:, None, :], (b, k, c.width))                          # [B, K, W]
    fused = dense(c.width, "feature_linear")(
        jnp.concatenate([clip_features.astype(c.dtype), u], axis=-1))             # [B, K, W]
    per_layer = [dense(c.width, f"first_linears_{i}")(fused[:, i]) for i in range(k)]
    h = nn.leaky_relu(jnp.mean(jnp.stack(per_layer, axis=1), axis=1))            # [B, W]
    return dense(c.out_width, "final_linear")(h).astype(jnp.float32)
