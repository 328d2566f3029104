"""Sampling with LoRAs: several LoRA files merged into the base, each with a strength per block.

For a kernel W in block k (models/block_names.py) and LoRA files i = 0..n-1:
  W' = W + sum_i weights[i, k] * scale_i * reshape(a_i @ b_i, W.shape)
(a variant's file: its own update of W times weights[i, k], methods/lora_variants.py; DoRA's
is W_dora - W, each from the base W), with `weights` [n, n_blocks] over `all_blocks(unet_config)` (BASE = text encoder, IN00.., MID,
OUT00..): a LoRA's strength times its block weight, as sd-webui-lora-block-weight applies them
(methods.md 4.2). The weights are a traced argument of one jitted merge, so other strengths or
block weights never recompile it (nor the sampler: the merged tree keeps its shapes).

The command line spells one LoRA `FILE[:WEIGHT[:BLOCKS]]`, A1111's `<lora:FILE:WEIGHT:lbw=BLOCKS>`,
with BLOCKS either `NAME=VALUE,...` (other blocks 1) or the extension's 17 or 26 numbers (SD
1.x/2.x; its 12 "XL" or 20 "XL full" on SDXL). SDXL files of both tools merge (diffusers'
`text_encoder_2.`, kohya's `lora_te2_`: block BASE, like the first encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.convert.lora_formats import LoRAFactors
from persona_jax.models import block_names
from persona_jax.models.configs import UNetConfig


def block_weights(spec: str, unet_config: UNetConfig, field: str = "blocks") -> np.ndarray:
  """Per-block weights from a user string, over `all_blocks(unet_config)`. Three forms:
  `IN01=0,OUT03=0.5,MID=1` (names as `block_names.canonical`; blocks not named get 1), one
  number per block of the 26 or 17 preset in its order (`1,0,0,...`; 20 or 12 on SDXL; blocks
  outside the short list get 0, as the extension's `to26()` fills them), or a named preset of the
  extension (`MIDD`, `OUTALL`, ...; SD 1.x/2.x).

  Returns:
    [n_blocks] float32.
  """
  blocks = block_names.all_blocks(unet_config)
  if spec.strip().upper() in block_names.LBW_PRESETS:
    values = block_names.block_values(spec, unet_config, field)
    return np.asarray([values[b] for b in blocks], np.float32)
  entries = [e.strip() for e in spec.split(",")]
  out = dict.fromkeys(blocks, 1.0)

  def number(entry, text):
    value = _number(text)
    if value is None:
      raise ConfigError(f"{field}: '{entry}': '{text}' is not a number")
    return value

  if any("=" in e for e in entries):
    seen = set()
    for e in entries:
      name, eq, text = e.partition("=")
      if not eq:
        raise ConfigError(f"{field}: '{e}' is not NAME=VALUE (one form per list: names or "
                          "17/26 plain numbers)")
      name = block_names.canonical(name.strip(), unet_config, field)
      if name in seen:
        raise ConfigError(f"{field}: '{e}': block {name} is given twice")
      seen.add(name)
      out[name] = number(e, text.strip())
  else:
    orders = [block_names.preset(p, unet_config) for p in ("26", "17")]
    order = next((o for o in orders if len(o) == len(entries)), None)
    if order is None:
      raise ConfigError(f"{field}: {len(entries)} numbers; give {len(orders[0])} (BASE, IN.., MID, "
                        f"OUT..) or {len(orders[1])} (BASE and the attention blocks), or "
                        "NAME=VALUE pairs")
    out = dict.fromkeys(blocks, 0.0)
    out.update((b, number(e, e)) for b, e in zip(order, entries))
  return np.asarray([out[b] for b in blocks], np.float32)


@functools.partial(jax.jit, static_argnames=("unet_config",))
def merge_loras(kernels, loras: Sequence[LoRAFactors], weights, *, unet_config: UNetConfig):
  """The targeted kernels with the LoRAs merged in (float32 math, kernel dtype out).

  Args:
    kernels: {kernel path: W} for every path some LoRA targets.
    loras: n factor trees {kernel path: Factor} (their structure and shapes are static).
    weights: [n, n_blocks] float32, blocks as `all_blocks(unet_config)` (traced).
  Returns:
    {kernel path: W'}.
  """
  index = {b: k for k, b in enumerate(block_names.all_blocks(unet_config))}
  out = {}
  for path, w in kernels.items():
    block = block_names.param_block(path, unet_config)
    if block is None:
      raise ConfigError(f"LoRA target {path} is in no block (block weights cannot address it)")
    w32 = w.astype(jnp.float32)
    delta = jnp.zeros(w.shape, jnp.float32)
    for i, factors in enumerate(loras):
      if path in factors:
        delta += factors[path].update(w32, weights[i, index[block]])
    out[path] = (w32 + delta).astype(w.dtype)
  return out


def apply_loras(base_params, loras: Sequence[LoRAFactors], weights, unet_config: UNetConfig):
  """The base params with `loras` merged in by `merge_loras` (one compile per set of files;
  `weights` [n, n_blocks] is traced). Only the targeted kernels are new arrays: the rest of the
  tree is the base's own (a jit over the whole tree would copy every leaf)."""
  blocks = block_names.all_blocks(unet_config)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (len(loras), len(blocks)):
    raise ConfigError(f"LoRA weights {list(weights.shape)}: need [{len(loras)} LoRAs, "
                      f"{len(blocks)} blocks]")
  flat = tree.flatten(base_params)
  paths = sorted({p for factors in loras for p in factors})
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ConfigError(f"LoRA target {missing[0]} is not in the base params")
  flat.update(merge_loras({p: flat[p] for p in paths}, list(loras), weights, unet_config=unet_config))
  return tree.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """One `--lora FILE[:WEIGHT[:BLOCKS]]`."""
  path: Path
  weight: float = 1.0
  blocks: str | None = None          # NAME=VALUE,... or 17/26 numbers; None: all 1

  @classmethod
  def parse(cls, text: str) -> LoRASpec:
    """`FILE`, `FILE:WEIGHT` or `FILE:WEIGHT:BLOCKS`; an existing file is taken whole (its name
    may hold `:`). The file must exist (checked before the slow model load)."""
    head, _, last = text.rpartition(":")
    file, _, weight = head.rpartition(":")
    if Path(text).is_file():
      spec = cls(Path(text))
    elif file and last and _number(weight) is not None:
      spec = cls(Path(file), _number(weight), last)
    elif head and _number(last) is not None:
      spec = cls(Path(head), _number(last))
    elif head:
      raise ConfigError(f"--lora {text}: not a file, nor FILE:WEIGHT[:BLOCKS] with WEIGHT a number")
    else:
      spec = cls(Path(text))
    if not spec.path.is_file():
      raise ModelFileError(f"--lora {text}: {spec.path}: no such file")
    return spec


def _number(text: str) -> float | None:
  """A finite float, or None."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def with_loras(base_params, specs: Sequence[LoRASpec], unet_config: UNetConfig):
  """The base params with the LoRA files of `specs` merged in, each at its weight x blocks."""
  from persona_jax.convert.lora_formats import read_lora_file
  loras = [read_lora_file(s.path, base_params) for s in specs]
  weights = np.stack([
      s.weight * (block_weights(s.blocks, unet_config, f"--lora {s.path}: blocks") if s.blocks
                  else np.ones(len(block_names.all_blocks(unet_config)), np.float32))
      for s in specs])
  return apply_loras(base_params, loras, weights, unet_config)
