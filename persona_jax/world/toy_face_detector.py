"""The toy world's face detector: finds identities (`world.identities`) in an image and their 5
keypoints, with `face.detection.FaceDetector`'s interface, so `face.analysis.FaceAnalysis` runs on
toy images as on photos (`toy_face_analysis`, or `load_face_analysis("toy")`).

No learning and no knowledge of identities: it sees one image and knows the world's backgrounds,
shapes and pose range (what a detector trained on the world would know), nothing of marks.

1. Background: every background of the world (plain colours; grass, sand, brick and water
   textures) lies on a segment of RGB space between two colours. The segment is the one of the
   world's backgrounds most of the border ring lies near (an object may touch the border), refitted
   to those ring pixels (generated images drift); a pixel's distance to it is its contrast, above
   max(MIN_CONTRAST, NOISE_FACTOR x the ring's own 90th percentile) it is object.
2. Objects: the 8-connected regions of object pixels, holes filled (a mark or pattern colour
   close to the background), those under MIN_AREA of the image dropped. Each region's soft
   coverage is 1 inside and, on its edge, the fraction of a nearby object colour in the pixel's
   mix with the background (the renderer box-filters edges), so its moments are sub-pixel.
3. Fit, for every class: its silhouette is its unit shape (`scenes.shape_mask`) moved by an
   affine map A = radius x rotation(pose) x proportions (width/height, area kept) and a shift.
   The pose comes from the whitened region's characteristic complex moment (order 4 for the box,
   5 for the star and flower, the third-order z^2 z* for the heart), the candidate nearest
   upright (the world's poses are within +-0.5 rad, under half of each shape's symmetry), or from
   the covariance's axes (the ball; the heart once elongated, its third-order moment being noisy
   on few pixels). Radius and proportions follow from the covariance along the pose's axes, the
   centre from the mean (the heart's centroid is off its centre). The class is the one whose
   fitted silhouette overlaps the coverage best; that soft IoU is the detection score (MIN_SCORE).
4. Keypoints: `identities.KEYPOINT_TEMPLATE` through the fitted map, in insightface's pixel
   convention (pixel centres at whole numbers, as `toy_identity_encoder.face_keypoints`).
   Boxes are the regions' pixel bounds. Several objects (pair scenes) are all returned, highest
   score first.

The ball's silhouette is an ellipse: its pose shows only through its proportions. Its width axis
is the covariance axis nearest horizontal; when the region is nearly round (axes ratio under
ROUND_ASPECT) the pose is shrunk toward upright in proportion, so a round ball is reported
upright and its mark may sit turned by up to the world's 0.5 rad in the aligned crop (the
heart, nearly round, falls back on its third-order moment the same way).

Measured (`detection_figures`, docs/toy_world.md): on rendered held-out scenes keypoints are off
by ~0.07 pixel on average; blur inflates the fitted size (~4% at a 0.7-pixel Gaussian), noise
loses objects whose colour is close to the background (green on grass, brown on brick).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from persona_jax.face.analysis import register_named_analysis
from persona_jax.face.detection import Detections
from persona_jax.world import identities, scenes

MIN_CONTRAST = 12.0           # RGB distance to the background segment that is surely object
NOISE_FACTOR = 2.5            # x the background's 90th percentile distance: surely object
MIN_AREA = 0.012              # of the image: ~12 pixels at 32x32 (the smallest object has ~20)
MIN_SCORE = 0.5               # soft IoU of the best class's fitted silhouette
# from this elongation (covariance axes ratio) on, the ball's and the heart's axes are their pose;
# below it they only weigh in (measured on held-out scenes; the heart's third-order moment is noisy)
ROUND_ASPECT = {"ball": 1.02, "heart": 1.1}
BORDER = 1 / 16               # the border ring's width, of the image side (2 pixels at 32)
RING_SAMPLES = 48             # ring colours whose pairs are the candidate segments
_ORDERS = {"box": (4, 0), "star": (5, 0), "flower": (5, 0), "heart": (2, 1)}   # z^p conj(z)^q


@dataclasses.dataclass(frozen=True)
class ClassShape:
  """A class's unit silhouette (radius 1, upright, proportions 1): area, centroid [2] (u, v),
  covariance [2, 2] and its square root, and its whitened characteristic complex moment."""
  area: float
  centroid: np.ndarray
  covariance: np.ndarray
  root: np.ndarray
  moment: complex


def _sqrtm(c) -> np.ndarray:
  values, vectors = np.linalg.eigh(c)
  return (vectors * np.sqrt(np.maximum(values, 1e-12))) @ vectors.T


def _complex_moment(z, w, cls) -> complex:
  p, q = _ORDERS[cls]
  return complex(np.sum(w * z ** p * np.conj(z) ** q) / np.sum(w))


@functools.lru_cache(maxsize=None)
def class_shape(cls: str) -> ClassShape:
  """The unit silhouette's moments, on a fine grid."""
  grid = (np.arange(800) + 0.5) / 400 - 1.0
  v, u = np.meshgrid(grid * 1.3, grid * 1.3, indexing="ij")
  mask = scenes.shape_mask(cls, u, v).astype(np.float64)
  points = np.stack([u[mask > 0], v[mask > 0]], -1)
  centroid = points.mean(0)
  covariance = np.cov(points.T, bias=True)
  root = _sqrtm(covariance)
  moment = 0j
  if cls in _ORDERS:
    white = (points - centroid) @ np.linalg.inv(root).T
    moment = _complex_moment(white[:, 0] + 1j * white[:, 1], np.ones(len(white)), cls)
  return ClassShape(float(mask.mean() * (2.6 ** 2)), centroid, covariance, root, moment)


def _segment_distances(pixels, start, step) -> np.ndarray:
  """[m, n]: distances of pixels [n, 3] to m segments start [m, 3] -> start + step [m, 3]."""
  length2 = np.maximum((step ** 2).sum(-1), 1e-9)[:, None]
  t = np.clip(np.einsum("nc,mc->mn", pixels, step) - (start * step).sum(-1)[:, None], 0,
              length2) / length2
  return np.linalg.norm(pixels[None] - start[:, None] - t[..., None] * step[:, None], axis=-1)


def _world_backgrounds() -> tuple[np.ndarray, np.ndarray]:
  """(start [m, 3], step [m, 3]): the world's backgrounds as RGB segments (a plain colour is one
  of length 0, a texture the segment between its two colours)."""
  ends = [(scenes.COLOURS[b], scenes.COLOURS[b]) if b in scenes.COLOURS else scenes.TEXTURES[b]
          for b in scenes.BACKGROUNDS]
  a, b = np.asarray(ends, np.float64).transpose(1, 0, 2)
  return a, b - a


def background_segment(image: np.ndarray):
  """(origin [3], direction [3], (lo, hi), noise): the background as a segment of RGB space, and
  the 90th percentile of its pixels' distances to it. Of the world's backgrounds, the one most
  of the border ring image [H, W, 3] lies near (within 2, else 4, else 8 x MIN_CONTRAST, until
  one explains half the ring: generated images drift); when none does, the segment between two
  ring colours that explains most. Then the principal line of the ring pixels near it, between
  their extreme projections."""
  h, w = image.shape[:2]
  b = max(1, int(round(BORDER * min(h, w))))
  ring = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                         image[b:-b, :b].reshape(-1, 3), image[b:-b, -b:].reshape(-1, 3)])
  world = _segment_distances(ring, *_world_backgrounds())
  for tolerance in (2, 4, 8):
    near = world < tolerance * MIN_CONTRAST
    if near.sum(1).max() >= len(ring) / 2:
      break
  else:
    ends = ring[np.linspace(0, len(ring) - 1, min(len(ring), RING_SAMPLES)).astype(int)]
    i, j = np.triu_indices(len(ends))
    near = _segment_distances(ring, ends[i], ends[j] - ends[i]) < MIN_CONTRAST
  inliers = ring[near[np.argmax(near.sum(1))]]
  origin = inliers.mean(0)
  spread = inliers - origin
  direction = np.linalg.svd(spread, full_matrices=False)[2][0] if len(inliers) > 1 else np.eye(3)[0]
  along = spread @ direction
  segment = (origin, direction, (float(along.min()), float(along.max())))
  return (*segment, float(np.percentile(contrast(inliers, *segment), 90)))


def contrast(pixels, origin, direction, span) -> np.ndarray:
  """Distances of pixels [..., 3] to the background segment."""
  t = np.clip((pixels - origin) @ direction, *span)
  return np.linalg.norm(pixels - origin - t[..., None] * direction, axis=-1)


def coverage(region: np.ndarray, pixels: np.ndarray, origin, direction) -> np.ndarray:
  """float32 [H, W]: soft coverage of one region (bool [H, W]) of image pixels [H, W, 3]: 1
  inside (its eroded mask), and on a one-pixel band either side of its edge the fraction alpha
  of the best mix p = alpha o + (1 - alpha) (origin + beta direction) of an object colour o
  seen nearby (an inside pixel within 2 pixels, else any of the region's) and the background's
  line (the renderer box-filters edges; the nearest object colour, not the most contrasting,
  so a pattern's duller colour on the edge counts in full)."""
  h, w = region.shape
  inside = ndimage.binary_erosion(region, np.ones((3, 3)), border_value=0)
  band = ndimage.binary_dilation(region, np.ones((3, 3))) & ~inside
  out = inside.astype(np.float32)
  ys, xs = np.nonzero(band)
  dy, dx = (a.reshape(-1) for a in np.mgrid[-2:3, -2:3])
  cy, cx = np.clip(ys[:, None] + dy, 0, h - 1), np.clip(xs[:, None] + dx, 0, w - 1)   # [n, 25]
  usable = np.where(inside[cy, cx].any(1, keepdims=True), inside[cy, cx], region[cy, cx])
  objects = pixels[cy, cx] - origin                                                    # [n, 25, 3]
  seen = pixels[ys, xs] - origin                                                       # [n, 3]
  # least squares of seen = alpha * object + beta * direction, per candidate object colour
  oo = (objects ** 2).sum(-1)
  od = objects @ direction
  os_ = np.einsum("nkc,nc->nk", objects, seen)
  ds = (seen @ direction)[:, None]
  det = np.maximum(oo - od ** 2, 1e-9)
  alpha = (os_ - od * ds) / det
  beta = ds - alpha * od
  residual = np.linalg.norm(seen[:, None] - alpha[..., None] * objects
                            - beta[..., None] * direction, axis=-1)
  residual = np.where(usable, residual, np.inf)
  best = np.argmin(residual, 1)
  value = np.clip(alpha[np.arange(len(ys)), best], 0.0, 1.0)
  out[ys, xs] = np.where(np.isfinite(residual.min(1)), value, 0.0)
  return out


def _rotation(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.asarray([[c, -s], [s, c]])


def _pose(a: np.ndarray) -> float:
  """The rotation angle of an affine map A = r R D (D diagonal)."""
  return float(np.arctan2(a[1, 0], a[0, 0]))


def fit_class(cls: str, xy: np.ndarray, w: np.ndarray):
  """(centre [2], A [2, 2]) of `cls` fitted to a region's coverage w [n] at pixel centres xy
  [n, 2] (module docstring, step 3)."""
  shape = class_shape(cls)
  total = w.sum()
  mean = (w[:, None] * xy).sum(0) / total
  d = xy - mean
  cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / total + np.eye(2) / 12
  turn = 0.0                        # the ball: no sign of its pose but its proportions
  if cls in _ORDERS:
    root = _sqrtm(cov)
    white = d @ np.linalg.inv(root).T
    seen = _complex_moment(white[:, 0] + 1j * white[:, 1], w, cls)
    p, q = _ORDERS[cls]
    base = (np.angle(seen) - np.angle(shape.moment)) / (p - q)
    turn = min((_pose(root @ _rotation(base + 2 * np.pi * k / (p - q)) @ np.linalg.inv(shape.root))
                for k in range(p - q)), key=abs)
  turn = float(np.clip(turn, -identities.MAX_POSE, identities.MAX_POSE))
  if cls in ROUND_ASPECT:
    values, vectors = np.linalg.eigh(cov)
    axis = np.arctan2(vectors[1, 1], vectors[0, 1])
    upright = min((axis + k * np.pi / 2 for k in range(-4, 5)), key=abs)
    keep = np.clip((np.sqrt(values[1] / max(values[0], 1e-12)) - 1) / (ROUND_ASPECT[cls] - 1), 0, 1)
    turn = keep * upright + (1 - keep) * turn
  r = _rotation(turn)
  along = np.diag(r.T @ cov @ r)
  a = r @ np.diag(np.sqrt(np.maximum(along, 1e-12) / np.diag(shape.covariance)))
  return mean - a @ shape.centroid, a


def silhouette(cls: str, centre, a, shape: tuple[int, int]) -> np.ndarray:
  """float32 [H, W]: the pixel coverage of `cls` at (centre, A), pixel centres at whole numbers."""
  s = scenes.SUPERSAMPLE
  h, w = shape
  yy, xx = np.mgrid[0:h * s, 0:w * s]
  x, y = (xx + 0.5) / s - 0.5 - centre[0], (yy + 0.5) / s - 0.5 - centre[1]
  inv = np.linalg.inv(a)
  u, v = inv[0, 0] * x + inv[0, 1] * y, inv[1, 0] * x + inv[1, 1] * y
  mask = scenes.shape_mask(cls, u, v).astype(np.float32)
  return mask.reshape(h, s, w, s).mean(axis=(1, 3))


def _soft_iou(a, b) -> float:
  return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


@dataclasses.dataclass(frozen=True)
class ToyFaceDetector:
  """Finds the world's identities in an image (module docstring): `detect` as
  `face.detection.FaceDetector.detect`. Any image size; `static_size` is None (no network, no
  detection size)."""
  min_contrast: float = MIN_CONTRAST
  min_area: float = MIN_AREA
  min_score: float = MIN_SCORE
  classes: tuple = identities.IDENTITY_CLASSES
  static_size = None

  def detect(self, image, *, max_num: int = 0, metric: str = "default",
             input_size=None) -> Detections:
    """Identities of uint8 RGB image [H, W, 3], highest score first (`max_num` > 0: at most that
    many, by `face.detection.central_order`). input_size is accepted and unused."""
    from persona_jax.face.detection import central_order
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
      raise ValueError(f"detect takes a uint8 RGB image [H, W, 3] (8x8 or more), got "
                       f"{image.dtype} {image.shape}")
    pixels = image.astype(np.float64)
    *segment, noise = background_segment(pixels)
    distance = contrast(pixels, *segment)
    found = distance > max(self.min_contrast, NOISE_FACTOR * noise)
    found = ndimage.binary_fill_holes(found)
    labels, count = ndimage.label(found, np.ones((3, 3)))
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    boxes, scores, points = [], [], []
    for k in range(1, count + 1):
      region = labels == k
      if region.sum() < self.min_area * h * w:
        continue
      cover = coverage(region, pixels, *segment[:2])
      keep = cover > 0
      xy = np.stack([xx[keep], yy[keep]], -1).astype(np.float64)
      best = None
      for cls in self.classes:
        centre, a = fit_class(cls, xy, cover[keep])
        score = _soft_iou(silhouette(cls, centre, a, (h, w)), cover)
        if best is None or score > best[0]:
          best = (score, cls, centre, a)
      score, cls, centre, a = best
      if score < self.min_score:
        continue
      points.append(centre + identities.KEYPOINT_TEMPLATE.astype(np.float64) @ a.T)
      ys, xs = np.nonzero(region)
      boxes.append([xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5])
      scores.append(score)
    if not scores:
      return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                        np.zeros((0, 5, 2), np.float32))
    order = np.argsort(-np.asarray(scores), kind="stable")
    found = Detections(np.asarray(boxes, np.float32)[order], np.asarray(scores, np.float32)[order],
                       np.asarray(points, np.float32)[order])
    if 0 < max_num < len(found):
      found = found.take(central_order(found.boxes, image.shape, metric)[:max_num])
    return found


def detection_figures(detector=None, n_scenes: int = 1000, seed: int = 1, split: str = "held_out",
                      size: int = 32) -> dict:
  """How well `detector` (default a `ToyFaceDetector`) finds the one identity of identity scenes
  0..n_scenes-1 of (seed, split) at `size` pixels: the share where it finds exactly one, and the
  mean distance of its keypoints to the true ones (pixels; mean, 95th percentile, max) there."""
  detector = detector or ToyFaceDetector()
  errors = []
  for k in range(n_scenes):
    scene = identities.identity_scene(seed, split, k)
    found = detector.detect(identities.render(scene, size))
    if len(found) == 1:
      truth = identities.keypoints(scene, size)[0] - 0.5      # insightface's pixel centres
      errors.append(float(np.linalg.norm(found.keypoints[0] - truth, axis=-1).mean()))
  errors = np.asarray(errors)
  return {"scenes": n_scenes, "detection_rate": len(errors) / n_scenes,
          "mean_error": float(errors.mean()) if len(errors) else None,
          "p95_error": float(np.percentile(errors, 95)) if len(errors) else None,
          "max_error": float(errors.max()) if len(errors) else None}


def toy_face_analysis():
  """`face.analysis.FaceAnalysis` of the toy world: this detector and the shipped toy identity
  encoder (`face.recognition.shipped_toy_recognizer`)."""
  from persona_jax.face.analysis import FaceAnalysis
  from persona_jax.face.recognition import shipped_toy_recognizer
  return FaceAnalysis(detector=ToyFaceDetector(), recognizer=shipped_toy_recognizer())


def register() -> None:
  """Makes `load_face_analysis("toy")` this analysis (the command line registers the same,
  importing this module only when `--face-analysis toy` is used)."""
  register_named_analysis("toy", toy_face_analysis)


__all__ = ["ToyFaceDetector", "toy_face_analysis", "register", "detection_figures", "class_shape",
           "background_segment", "contrast", "coverage", "fit_class", "silhouette"]
