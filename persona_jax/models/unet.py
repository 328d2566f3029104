"""UNet2DConditionModel for SD 1.x / 2.x and SDXL in Flax linen, diffusers parameter names,
channels-last.

SDXL's added conditioning (`addition_embed_type="text_time"`) is the `added_cond` argument,
diffusers' `added_cond_kwargs`: {"text_embeds": [B, P] pooled text, "time_ids": [B, 6]
(original size, crop top-left, target size)}; each time id is embedded sinusoidally
(`add_time_proj`, no params), concatenated after the pooled text and mapped by `add_embedding`
(linear_1, act, linear_2) onto the time embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax import tree
from persona_jax.models.activations import get_activation
from persona_jax.models.addons import Where, check_streams
from persona_jax.models.configs import UNetConfig
from persona_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from persona_jax.models.low_rank import with_low_rank_paths
from persona_jax.models.norms import GroupNorm
from persona_jax.models.unet_blocks import UNetDownBlock, UNetMidBlock2DCrossAttn, UNetUpBlock, conv


class UNet2DConditionModel(nn.Module):
  """The SD denoiser. Latents are channels-last ([B, H, W, C]) everywhere in persona_jax."""
  config: UNetConfig

  @nn.compact
  @with_low_rank_paths
  def __call__(self, sample, timesteps, encoder_hidden_states, streams=None, added_cond=None):
    """Predicts noise (or v, or x0, per the scheduler's prediction type).

    Args:
      sample: [B, H, W, in_channels] noisy latents.
      timesteps: [B] or scalar, integer or fractional.
      encoder_hidden_states: [B, L, cross_attention_dim] text conditioning.
      streams: {name: array} read by the config's add-ons (models/addons.py); None, or an
        add-on's stream absent, computes the base model exactly.
      added_cond: SDXL's {"text_embeds": [B, P], "time_ids": [B, 6]} (needed exactly when the
        config has addition_embed_type "text_time").
    Returns:
      [B, H, W, out_channels]. With the `AttentionMaps` add-on, `apply(..., mutable=
      [ATTENTION_MAPS])` also returns the maps (models/attention_maps.py).
    """
    c = self.config
    n = len(c.block_out_channels)
    height, width = sample.shape[1:3]
    streams = {} if streams is None else streams
    x, skips, temb, context = down_path(c, sample, timesteps, encoder_hidden_states, streams,
                                        added_cond)
    for addon in c.addons:                     # the skips the up path reads, the mid output
      skips = [addon.block_output(where, h, streams)
               for where, h in zip(skip_places(c), skips, strict=True)]
      if c.mid_block_type is not None:
        x = addon.block_output(Where("mid"), x, streams)

    # When H or W is not a multiple of 2**(n-1), upsample to the skip's exact size (as diffusers).
    exact_sizes = height % c.downsample_factor or width % c.downsample_factor
    layers = c.layers_per_block_list[::-1]
    for i in range(n):
      k = layers[i] + 1
      block_skips, skips = skips[-k:][::-1], skips[:-k]
      size = skips[-1].shape[1:3] if exact_sizes and i < n - 1 else None
      x = UNetUpBlock(c, i, name=f"up_blocks_{i}")(x, block_skips, temb, context, size, streams)
      for addon in c.addons:
        x = addon.block_output(Where("up", i), x, streams)

    x = GroupNorm(c.norm_num_groups, c.norm_eps, c.dtype, c.param_dtype, name="conv_norm_out")(x)
    x = get_activation(c.act_fn)(x)
    return conv(c.out_channels, c.conv_out_kernel, dtype=c.dtype, param_dtype=c.param_dtype,
                name="conv_out")(x)


def skip_places(c: UNetConfig) -> list[Where]:
  """Where each skip of `down_path` comes from, in order: conv_in (block -1), then per down
  block its layers and its downsampler (the last layer index)."""
  out = [Where("down", -1, 0)]
  for i, layers in enumerate(c.layers_per_block_list):
    out += [Where("down", i, j) for j in range(layers + (i < len(c.block_out_channels) - 1))]
  return out


def added_embedding(c: UNetConfig, added_cond, batch: int):
  """SDXL's added text/time embedding [B, T] (called inside the UNet's scope), or None."""
  if c.addition_embed_type is None:
    if added_cond:
      raise ValueError("added_cond given, but the UNet's config has no addition_embed_type")
    return None
  missing = [k for k in ("text_embeds", "time_ids") if added_cond is None or k not in added_cond]
  if missing:
    raise ValueError(f"the UNet's addition_embed_type 'text_time' (SDXL) needs "
                     f"added_cond['{missing[0]}']")
  text, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
  time = timestep_embedding(jnp.reshape(time_ids, (-1,)), c.addition_time_embed_dim,
                            c.flip_sin_to_cos, c.freq_shift).reshape(batch, -1)
  joined = jnp.concatenate([jnp.broadcast_to(text, (batch, text.shape[-1])).astype(jnp.float32),
                            time], axis=-1)
  if joined.shape[-1] != c.projection_class_embeddings_input_dim:
    raise ValueError(f"added_cond: pooled text width {text.shape[-1]} + {time.shape[-1]} time "
                     f"features != projection_class_embeddings_input_dim "
                     f"{c.projection_class_embeddings_input_dim}")
  # diffusers builds add_embedding with TimestepEmbedding's default activation, not act_fn.
  return TimestepEmbedding(c.time_embed_dim, "silu", c.dtype, c.param_dtype,
                           name="add_embedding")(joined.astype(c.dtype))


def down_path(c: UNetConfig, sample, timesteps, encoder_hidden_states, streams=None,
              added_cond=None):
  """conv_in, the down blocks and the mid block, creating their submodules in the calling
  module's scope (so both modules below share diffusers' param names).

  Returns:
    (x [B, h, w, C] after the mid block, skips: conv_in's output then every down-block output
    as the up path consumes them, temb [B, T], context [B, L, D] in the compute dtype).
  """
  b = sample.shape[0]
  sample = sample.astype(c.dtype)
  context = encoder_hidden_states.astype(c.dtype)
  streams = {} if streams is None else streams
  check_streams(c, streams)
  for addon in c.addons:
    addon.check(c)
  if c.center_input_sample:
    sample = 2 * sample - 1.0

  t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
  temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
  temb = TimestepEmbedding(c.time_embed_dim, c.act_fn, c.dtype, c.param_dtype,
                           name="time_embedding")(temb.astype(c.dtype))      # [B, T]
  added = added_embedding(c, added_cond, b)
  if added is not None:
    temb = temb + added
  for addon in c.addons:
    temb = addon.time_embedding(temb, streams)

  x = conv(c.block_out_channels[0], c.conv_in_kernel, dtype=c.dtype, param_dtype=c.param_dtype,
           name="conv_in")(sample)
  skips = [x]
  for i in range(len(c.block_out_channels)):
    x, block_skips = UNetDownBlock(c, i, name=f"down_blocks_{i}")(x, temb, context, streams)
    skips.extend(block_skips)

  if c.mid_block_type is not None:
    x = UNetMidBlock2DCrossAttn(c, name="mid_block")(x, temb, context, streams)
  return x, skips, temb, context


def encoder_feature_dim(c: UNetConfig) -> int:
  """Width of `UNetEncoderFeatures`' output: the channels of every skip plus the mid block's."""
  widths = [c.block_out_channels[0]]
  for i, (ch, layers) in enumerate(zip(c.block_out_channels, c.layers_per_block_list)):
    widths += [ch] * (layers + (i < len(c.block_out_channels) - 1))
  if c.mid_block_type is not None:
    widths.append(c.block_out_channels[-1])
  return sum(widths)


class UNetEncoderFeatures(nn.Module):
  """The UNet's encoder half as a feature extractor (E4T; mkshing/e4t-diffusion's
  `return_encoder_outputs`): only conv_in, the down blocks and the mid block run. Applied to the
  UNet's own params (the up path's params are simply not read)."""
  config: UNetConfig

  @nn.compact
  @with_low_rank_paths
  def __call__(self, sample, timesteps, encoder_hidden_states, streams=None, added_cond=None):
    """Pooled encoder features.

    Args:
      sample: [B, H, W, in_channels] noisy latents; timesteps: [B] or scalar;
      encoder_hidden_states: [B, L, D] (E4T passes the empty prompt's).
    Returns:
      [B, encoder_feature_dim(config)] float32: conv_in's output, every down-block resnet /
      attention / downsampler output, then the mid block's, each averaged over H and W and
      concatenated in that order (SD 1.5: 12 skips + mid = 10880 features).
    """
    x, skips, _, _ = down_path(self.config, sample, timesteps, encoder_hidden_states, streams,
                               added_cond)
    outputs = skips + ([x] if self.config.mid_block_type is not None else [])
    return jnp.concatenate([h.astype(jnp.float32).mean(axis=(1, 2)) for h in outputs], axis=-1)


def example_inputs(c: UNetConfig, batch: int = 1):
  """Zero inputs of the smallest shapes the UNet takes: (sample, timesteps, context, added_cond)."""
  f = c.downsample_factor
  added = None
  if c.addition_embed_type == "text_time":
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": jnp.zeros((batch, pooled), c.dtype),
             "time_ids": jnp.zeros((batch, 6), jnp.float32)}
  return (jnp.zeros((batch, f, f, c.in_channels), c.dtype), jnp.zeros((batch,)),
          jnp.zeros((batch, 1, c.cross_attention_dims[0]), c.dtype), added)


def init_added_params(unet: UNet2DConditionModel, rng, streams: dict, base_params=None) -> dict:
  """Fresh params of the layers the UNet's add-ons add, {unet param path tree} (no base leaves).

  `streams` are example streams of the shapes the layers will see (their widths matter, the
  batch and token counts do not), e.g. {"adapter_tokens": jnp.zeros((1, 1, 768))}.
  `base_params`: the UNet's params without add-ons (their paths are left out), when the caller
  has them; otherwise they are traced once. The whole UNet is initialized under jit, which drops
  every base leaf: cheap even for SD.
  """
  import dataclasses
  c = unet.config
  *example, added_cond = example_inputs(c)
  if base_params is None:
    base = UNet2DConditionModel(dataclasses.replace(c, addons=()))
    base_params = jax.eval_shape(base.init, jax.random.key(0), *example, None,
                                 added_cond)["params"]
  base_paths = set(tree.flatten(base_params))
  streams = {k: v if v is None or jnp.ndim(v) == 0 else v[:1] for k, v in streams.items()}

  def added(rng, streams):
    params = unet.init(rng, *example, streams, added_cond)["params"]
    return tree.unflatten({p: v for p, v in tree.flatten(params).items() if p not in base_paths})
  return jax.jit(added)(rng, streams)
