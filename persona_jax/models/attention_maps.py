"""Cross-attention probability maps of chosen UNet blocks (FastComposer's localization loss).

Ask with the UNet add-on `AttentionMaps` (models/addons.py; block names of `block_names`: IN01,
MID, OUT03, ...; every attn2 inside an asked block reports) and read with a mutable collection:

  unet = UNet2DConditionModel(dataclasses.replace(config, addons=(AttentionMaps(("IN04", "MID")),)))
  out, state = unet.apply({"params": p}, x, t, ctx, mutable=[ATTENTION_MAPS])
  maps = collect(state, unet.config, x.shape[1:3])     # {attn2 path: [B, h, w, L]}

Each map is the softmax over the context tokens, averaged over heads (float32; FastComposer's
balanced L1 loss is linear in the map, so its per-head mean equals the loss of the head mean),
computed with an explicit einsum beside the attention kernel: the UNet's output is the same
whether or not maps are asked, and nothing is computed unless the collection is mutable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from persona_jax.errors import ConfigError
from persona_jax.models import block_names
from persona_jax.models.configs import UNetConfig

ATTENTION_MAPS = "attention_maps"     # the flax collection the attn2 layers sow into


def head_mean_probs(q, k, *, scale: float):
  """Softmax(q k^T * scale) averaged over heads. q: [B, T, N, H], k: [B, S, N, H] -> [B, T, S]."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  return jax.nn.softmax(logits, axis=-1).mean(axis=1)                       # [B, T, S]


@functools.lru_cache(maxsize=None)
def asked_blocks(config: UNetConfig, blocks: tuple[str, ...]) -> frozenset[str]:
  """The canonical names of `blocks`, checked: each must hold a cross-attention."""
  names = {block_names.canonical(n, config, "attention_maps") for n in blocks}
  with_attention = set(block_names.attention_blocks(config)) - {block_names.BASE}
  bad = sorted(names - with_attention)
  if bad:
    raise ConfigError(f"attention_maps: block '{bad[0]}' has no cross-attention (blocks with one: "
                      f"{', '.join(sorted(with_attention))})")
  return frozenset(names)


def reports_maps(config: UNetConfig, blocks: tuple[str, ...], path: str) -> bool:
  """Whether the transformer at `path` (`down_blocks_1/attentions_0`, `mid_block/attentions_0`)
  reports its maps when `blocks` are asked."""
  if not blocks:
    return False
  return block_names.unet_block(path + "/", config) in asked_blocks(config, blocks)


def feature_size(config: UNetConfig, path: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
  """(h, w) of the feature map at a UNet path, for latents of size `latent_hw` (each downsampler
  halves, rounding up; an up level has the size of its down level)."""
  n = len(config.block_out_channels)
  top = path.split("/", 1)[0]
  if top == "mid_block":
    level = n - 1
  else:
    side, index = top.rsplit("_", 1)
    level = int(index) if side == "down_blocks" else n - 1 - int(index)
  h, w = latent_hw
  for _ in range(level):
    h, w = -(-h // 2), -(-w // 2)
  return h, w


def collect(state, config: UNetConfig, latent_hw: tuple[int, int]) -> dict[str, jax.Array]:
  """The maps of one UNet call, in forward order.

  Args:
    state: the mutable variables `apply(..., mutable=[ATTENTION_MAPS])` returned (or their
      ATTENTION_MAPS entry).
    latent_hw: (H, W) of the latents the UNet was called on.
  Returns:
    {path of the attn2 layer ("down_blocks_1/attentions_0/transformer_blocks_0/attn2"):
     [B, h, w, L] float32 probabilities over the L context tokens}; `block_names.unet_block(path,
     config)` names its block.
  """
  tree = state.get(ATTENTION_MAPS, state)
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if key == "probs":
        b, t, s = value.shape
        h, w = feature_size(config, prefix, latent_hw)
        out[prefix] = value.reshape(b, h, w, s)
      else:
        walk(value, f"{prefix}/{key}" if prefix else key)
  walk(tree, "")
  return out
