"""Reading training images robustly, and the resize / crop / flip the methods use.

Every image becomes 8-bit RGB: EXIF orientation applied, grayscale expanded, palette and CMYK
converted, alpha composited onto white, 16-bit and float images scaled down. An unreadable or
truncated file is a `DataError` naming it; the caller decides what a folder does with files that
are not images at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from persona_jax.errors import PersonaError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(PersonaError):
  """A training image, caption or folder that cannot be used."""


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  if img.mode == "F":
    a = np.asarray(img, dtype=np.float64)
    top = 1.0 if a.max() <= 1.0 else 255.0
    return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  if img.mode == "P":
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA"):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")
  return img.convert("RGB")


def load_image(path: Path) -> np.ndarray:
  """[H, W, 3] uint8, upright and RGB, or a DataError naming the file."""
  try:
    with Image.open(path) as img:
      img.load()
      img = ImageOps.exif_transpose(img)
      rgb = _to_rgb(img)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: cannot read this image ({e}); fix or remove the file") from None
  if rgb.width < 8 or rgb.height < 8:
    raise DataError(f"{path}: image is {rgb.width}x{rgb.height}, too small to train on")
  return np.asarray(rgb, dtype=np.uint8)


def image_shape(path: Path) -> tuple[int, int]:
  """(H, W) of an image file, upright (EXIF orientation applied), without decoding its pixels."""
  try:
    with Image.open(path) as img:
      w, h = img.size
      orientation = img.getexif().get(0x0112, 1)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: cannot read this image ({e}); fix or remove the file") from None
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
  """A subject mask file (white = subject) as uint8 [H, W] (its gray level), or a DataError
  naming the file when it is unreadable or its size is not the image's `shape` (H, W)."""
  mask = load_image(path).mean(axis=-1).round().astype(np.uint8)
  if mask.shape != tuple(shape):
    raise DataError(f"{path}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{shape[1]}x{shape[0]}; a mask must have its image's size")
  return mask


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize so the shorter side is `size` (as the Textual Inversion/DreamBooth examples)."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  new = (max(size, round(w * scale)), max(size, round(h * scale)))
  if new == (w, h):
    return image
  return np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize to [height, width] (the image itself when it has that size)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def crop(image: np.ndarray, size, top: int, left: int) -> np.ndarray:
  """The [h, w] window at (top, left); `size` is a side or (h, w)."""
  h, w = _hw(size)
  return image[top: top + h, left: left + w]


def center_crop_offsets(image: np.ndarray, size) -> tuple[int, int]:
  """(top, left) of the middle [h, w] window (`size`: a side or (h, w))."""
  h, w = _hw(size)
  return (image.shape[0] - h) // 2, (image.shape[1] - w) // 2


def center_crop(image: np.ndarray, size) -> np.ndarray:
  """The [h, w] middle (`size`: a side or (h, w)) of an image at least that large."""
  return crop(image, size, *center_crop_offsets(image, size))


def load_square(path: Path, size: int) -> np.ndarray:
  """An image file decoded, its shorter side resized to `size`, center-cropped: uint8
  [size, size, 3]."""
  return center_crop(resize_shorter_side(load_image(path), size), size)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def zoom(image: np.ndarray, size: int, scale: int, top: int, left: int, factor: int):
  """Custom Diffusion's zoom augmentation of a square image (Kumari et al. 2023, App. E).

  The image is resized to `scale` x `scale`; zooming in (scale > size) crops `size` x `size` at
  (top, left) from it, zooming out pastes it at (top, left) on a zero canvas (mid-grey in model
  range). `top`/`left` must lie in [0, |scale - size|].

  Args:
    image: uint8 [H, W, 3] (resized to scale x scale whatever its shape).
    size: output side; factor: the VAE's downsampling factor (the mask is at latent resolution).
  Returns:
    (float32 [size, size, 3] in [-1, 1], float32 [size // factor, size // factor, 1] mask: 1 where
    the loss counts: everything when zoomed in, else the pasted square shrunk by one latent pixel
    on each side).
  """
  resized = np.asarray(Image.fromarray(image).resize((scale, scale), Image.Resampling.BICUBIC))
  m = size // factor
  if scale > size:
    return to_model_range(crop(resized, size, top, left)), np.ones((m, m, 1), np.float32)
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[top: top + scale, left: left + scale] = to_model_range(resized)
  mask = np.zeros((m, m, 1), np.float32)
  mask[top // factor + 1: (top + scale) // factor - 1,
       left // factor + 1: (left + scale) // factor - 1] = 1.0
  return canvas, mask
