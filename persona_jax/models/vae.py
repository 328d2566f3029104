"""AutoencoderKL (the SD VAE) in Flax linen, diffusers parameter names, channels-last."""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax.models.activations import get_activation
from persona_jax.models.attention import Attention
from persona_jax.models.configs import VAEConfig
from persona_jax.models.norms import GroupNorm
from persona_jax.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv

VAE_EPS = 1e-6


class Moments(NamedTuple):
  """The diagonal Gaussian posterior q(z|x). mean, logvar: [B, h, w, latent_channels]."""
  mean: jnp.ndarray
  logvar: jnp.ndarray     # clipped to [-30, 20] as diffusers does

  def sample(self, rng):
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape,
                                                                      self.mean.dtype)


def _resnet(c: VAEConfig, out: int, name: str):
  return ResnetBlock2D(out, c.norm_num_groups, VAE_EPS, c.act_fn, 1.0, c.dtype, c.param_dtype,
                       name=name)


class UNetMidBlock2D(nn.Module):
  """resnets_0 -> attentions_0 (one head, GroupNorm input, residual) -> resnets_1."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    ch = c.block_out_channels[-1]
    x = _resnet(c, ch, "resnets_0")(x)
    if c.mid_block_add_attention:
      x = Attention(1, ch, qkv_bias=True, norm_num_groups=c.norm_num_groups, norm_eps=VAE_EPS,
                    residual_connection=True, kernel=c.attention, dtype=c.dtype,
                    param_dtype=c.param_dtype, name="attentions_0")(x)
    return _resnet(c, ch, "resnets_1")(x)


class _Blocks(nn.Module):
  """A named container level (`down_blocks_i`, `up_blocks_i`) of resnets and one resampler."""
  config: VAEConfig
  out_channels: int
  num_layers: int
  resample: str | None      # "down", "up" or None

  @nn.compact
  def __call__(self, x):
    c = self.config
    for j in range(self.num_layers):
      x = _resnet(c, self.out_channels, f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample2D(self.out_channels, 0, c.dtype, c.param_dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample2D(self.out_channels, c.dtype, c.param_dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels]."""
    c = self.config
    n = len(c.block_out_channels)
    cv = functools.partial(conv, dtype=c.dtype, param_dtype=c.param_dtype)
    x = cv(c.block_out_channels[0], 3, name="conv_in")(x)
    for i, out in enumerate(c.block_out_channels):
      x = _Blocks(c, out, c.layers_per_block, "down" if i < n - 1 else None,
                  name=f"down_blocks_{i}")(x)
    x = UNetMidBlock2D(c, name="mid_block")(x)
    x = GroupNorm(c.norm_num_groups, VAE_EPS, c.dtype, c.param_dtype, name="conv_norm_out")(x)
    x = get_activation(c.act_fn)(x)
    return cv(2 * c.latent_channels, 3, name="conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""
    c = self.config
    n = len(c.block_out_channels)
    cv = functools.partial(conv, dtype=c.dtype, param_dtype=c.param_dtype)
    x = cv(c.block_out_channels[-1], 3, name="conv_in")(z)
    x = UNetMidBlock2D(c, name="mid_block")(x)
    for i, out in enumerate(c.block_out_channels[::-1]):
      x = _Blocks(c, out, c.layers_per_block + 1, "up" if i < n - 1 else None,
                  name=f"up_blocks_{i}")(x)
    x = GroupNorm(c.norm_num_groups, VAE_EPS, c.dtype, c.param_dtype, name="conv_norm_out")(x)
    x = get_activation(c.act_fn)(x)
    return cv(c.out_channels, 3, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """The VAE. Images are [B, H, W, 3] in [-1, 1]; latents [B, H/f, W/f, C] (unscaled)."""
  config: VAEConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    if c.use_quant_conv:
      self.quant_conv = conv(2 * c.latent_channels, 1, dtype=c.dtype, param_dtype=c.param_dtype)
    if c.use_post_quant_conv:
      self.post_quant_conv = conv(c.latent_channels, 1, dtype=c.dtype, param_dtype=c.param_dtype)

  def encode(self, images) -> Moments:
    """images: [B, H, W, 3] -> the posterior's Moments (multiply samples by scaling_factor)."""
    h = self.encoder(images.astype(self.config.dtype))
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return Moments(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    """latents: [B, h, w, C] (already divided by scaling_factor) -> images [B, H, W, 3]."""
    z = latents.astype(self.config.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images):
    """Reconstructs from the posterior mean (used to create all params at init)."""
    return self.decode(self.encode(images).mean)
