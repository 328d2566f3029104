"""Building blocks of the SD UNet (and, for resnets and resamplers, of the VAE), channels-last.

Param names follow diffusers one-to-one (`resnets_0/conv1`, `attentions_0/transformer_blocks_0/
attn2/to_k`, `downsamplers_0/conv`, `ff/net_0/proj`), so `convert/diffusers.py` only has to turn
`name_N` into `name.N` and transpose kernels.

Every block takes the UNet's `streams` (a dict) and runs the config's add-ons at their plug
points (models/addons.py): InstantBooth's `adapter` between attn1 and attn2, IP-Adapter's
`attn2/to_[kv]_ip` branch, attn2's options; without its stream an add-on is skipped, so the output
is the base model's exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax.models.activations import get_activation
from persona_jax.models.addons import Place
from persona_jax.models.attention import Attention
from persona_jax.models.configs import UNetConfig
from persona_jax.models.norms import GroupNorm, LayerNorm


def conv(features: int, kernel: int, *, stride: int = 1, padding=None, dtype=jnp.float32,
         param_dtype=jnp.float32, name: str | None = None):
  """A 2D convolution with PyTorch's symmetric padding (k // 2 unless given)."""
  p = kernel // 2 if padding is None else padding
  pad = p if isinstance(p, (tuple, list)) else ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                 param_dtype=param_dtype, name=name)


def upsample_nearest(x, size=None):
  """Nearest-neighbour upsampling of [B, H, W, C]: 2x, or to `size` = (H', W') as torch does it."""
  if size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  h, w = x.shape[1:3]
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
  """norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2, plus shortcut."""
  out_channels: int
  groups: int
  eps: float
  act_fn: str = "silu"
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    """x: [B, H, W, Cin]; temb: [B, T] or None -> [B, H, W, out_channels]."""
    act = get_activation(self.act_fn)
    norm = functools.partial(GroupNorm, self.groups, self.eps, self.dtype, self.param_dtype)
    cv = functools.partial(conv, dtype=self.dtype, param_dtype=self.param_dtype)
    h = cv(self.out_channels, 3, name="conv1")(act(norm(name="norm1")(x)))
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="time_emb_proj")(act(temb))                       # [B, C]
      h = h + t[:, None, None, :]
    h = cv(self.out_channels, 3, name="conv2")(act(norm(name="norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = cv(self.out_channels, 1, name="conv_shortcut")(x)
    out = x + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv `conv`; padding 0 means diffusers' asymmetric (0, 1) pad (the VAE)."""
  channels: int
  padding: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return conv(self.channels, 3, stride=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest 2x (or to an explicit size) then 3x3 conv `conv`."""
  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    x = upsample_nearest(x, size)
    return conv(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class FeedForward(nn.Module):
  """GEGLU feed-forward: net_0/proj (C -> 2*4C, split into h, gate; h * gelu(gate)), net_2 (4C -> C)."""
  dim: int
  mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers nests the GEGLU projection one level deeper: ff.net.0.proj
    h = _GEGLU(self.dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class _GEGLU(nn.Module):
  inner: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.inner * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * get_activation("gelu")(gate)


class BasicTransformerBlock(nn.Module):
  """norm1 -> attn1 (self) -> [add-ons] -> norm2 -> attn2 (cross) -> norm3 -> ff, with residuals.

  The config's add-ons (models/addons.py) plug in between attn1 and attn2
  (`before_cross_attention`) and into attn2 (`cross_attention_options`, `..._branches`).
  """
  config: UNetConfig
  dim: int
  heads: int
  path: str = ""                     # the transformer's path in the UNet (add-ons key on it)

  @nn.compact
  def __call__(self, x, context, streams=None):
    """x: [B, T, C]; context: [B, L, D]; streams: {name: array} for the add-ons -> [B, T, C]."""
    c = self.config
    streams = {} if streams is None else streams
    place = Place(self.path, self.dim, self.heads, c)
    attn = functools.partial(Attention, self.heads, self.dim // self.heads,
                             upcast_attention=c.upcast_attention, kernel=c.attention,
                             dtype=c.dtype, param_dtype=c.param_dtype)
    ln = functools.partial(LayerNorm, 1e-5, c.dtype, c.param_dtype)
    x = x + attn(name="attn1")(ln(name="norm1")(x))
    options, branches = {}, ()
    for addon in c.addons:
      x = addon.before_cross_attention(place, x, streams)
      own = addon.cross_attention_options(place)
      if set(own) & set(options):
        raise ValueError(f"two add-ons set attn2's {sorted(set(own) & set(options))[0]}")
      options.update(own)
      branches += tuple(addon.cross_attention_branches(place, streams))
    x = x + attn(name="attn2", **options)(ln(name="norm2")(x), context, branches)
    x = x + FeedForward(self.dim, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="ff")(ln(name="norm3")(x))
    return x


class Transformer2DModel(nn.Module):
  """GroupNorm -> proj_in (1x1 conv, or Dense with use_linear_projection) -> blocks -> proj_out."""
  config: UNetConfig
  channels: int
  heads: int
  num_layers: int = 1
  path: str = ""                     # its path in the UNet (`down_blocks_1/attentions_0`)

  @nn.compact
  def __call__(self, x, context, streams=None):
    """x: [B, H, W, C]; context: [B, L, D]; streams: the add-ons' streams -> [B, H, W, C]."""
    c = self.config
    b, hh, ww, ch = x.shape
    h = GroupNorm(c.norm_num_groups, 1e-6, c.dtype, c.param_dtype, name="norm")(x)
    if c.use_linear_projection:
      proj = functools.partial(nn.Dense, self.channels, dtype=c.dtype, param_dtype=c.param_dtype)
    else:
      proj = functools.partial(conv, self.channels, 1, dtype=c.dtype, param_dtype=c.param_dtype)
    h = proj(name="proj_in")(h)                                   # [B, H, W, C]
    h = h.reshape(b, hh * ww, self.channels)                      # [B, HW, C]
    for k in range(self.num_layers):
      h = BasicTransformerBlock(c, self.channels, self.heads, self.path,
                                name=f"transformer_blocks_{k}")(h, context, streams)
    h = h.reshape(b, hh, ww, self.channels)
    h = proj(name="proj_out")(h)
    return h + x


REMAT_POLICIES = {
    "blocks": None,                                                   # save nothing inside a block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # save matmul outputs
}


def maybe_remat(cls, config: UNetConfig):
  """`cls` with activation checkpointing per `config.remat` (params and names unchanged)."""
  if config.remat == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[config.remat])


def _resnet(c: UNetConfig, out_channels: int, name: str, output_scale_factor: float = 1.0):
  return maybe_remat(ResnetBlock2D, c)(out_channels, c.norm_num_groups, c.norm_eps, c.act_fn,
                                       output_scale_factor, c.dtype, c.param_dtype, name=name)


def _transformer(c: UNetConfig, channels: int, heads: int, layers: int, path: str):
  """The Transformer2DModel at `path` (`down_blocks_0/attentions_1`), named by its last part."""
  return maybe_remat(Transformer2DModel, c)(c, channels, heads, layers, path,
                                            name=path.rsplit("/", 1)[-1])


class UNetDownBlock(nn.Module):
  """diffusers `CrossAttnDownBlock2D` / `DownBlock2D` (by `config.down_block_types[index]`)."""
  config: UNetConfig
  index: int

  @nn.compact
  def __call__(self, x, temb, context, streams=None):
    """Returns (x, skips): the block output and the tensors the up path concatenates."""
    c, i = self.config, self.index
    out = c.block_out_channels[i]
    cross = c.down_block_types[i] == "CrossAttnDownBlock2D"
    skips = []
    for j in range(c.layers_per_block_list[i]):
      x = _resnet(c, out, f"resnets_{j}")(x, temb)
      if cross:
        x = _transformer(c, out, c.heads_per_block[i], c.down_transformer_layers[i][j],
                         f"down_blocks_{i}/attentions_{j}")(x, context, streams)
      skips.append(x)
    if i < len(c.block_out_channels) - 1:
      x = Downsample2D(out, c.downsample_padding, c.dtype, c.param_dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
  """resnets_0 -> (attentions_k -> resnets_{k+1}) at the lowest resolution."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context, streams=None):
    c = self.config
    ch = c.block_out_channels[-1]
    x = _resnet(c, ch, "resnets_0", c.mid_block_scale_factor)(x, temb)
    x = _transformer(c, ch, c.heads_per_block[-1], c.mid_transformer_layers,
                     "mid_block/attentions_0")(x, context, streams)
    return _resnet(c, ch, "resnets_1", c.mid_block_scale_factor)(x, temb)


class UNetUpBlock(nn.Module):
  """diffusers `CrossAttnUpBlock2D` / `UpBlock2D`; `index` counts up blocks from the bottom."""
  config: UNetConfig
  index: int

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None, streams=None):
    """skips: this block's skip tensors, in the order they are consumed (last pushed first)."""
    c, i = self.config, self.index
    n = len(c.block_out_channels)
    out = c.block_out_channels[::-1][i]
    heads = c.heads_per_block[::-1][i]
    cross = c.up_block_types[i] == "CrossAttnUpBlock2D"
    for j, skip in enumerate(skips):
      x = jnp.concatenate([x, skip], axis=-1)
      x = _resnet(c, out, f"resnets_{j}")(x, temb)
      if cross:
        x = _transformer(c, out, heads, c.up_transformer_layers[i][j],
                         f"up_blocks_{i}/attentions_{j}")(x, context, streams)
    if i < n - 1:
      x = Upsample2D(out, c.dtype, c.param_dtype, name="upsamplers_0")(x, upsample_size)
    return x
