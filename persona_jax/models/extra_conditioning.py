"""Conditioning streams the UNet takes beside the text context, for the default-off added layers
of tuning-free methods (UNetConfig's `ip_adapter` and `gated_adapter`).

`ExtraConditioning` is a pytree (jit, vmap and the sampler's cond/uncond concatenation see its
arrays); every field is optional, and a layer whose stream is None is skipped, so the UNet then
computes exactly the base model. Scales are traced values: changing them never recompiles.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class ExtraConditioning:
  """Optional streams for `UNet2DConditionModel(..., extra=ExtraConditioning(...))`.

  Attributes:
    ip_tokens: [B, N, cross_attention_dim] image tokens of IP-Adapter's decoupled cross-attention
      (every attn2: `Attn(Q, K, V) + ip_scale * Attn(Q, K_ip, V_ip)`); needs `ip_adapter`.
    ip_scale: scalar or [B]; None means 1.
    adapter_tokens: [B, P, Dp] tokens of the gated self-attention adapter between attn1 and attn2
      (InstantBooth's patch tokens, GLIGEN's grounding tokens); needs `gated_adapter`.
    adapter_scale: scalar or [B] (InstantBooth's beta); None means 1.
  """
  ip_tokens: Any = None
  ip_scale: Any = None
  adapter_tokens: Any = None
  adapter_scale: Any = None


def per_example(scale, batch: int, ndim: int, dtype):
  """A scalar or [B] scale (None: 1) as [B, 1, ...] with `ndim` axes, to multiply activations."""
  s = jnp.ones((), dtype) if scale is None else jnp.asarray(scale).astype(dtype)
  return jnp.broadcast_to(s, (batch,)).reshape((batch,) + (1,) * (ndim - 1))


def check(config, extra: ExtraConditioning) -> None:
  """A stream for a layer the UNet was built without is an error (it would be ignored)."""
  for stream, flag in (("ip_tokens", "ip_adapter"), ("adapter_tokens", "gated_adapter")):
    if getattr(extra, stream) is not None and not getattr(config, flag):
      raise ValueError(f"extra.{stream} given, but the UNet was built without its layers; set "
                       f"UNetConfig.{flag}=True (a method's unet_options) to use it")
