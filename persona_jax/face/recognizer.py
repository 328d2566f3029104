"""The interface every face-recognition network is used through (ArcFace and its stand-in):
`Recognizer` embeds aligned crops, uint8 [N, S, S, 3] -> float32 [N, 512] raw embeddings, and
whole images' faces by their 5 keypoints (`align.norm_crop` onto its `template`); `cosine` is
identity similarity. `face.recognition.load_recognizer` reads one from disk."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from persona_jax.face import align


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


def padded_batches(apply, chunk: int = 256) -> Callable[[np.ndarray], np.ndarray]:
  """An `embed_fn` over `apply` (a jitted [B, S, S, 3] -> [B, D]): batches of at most `chunk`,
  each padded with zeros to a power of two, so a few shapes compile."""
  def embed_fn(x):
    out = []
    for i in range(0, len(x), chunk):
      part = x[i:i + chunk]
      padded = min(chunk, 1 << int(np.ceil(np.log2(len(part)))))
      full = np.concatenate([part, np.zeros((padded - len(part),) + part.shape[1:], part.dtype)])
      out.append(np.asarray(apply(full))[:len(part)])
    return np.concatenate(out)
  return embed_fn


def cosine(a, b) -> np.ndarray:
  """Row-wise cosine similarity of a [N, D] and b [N, D] -> [N] (a [D] and b [M, D] -> [M])."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)
  b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-12)
  return np.sum(a * b, axis=-1)
