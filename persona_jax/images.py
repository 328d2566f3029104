"""Writing images: PNGs (atomically) and sample grids."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[N, H, W, 3] floats in [0, 1] -> uint8 (rounded as diffusers' numpy_to_pil)."""
  return (np.clip(np.asarray(images, np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
  """Writes one [H, W, 3] uint8 image: a temporary file in the same folder, then rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
  os.close(fd)
  try:
    Image.fromarray(image).save(tmp, format="PNG")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, 3] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] image on white."""
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, k = divmod(i, cols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
  return out
