"""CLIP vision encoder (transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection`) in linen.

A ViT: non-overlapping patches (a stride-`patch_size` conv without bias), a class token, learned
position embeddings, `pre_layrnorm` (transformers' spelling), the text encoder's layers without
the causal mask, and `post_layernorm` on the class token only. Param names are transformers' with
the tower under `vision_model` as CLIPVisionModelWithProjection (and transformers 4.x) have it:
`vision_model/embeddings/patch_embedding/kernel`, `vision_model/encoder/layers_N/self_attn/q_proj`,
`visual_projection/kernel` (only when `config.with_projection`).

Inputs are channels-last [B, H, W, C] images already preprocessed (`data/clip_images.py`) at the
config's `image_size`; position embeddings are not interpolated to other sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.norms import LayerNorm
from persona_jax.models.text_encoder import CLIPEncoder


class ImageEncoderOutput(NamedTuple):
  last_hidden_state: jnp.ndarray     # [B, 1+P, D] last layer's output (no post_layernorm)
  pooler_output: jnp.ndarray         # [B, D] post_layernorm of the class token
  hidden_states: tuple               # L+1 arrays [B, 1+P, D]: pre_layrnorm output, then each layer
  image_embeds: jnp.ndarray | None   # [B, projection_dim] visual_projection(pooler_output), or None


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    """[B, H, W, C] -> class token then patches in row-major order, plus positions: [B, 1+P, D]."""
    c = self.config
    d, p = c.hidden_size, c.patch_size
    class_embedding = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,),
                                 c.param_dtype)
    conv = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=c.dtype,
                   param_dtype=c.param_dtype, name="patch_embedding")
    patches = conv(pixel_values.astype(c.dtype))                        # [B, H/p, W/p, D]
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)                                 # [B, P, D]
    position = nn.Embed(c.num_patches + 1, d, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="position_embedding")
    cls = jnp.broadcast_to(class_embedding.astype(c.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + position(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
  """The tower (transformers 4.x `CLIPVisionTransformer`, the `vision_model` of both classes)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    """[B, H, W, C] -> (last_hidden_state, pooler_output, hidden_states)."""
    c = self.config
    x = CLIPVisionEmbeddings(c, name="embeddings")(pixel_values)
    x = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="pre_layrnorm")(x)
    hidden = CLIPEncoder(c, causal=False, name="encoder")(x)
    pooled = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype,
                       name="post_layernorm")(hidden[-1][:, 0])
    return hidden[-1], pooled, hidden


class CLIPVisionModel(nn.Module):
  """The CLIP image encoder; with `config.with_projection`, CLIPVisionModelWithProjection."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values) -> ImageEncoderOutput:
    """Encodes images.

    Args:
      pixel_values: [B, image_size, image_size, num_channels] float, normalized as CLIP's image
        processor does.
    Returns:
      ImageEncoderOutput; IP-Adapter-style conditioning uses `image_embeds` or
      `hidden_states[-2]`.
    """
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.image_size, c.image_size,
                                                           c.num_channels):
      raise ValueError(f"CLIPVisionModel expects [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}] images (channels-last), got {pixel_values.shape}")
    last, pooled, hidden = CLIPVisionTransformer(c, name="vision_model")(pixel_values)
    embeds = None
    if c.with_projection:
      embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="visual_projection")(pooled)
    return ImageEncoderOutput(last, pooled, hidden, embeds)
