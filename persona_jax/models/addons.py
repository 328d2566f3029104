"""UNet add-ons: the default-off layers and behaviours a method switches on, and the conditioning
streams they read.

A UNet's add-ons are one value, `UNetConfig.addons`: a tuple of the frozen dataclasses below
(hashable, part of the static config). The UNet calls every add-on at fixed plug points, and an
add-on implements the ones it needs (the base class's are the identity), so a new add-on or a new
stream adds no branch to the blocks:

  time_embedding(temb, streams)              the time embedding [B, T] (SDXL's added text/time
                                             embedding enters here)
  block_output(where, x, streams)            each skip the down path leaves for the up path, the
                                             mid block's output and each up block's output
                                             (ControlNet's down/mid residuals enter here)
  before_cross_attention(place, x, streams)  inside every transformer block, between attn1 and
                                             attn2 (InstantBooth's gated self-attention)
  cross_attention_options(place)             static options of that block's attn2 (Custom
                                             Diffusion's detached BOS key/value, attention maps)
  cross_attention_branches(place, streams)   added attentions sharing attn2's queries and output
                                             projection (IP-Adapter's decoupled cross-attention)

Streams are a dict {name: array} the UNet takes beside the text context (`streams=`; a pytree:
jit and the sampler's cond/uncond concatenation see its arrays). Each add-on names the streams it
reads (`reads`); a stream no add-on of the UNet reads is an error (it would be silently ignored),
and an add-on whose stream is absent computes nothing: the base model exactly.

Where new parameters live (one rule for every method): a layer the UNet computes keeps its params
inside the UNet's tree, under the module it extends (`unet/.../attn2/to_k_ip`,
`unet/.../transformer_blocks_0/adapter`), so the UNet's own init creates them and a base
checkpoint loads around them (`init_added_params`); everything else a method adds (weight-space
factors and offsets, token rows, encoders, projections) lives under the method's own top-level key
(`lora/`, `e4t/`, `tokens`, `ip_adapter/`, `instantbooth/`, `fastcomposer/`), with the path of
the weight it modifies below that key when it modifies one (`lora/unet/.../to_q/{a,b}`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

from persona_jax.models import adapters

IP_TOKENS, IP_SCALE = "ip_tokens", "ip_scale"
ADAPTER_TOKENS, ADAPTER_SCALE = "adapter_tokens", "adapter_scale"


class Where(NamedTuple):
  """A block-output plug point: kind "down" (a skip: `layer` is its index among the block's
  skips, the downsampler's last; block -1 is conv_in's), "mid" or "up" (a block's output)."""
  kind: str
  block: int = 0
  layer: int = 0


class Place(NamedTuple):
  """A transformer block inside the UNet: the transformer's path (`down_blocks_1/attentions_0`,
  `mid_block/attentions_0`), the block's width and heads, the UNet's config."""
  path: str
  dim: int
  heads: int
  config: Any


@dataclasses.dataclass(frozen=True)
class Addon:
  """The identity at every plug point; subclasses override the ones they use."""
  reads: ClassVar[tuple[str, ...]] = ()

  def check(self, config) -> None:
    """Raises ConfigError when the add-on does not fit the UNet (called once per UNet call)."""

  def time_embedding(self, temb, streams):
    return temb

  def block_output(self, where: Where, x, streams):
    return x

  def before_cross_attention(self, place: Place, x, streams):
    return x

  def cross_attention_options(self, place: Place) -> dict:
    return {}

  def cross_attention_branches(self, place: Place, streams) -> tuple:
    return ()


@dataclasses.dataclass(frozen=True)
class DetachContextTokens(Addon):
  """Custom Diffusion: every attn2's keys and values of the first `n` context tokens (BOS) carry
  no gradient; the forward is unchanged."""
  n: int = 1

  def cross_attention_options(self, place):
    return {"detach_context_tokens": self.n}


@dataclasses.dataclass(frozen=True)
class AttentionMaps(Addon):
  """FastComposer's localization loss: the attn2 of the named blocks (block names of
  `models.block_names`: IN04, MID, OUT03, ...) sow their maps (models/attention_maps.py)."""
  blocks: tuple[str, ...] = ()

  def check(self, config):
    from persona_jax.models.attention_maps import asked_blocks
    asked_blocks(config, self.blocks)                 # unknown block names fail here

  def cross_attention_options(self, place):
    from persona_jax.models.attention_maps import reports_maps
    return {"attention_maps": reports_maps(place.config, self.blocks, place.path)}


@dataclasses.dataclass(frozen=True)
class DecoupledCrossAttention(Addon):
  """IP-Adapter: every attn2 also attends to the image tokens (`ip_tokens` [B, N, D], scaled by
  `ip_scale`, scalar or [B], default 1) with its own keys and values (`attn2/to_k_ip`,
  `attn2/to_v_ip`; models/adapters.py)."""
  reads: ClassVar[tuple[str, ...]] = (IP_TOKENS, IP_SCALE)

  def cross_attention_branches(self, place, streams):
    tokens = streams.get(IP_TOKENS)
    if tokens is None:
      return ()
    c = place.config
    return (adapters.DecoupledAttention(tokens.astype(c.dtype), streams.get(IP_SCALE), place.heads,
                                        place.dim // place.heads, c.upcast_attention, c.attention,
                                        c.dtype, c.param_dtype),)


@dataclasses.dataclass(frozen=True)
class GatedAdapter(Addon):
  """InstantBooth: a gated self-attention over the visual tokens and `adapter_tokens` [B, P, Dp]
  (scaled by `adapter_scale`, beta) between attn1 and attn2 of every transformer block
  (`.../transformer_blocks_k/adapter`; models/adapters.py)."""
  reads: ClassVar[tuple[str, ...]] = (ADAPTER_TOKENS, ADAPTER_SCALE)

  def before_cross_attention(self, place, x, streams):
    tokens = streams.get(ADAPTER_TOKENS)
    if tokens is None:
      return x
    c = place.config
    return adapters.GatedSelfAttention(place.dim, place.heads, c.upcast_attention, c.attention,
                                       c.dtype, c.param_dtype, name="adapter")(
                                           x, tokens.astype(c.dtype), streams.get(ADAPTER_SCALE))


def check_streams(config, streams) -> None:
  """A stream that no add-on of the UNet reads is an error (it would be ignored)."""
  read = {name for addon in config.addons for name in addon.reads}
  unread = sorted(set(streams) - read)
  if unread:
    raise ValueError(f"streams['{unread[0]}'] given, but no add-on of this UNet reads it "
                     f"(add-ons: {[type(a).__name__ for a in config.addons]}); build the UNet "
                     "with the method's add-ons (Method.unet)")


def captures_maps(config) -> bool:
  """Whether the UNet's attn2 layers report attention maps (an `AttentionMaps` add-on with blocks)."""
  return any(isinstance(a, AttentionMaps) and a.blocks for a in config.addons)

