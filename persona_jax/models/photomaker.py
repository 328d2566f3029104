"""PhotoMaker's ID encoders (TencentARC/PhotoMaker `photomaker/model.py`, `model_v2.py`,
`resampler.py`) in linen: ID images (and for v2 their ArcFace embeddings) -> ID tokens, each fused
with one copy of the class word's prompt embedding (the "stacked ID embedding").

  v1 `PhotoMakerIDEncoder`: CLIP tower -> pooled class token -> `visual_projection` (768) and
     `visual_projection_2` (1280, no bias), concatenated: one 2048-d token per image.
  v2 `PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken`: the 512-d ArcFace embedding ->
     `qformer_perceiver` (token_proj Linear-GELU-Linear to `num_tokens` x 2048, LayerNorm, a
     4-layer perceiver with 128-wide heads reading the tower's last hidden state (before
     post_layernorm), plus a residual): `num_tokens` (2) tokens per image. The official class
     still owns `visual_projection(_2)` and `post_layernorm`; they are loaded (the official load
     is strict) and computed, but do not reach the output.
  Both: `fuse_module` (mlp1 on [class embedding, id token] plus the class embedding, mlp2 with a
     residual, LayerNorm) replaces the class-word positions of the prompt embeddings.

Param names are the official state dict's (`convert/photomaker_files.py`): `vision_model/...`
(models/clip_vision.py's tower), `visual_projection/kernel`, `visual_projection_2/kernel`,
`fuse_module/mlp1/{layernorm,fc1,fc2}`, `fuse_module/mlp2/...`, `fuse_module/layer_norm`, and for
v2 `qformer_perceiver/{token_proj_0,token_proj_2,token_norm}` and
`qformer_perceiver/perceiver_resampler/{proj_in,layers_N_attn,layers_N_ff,proj_out,norm_out}`.
The heads compute in float32 (the tower in `config.vision.dtype`); LayerNorm eps 1e-5 and exact
GELU, as torch's defaults.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.models.clip_vision import CLIPVisionTransformer
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.image_projection import FeedForward, PerceiverAttention
from persona_jax.models.norms import LayerNorm

V1, V2 = "v1", "v2"

# photomaker/model.py VISION_CONFIG_DICT: CLIP ViT-L/14 at 224 (transformers' defaults otherwise).
OFFICIAL_VISION = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768,
                                   num_hidden_layers=24, num_attention_heads=16, image_size=224,
                                   patch_size=14, with_projection=True)


@dataclasses.dataclass(frozen=True)
class PhotoMakerConfig:
  """Sizes of a PhotoMaker ID encoder; the defaults are the official v1/v2 files'
  (`convert/photomaker_files.py` infers them from a file's weights)."""
  version: str = V1                      # "v1" | "v2"
  vision: CLIPVisionConfig = OFFICIAL_VISION
  projection_2_dim: int = 1280           # visual_projection_2's width (v1: 768 + 1280 = fuse_dim)
  fuse_dim: int = 2048                   # the prompt embeddings' width (SDXL's 768 + 1280)
  mlp1_hidden_dim: int = 2048            # fuse_module.mlp1.fc1 out
  mlp2_hidden_dim: int = 2048            # fuse_module.mlp2.fc1 out
  # v2 only: QFormerPerceiver(id_embeddings_dim=512, cross_attention_dim=fuse_dim, num_tokens=2)
  id_embeddings_dim: int = 512           # the ArcFace embedding's width
  token_proj_hidden_dim: int = 2048      # id_embeddings_dim * ratio (4)
  num_tokens: int = 2                    # ID tokens per image
  perceiver_depth: int = 4
  perceiver_heads: int = 16              # cross_attention_dim // 128
  perceiver_head_dim: int = 128
  perceiver_ff_mult: int = 4

  @property
  def tokens_per_image(self) -> int:
    """Class-word copies each ID image fills: v1 one, v2 `num_tokens`."""
    return 1 if self.version == V1 else self.num_tokens


def class_token_positions(class_tokens_mask, num_id_tokens: int):
  """The first `num_id_tokens` class-word positions of each row, in order; the sequence length
  (out of range) where a row has fewer. [B, L] bool -> [B, num_id_tokens] int32."""
  length = class_tokens_mask.shape[1]
  first = lambda m: jnp.nonzero(m, size=num_id_tokens, fill_value=length)[0]
  return jax.vmap(first)(class_tokens_mask.astype(bool)).astype(jnp.int32)


def check_class_tokens_mask(class_tokens_mask, num_id_tokens: int) -> None:
  """Host-side check of a concrete mask: no row marks more class-word positions than there are
  ID tokens (images x tokens per image). Raises ConfigError."""
  counts = np.asarray(class_tokens_mask).astype(bool).sum(axis=1)
  if (counts > num_id_tokens).any():
    raise ConfigError(f"class_tokens_mask: a row marks {int(counts.max())} class-word positions "
                      f"but the ID images give {num_id_tokens} ID tokens; repeat the class word "
                      "once per ID token (images x tokens per image)")


class MLP(nn.Module):
  """photomaker's MLP: LayerNorm, fc1, GELU, fc2 (+ the input when `use_residual`)."""
  out_dim: int
  hidden_dim: int
  use_residual: bool

  @nn.compact
  def __call__(self, x):
    h = LayerNorm(name="layernorm")(x)
    h = nn.gelu(nn.Dense(self.hidden_dim, name="fc1")(h), approximate=False)
    h = nn.Dense(self.out_dim, name="fc2")(h)
    return h + x if self.use_residual else h


class FuseModule(nn.Module):
  """Fuses ID tokens into the class-word positions of prompt embeddings."""
  config: PhotoMakerConfig

  def fuse(self, class_embeds, id_tokens):
    """The official `fuse_fn`: [..., E] class embeddings and [..., E'] ID tokens -> [..., E]."""
    c = self.config
    x = jnp.concatenate([class_embeds, id_tokens], axis=-1)
    x = MLP(c.fuse_dim, c.mlp1_hidden_dim, False, name="mlp1")(x) + class_embeds
    x = MLP(c.fuse_dim, c.mlp2_hidden_dim, True, name="mlp2")(x)
    return LayerNorm(name="layer_norm")(x)

  @nn.compact
  def __call__(self, prompt_embeds, id_tokens, class_tokens_mask):
    """Replaces the class-word positions with the stacked ID embedding.

    Args:
      prompt_embeds: [B, L, E] (SDXL: both text encoders' penultimate states, concatenated).
      id_tokens: [B, K, E'] ID tokens, image-major (image 0's tokens first), K = images x tokens
        per image.
      class_tokens_mask: [B, L] bool, True at the class word's copies. The j-th True position of
        a row takes that row's j-th ID token; a row with fewer than K positions uses the first
        ones (the official code's `num_inputs` truncation), a row with none is left unchanged.
    Returns:
      [B, L, E] in prompt_embeds' dtype; positions outside the mask are unchanged.
    """
    b, k = id_tokens.shape[:2]
    if not isinstance(class_tokens_mask, jax.core.Tracer):
      check_class_tokens_mask(class_tokens_mask, k)
    positions = class_token_positions(class_tokens_mask, k)                       # [B, K]
    length = prompt_embeds.shape[1]
    x = jnp.asarray(prompt_embeds, jnp.float32)
    class_embeds = jnp.take_along_axis(x, jnp.minimum(positions, length - 1)[..., None], axis=1)
    fused = self.fuse(class_embeds, id_tokens.astype(jnp.float32))                # [B, K, E]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], positions.shape)
    return x.at[rows, positions].set(fused, mode="drop").astype(prompt_embeds.dtype)


class FacePerceiverResampler(nn.Module):
  """photomaker/resampler.py: queries given (not learned), keys/values over the image features."""
  config: PhotoMakerConfig

  @nn.compact
  def __call__(self, latents, features):
    """latents [N, T, D], features [N, P, H] -> [N, T, D]."""
    c = self.config
    x = nn.Dense(c.fuse_dim, name="proj_in")(features)
    for n in range(c.perceiver_depth):
      attn = PerceiverAttention(c.perceiver_heads, c.perceiver_head_dim, name=f"layers_{n}_attn")
      latents = attn(x, latents) + latents
      latents = FeedForward(c.perceiver_ff_mult, name=f"layers_{n}_ff")(latents) + latents
    return LayerNorm(name="norm_out")(nn.Dense(c.fuse_dim, name="proj_out")(latents))


class QFormerPerceiver(nn.Module):
  """v2: ArcFace embeddings [N, 512] and tower states [N, P, H] -> [N, num_tokens, D]."""
  config: PhotoMakerConfig

  @nn.compact
  def __call__(self, id_embeds, last_hidden_state):
    c = self.config
    x = nn.Dense(c.token_proj_hidden_dim, name="token_proj_0")(id_embeds)
    x = nn.Dense(c.num_tokens * c.fuse_dim, name="token_proj_2")(nn.gelu(x, approximate=False))
    x = LayerNorm(name="token_norm")(x.reshape(-1, c.num_tokens, c.fuse_dim))
    return x + FacePerceiverResampler(c, name="perceiver_resampler")(x, last_hidden_state)


class PhotoMakerIDEncoder(nn.Module):
  """The ID encoder of a PhotoMaker file (v1 or v2, by `config.version`)."""
  config: PhotoMakerConfig

  @nn.compact
  def __call__(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds=None):
    """Prompt embeddings with the stacked ID embedding at the class word.

    Args:
      id_pixel_values: [B, N, S, S, C] ID images, channels-last, preprocessed as CLIP's image
        processor does (the official pipeline: `CLIPImageProcessor()` defaults, 224x224).
      prompt_embeds: [B, L, fuse_dim].
      class_tokens_mask: [B, L] bool: N x tokens_per_image copies of the class word per row.
      id_embeds: v2 only: [B, N, id_embeddings_dim] raw ArcFace embeddings of the same images.
    Returns:
      [B, L, fuse_dim] (FuseModule).
    """
    c = self.config
    v = c.vision
    if id_pixel_values.ndim != 5 or id_pixel_values.shape[2:] != (v.image_size, v.image_size,
                                                                  v.num_channels):
      raise ValueError(f"PhotoMakerIDEncoder expects ID images [B, N, {v.image_size}, "
                       f"{v.image_size}, {v.num_channels}] (channels-last), got "
                       f"{id_pixel_values.shape}")
    if (id_embeds is None) != (c.version == V1):
      raise ValueError(f"PhotoMaker {c.version}: id_embeds (the ArcFace embeddings) are "
                       + ("required" if c.version == V2 else "not used by v1"))
    b, n = id_pixel_values.shape[:2]
    last, pooled, _ = CLIPVisionTransformer(v, name="vision_model")(
        id_pixel_values.reshape((b * n,) + id_pixel_values.shape[2:]))
    pooled = pooled.astype(jnp.float32)
    projected = jnp.concatenate(
        [nn.Dense(v.projection_dim, use_bias=False, name="visual_projection")(pooled),
         nn.Dense(c.projection_2_dim, use_bias=False, name="visual_projection_2")(pooled)], -1)
    if c.version == V1:
      tokens = projected.reshape(b, n, -1)                                 # [B, N, 2048]
    else:
      if id_embeds.shape[:2] != (b, n):
        raise ValueError(f"id_embeds {id_embeds.shape} must be [B, N, {c.id_embeddings_dim}] for "
                         f"{n} ID images per row")
      tokens = QFormerPerceiver(c, name="qformer_perceiver")(
          id_embeds.reshape(b * n, -1).astype(jnp.float32), last.astype(jnp.float32))
      tokens = tokens.reshape(b, n * c.num_tokens, c.fuse_dim)            # image-major
    return FuseModule(c, name="fuse_module")(prompt_embeds, tokens, class_tokens_mask)


def dummy_inputs(config: PhotoMakerConfig, num_images: int = 1, length: int = 77):
  """Zero inputs of the right shapes for `init` / `eval_shape` (one row)."""
  s, ch = config.vision.image_size, config.vision.num_channels
  pixels = jnp.zeros((1, num_images, s, s, ch), config.vision.dtype)
  prompt = jnp.zeros((1, length, config.fuse_dim), jnp.float32)
  mask = jnp.zeros((1, length), bool)
  embeds = jnp.zeros((1, num_images, config.id_embeddings_dim)) if config.version == V2 else None
  return pixels, prompt, mask, embeds


def abstract_params(config: PhotoMakerConfig):
  """The param tree as shapes only (`jax.eval_shape`: nothing is initialized)."""
  model = PhotoMakerIDEncoder(config)
  return jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(config))["params"]


def init_params(rng, config: PhotoMakerConfig):
  """Fresh params (flax's default initializers)."""
  return PhotoMakerIDEncoder(config).init(rng, *dummy_inputs(config))["params"]
