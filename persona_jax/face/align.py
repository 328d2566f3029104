"""insightface's 5-point face alignment (`face_align.norm_crop`), in numpy.

A least-squares similarity (Umeyama, as skimage's `SimilarityTransform.estimate`) takes the five
keypoints (left eye, right eye, nose tip, left and right mouth corners) onto a template in crop
pixels, and the image is warped through it with bilinear sampling and a zero border, as
`cv2.warpAffine(image, M, (size, size), borderValue=0.0)` does.

Coordinates are cv2's (and insightface's detectors'): x to the right, y down, the centre of pixel
(row i, column j) at (j, i). The toy world's keypoints (`world.identities.keypoints`) put pixel
centres at (j + 0.5, i + 0.5): subtract 0.5 before aligning with them.
"""

from __future__ import annotations

import numpy as np

ARCFACE_TEMPLATE_112 = np.asarray([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                   [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def arcface_template(size: int = 112) -> np.ndarray:
  """insightface's template [5, 2] for a size x size crop: scaled from 112 when size is a
  multiple of 112, else from 128 with an 8-pixel (at 128) shift to the right."""
  if size % 112 == 0:
    return ARCFACE_TEMPLATE_112 * np.float32(size / 112)
  ratio = size / 128
  return (ARCFACE_TEMPLATE_112 * ratio + np.asarray([8 * ratio, 0.0])).astype(np.float32)


def similarity_transform(src, dst) -> np.ndarray:
  """float64 [2, 3] M: the similarity (scale, rotation, shift; no reflection) taking src [n, 2]
  onto dst [n, 2] in least squares, M @ [x, y, 1] ~ dst (Umeyama 1991)."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
    raise ValueError(f"similarity_transform needs two [n, 2] point sets, got {src.shape} and {dst.shape}")
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  cov = dst_c.T @ src_c / len(src)
  d = np.ones(2)
  if np.linalg.det(cov) < 0:
    d[1] = -1.0
  u, s, vt = np.linalg.svd(cov)
  rank = np.linalg.matrix_rank(cov)
  if rank == 0:
    return np.full((2, 3), np.nan)
  if rank == 1:                     # collinear points: skimage's choice, a rotation either way
    rotation = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
  else:
    rotation = u @ np.diag(d) @ vt
  scale = (s @ d) / src_c.var(0).sum()
  shift = dst_mean - scale * rotation @ src_mean
  return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def warp_affine(image, matrix, size: int) -> np.ndarray:
  """[size, size, ...] of image [H, W, ...] (uint8 or float) warped by `matrix` [2, 3] (source
  pixel -> output pixel, cv2's forward map): output pixel p samples the image at M^-1 p,
  bilinearly, with zeros outside the image. uint8 in, uint8 out (rounded); float in, float32 out."""
  image = np.asarray(image)
  m = np.asarray(matrix, np.float64)
  inverse = np.linalg.inv(m[:, :2])
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  out_points = np.stack([xx.ravel(), yy.ravel()]) - m[:, 2:]        # [2, size * size]
  sx, sy = inverse @ out_points
  x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
  fx, fy = sx - x0, sy - y0
  h, w = image.shape[:2]
  flat = image.reshape(h * w, -1).astype(np.float32)
  out = np.zeros((size * size, flat.shape[1]), np.float32)
  for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                         (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
    x, y = x0 + dx, y0 + dy
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    index = np.where(inside, y * w + x, 0)
    out += flat[index] * (weight * inside)[:, None].astype(np.float32)
  out = out.reshape((size, size) + image.shape[2:])
  if image.dtype == np.uint8:
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
  return out


def norm_crop(image, keypoints, size: int = 112, template=None) -> np.ndarray:
  """The aligned [size, size, 3] crop of image [H, W, 3] whose keypoints [5, 2] land on
  `template` [5, 2] (crop pixels; default insightface's `arcface_template(size)`)."""
  template = arcface_template(size) if template is None else template
  return warp_affine(image, similarity_transform(keypoints, template), size)


__all__ = ["ARCFACE_TEMPLATE_112", "arcface_template", "similarity_transform", "warp_affine",
           "norm_crop"]
