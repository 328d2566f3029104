"""The interface every face-recognition network is used through (ArcFace and its stand-in).

A `Recognizer` embeds aligned crops: uint8 [N, S, S, 3] -> float32 [N, 512], raw as ArcFace's
output (not unit-normalized; its norm says how face-like and sharp the crop is, its direction
who it is). `embed_faces` aligns faces of a whole image by their 5 keypoints (`align.norm_crop`
onto the network's `template`) and embeds them. Identity similarity is the cosine of two
embeddings; `threshold`, where the network has one, is the cosine above which two faces are
called the same person.

`load_recognizer(path)` reads a folder with config.json naming its "architecture" (the toy
world's `toy_identity_encoder`); insightface's ONNX models come with face analysis.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.face import align

# architecture name in config.json -> module whose load(folder) returns a Recognizer
ARCHITECTURES = {"toy_identity_encoder": "persona_jax.world.toy_identity_encoder"}


@dataclasses.dataclass(frozen=True, eq=False)
class Recognizer:
  """A face-recognition network: `embed_fn` maps float32 [N, S, S, 3] (0..255) aligned crops
  to [N, D] raw embeddings; `template` [5, 2] is where alignment puts the keypoints (crop
  pixels, `align`'s convention)."""
  name: str
  input_size: int
  template: np.ndarray
  embed_fn: Callable[[np.ndarray], np.ndarray]
  threshold: float | None = None
  config: dict = dataclasses.field(default_factory=dict)

  def embed(self, aligned) -> np.ndarray:
    """uint8 [N, S, S, 3] aligned crops -> float32 [N, D] raw embeddings."""
    aligned = np.asarray(aligned)
    s = self.input_size
    if aligned.ndim != 4 or aligned.shape[1:] != (s, s, 3):
      raise ValueError(f"{self.name} embeds aligned crops [N, {s}, {s}, 3], got {aligned.shape}")
    if len(aligned) == 0:
      return np.zeros((0, int(self.config.get("embedding", 512))), np.float32)
    return np.asarray(self.embed_fn(aligned.astype(np.float32)), np.float32)

  def align(self, image, keypoints) -> np.ndarray:
    """uint8 [n, S, S, 3]: the faces of image [H, W, 3] with keypoints [n, 5, 2], aligned."""
    keypoints = np.asarray(keypoints, np.float32).reshape(-1, 5, 2)
    return np.stack([align.norm_crop(image, k, self.input_size, self.template) for k in keypoints]
                    ) if len(keypoints) else np.zeros((0, self.input_size, self.input_size, 3), np.uint8)

  def embed_faces(self, image, keypoints) -> np.ndarray:
    """float32 [n, D]: the faces of image [H, W, 3] with keypoints [n, 5, 2] aligned, embedded."""
    return self.embed(self.align(np.asarray(image), keypoints))


def cosine(a, b) -> np.ndarray:
  """Row-wise cosine similarity of a [N, D] and b [N, D] -> [N] (a [D] and b [M, D] -> [M])."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)
  b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-12)
  return np.sum(a * b, axis=-1)


def load_recognizer(path) -> Recognizer:
  """The recognizer saved at `path`: a folder with config.json whose "architecture" is one of
  ARCHITECTURES (and its weights)."""
  path = Path(path)
  if path.suffix.lower() == ".onnx":
    raise ConfigError(f"{path}: ONNX recognition models (insightface's w600k_r50.onnx, "
                      "glintr100.onnx) are not supported yet; they arrive with face analysis")
  expected = (f"expected a folder with config.json whose \"architecture\" is one of "
              f"{', '.join(sorted(ARCHITECTURES))}, and model.safetensors")
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"{path}: not a face-recognition model; {expected}")
  try:
    architecture = json.loads(config_file.read_text(encoding="utf-8")).get("architecture")
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise ConfigError(f"{config_file}: not a readable JSON object ({e}); {expected}") from None
  if architecture not in ARCHITECTURES:
    raise ConfigError(f"{config_file}: architecture {architecture!r} is not a face-recognition "
                      f"model persona_jax knows; {expected}")
  return importlib.import_module(ARCHITECTURES[architecture]).load(path)


def shipped_toy_dir() -> Path:
  import importlib.resources
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "toy_identity_encoder"))


@functools.lru_cache(maxsize=1)
def shipped_toy_recognizer() -> Recognizer:
  """The toy world's identity encoder shipped in assets/toy_identity_encoder/ (ArcFace's stand-in)."""
  return load_recognizer(shipped_toy_dir())


__all__ = ["Recognizer", "cosine", "load_recognizer", "shipped_toy_recognizer", "ARCHITECTURES"]
