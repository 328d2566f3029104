"""The toy identity encoder's network (the stand-in for ArcFace; trained by
`world/toy_identity_encoder.py`) and its files: a small CNN from aligned 32x32 crops to 512 raw
numbers, saved as config.json (architecture, input size, alignment template, threshold, training
facts) and model.safetensors (float16), loaded as a `face.recognizer.Recognizer`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.face.recognizer import Recognizer, padded_batches

ARCHITECTURE = "toy_identity_encoder"
INPUT_SIZE = 32


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  widths: tuple[int, ...] = (16, 32, 64, 128)
  embedding: int = 512


class IdentityEncoder(nn.Module):
  """Aligned crops [B, 32, 32, 3] (float, 0..255) -> raw embeddings [B, embedding]."""
  config: EncoderConfig = EncoderConfig()

  @nn.compact
  def __call__(self, images):
    widths = self.config.widths
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = nn.silu(nn.GroupNorm(8, name="stem_norm")(nn.Conv(widths[0], (3, 3), name="stem")(x)))
    for i, w in enumerate(widths[1:]):                  # 32 -> 16 -> 8 -> 4
      x = nn.silu(nn.GroupNorm(8, name=f"down_norm{i}")(
          nn.Conv(w, (3, 3), strides=2, name=f"down{i}")(x)))
      x = nn.silu(nn.GroupNorm(8, name=f"norm{i}")(nn.Conv(w, (3, 3), name=f"conv{i}")(x)))
    return nn.Dense(self.config.embedding, name="embed")(x.reshape(x.shape[0], -1))


def recognizer(encoder_params, config: EncoderConfig, template, threshold=None, info=None,
               chunk: int = 256) -> Recognizer:
  """A `Recognizer` over encoder params (batches padded to a power of two up to `chunk`, so a
  few shapes compile)."""
  apply = jax.jit(lambda p, x: IdentityEncoder(config).apply({"params": p}, x))
  embed_fn = padded_batches(lambda x: apply(encoder_params, jnp.asarray(x)), chunk)
  return Recognizer(ARCHITECTURE, INPUT_SIZE, np.asarray(template, np.float32), embed_fn, threshold,
                    {"embedding": config.embedding, **(info or {})})


def save(folder, encoder_params, config: EncoderConfig, template, threshold=None,
         facts=None) -> Path:
  """Writes FOLDER/config.json (architecture, input size, template, threshold, `facts`) and
  FOLDER/model.safetensors (the encoder, float16)."""
  from persona_jax.convert.files import write_json, write_safetensors
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  flat = {p: np.asarray(v, np.float16) for p, v in tree.flatten(encoder_params).items()}
  write_safetensors(folder / "model.safetensors", flat, {"format": "persona_jax-toy-identity-encoder"})
  write_json(folder / "config.json", {
      "architecture": ARCHITECTURE, "input_size": INPUT_SIZE, "template": np.asarray(template).tolist(),
      "widths": list(config.widths), "embedding": config.embedding, "threshold": threshold,
      **(facts or {})})
  return folder


def load(folder) -> Recognizer:
  """The recognizer saved in `folder` (float32 weights)."""
  from persona_jax.convert.files import read_safetensors
  folder = Path(folder)
  raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
  config = EncoderConfig(tuple(raw["widths"]), int(raw["embedding"]))
  params = tree.unflatten({p: jnp.asarray(v, jnp.float32)
                           for p, v in read_safetensors(folder / "model.safetensors").items()})
  info = {k: v for k, v in raw.items() if k not in ("threshold",)}
  return recognizer(params, config, raw["template"], raw.get("threshold"), info)
