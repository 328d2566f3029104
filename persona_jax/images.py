"""Writing images: PNGs (atomically) and sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[N, H, W, 3] floats in [0, 1] -> uint8 (rounded as diffusers' numpy_to_pil)."""
  return (np.clip(np.asarray(images, np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
  """Writes one [H, W, 3] uint8 image atomically (convert/files.py's `atomic_write`)."""
  from persona_jax.convert.files import atomic_write
  with atomic_write(path, suffix=".png") as tmp:
    Image.fromarray(image).save(tmp, format="PNG")
  return Path(path)


MIN_GRID_TILE = 128


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2,
         upscale: int | None = None) -> np.ndarray:
  """[N, H, W, 3] uint8 -> one [rows*(S*H+pad)+pad, cols*(S*W+pad)+pad, 3] image on white, each
  image enlarged S times by pixel repetition. `upscale` S defaults to the least integer that
  makes the larger side at least MIN_GRID_TILE pixels (4 for the toy world's 32x32 images, 1
  from 128 up), so small samples stay visible; the single-image files keep their size."""
  n, h, w, c = images.shape
  s = upscale or max(1, math.ceil(MIN_GRID_TILE / max(h, w)))
  if s > 1:
    images = images.repeat(s, axis=1).repeat(s, axis=2)
    h, w = h * s, w * s
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, k = divmod(i, cols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
  return out
