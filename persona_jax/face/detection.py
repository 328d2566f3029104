"""SCRFD face detection (insightface's `det_10g.onnx`, `scrfd_*_bnkps.onnx`) on onnxruntime, CPU.

The network stays in ONNX: detection runs once per input image, outside any training or sampling
step, and its decoding (thresholds, a data-dependent number of boxes, greedy NMS) is host code
anyway, so a Flax port would buy nothing. What is ours is everything around the network, written
from insightface's `model_zoo/scrfd.py` (0.7.3, as the official pipelines run it; 2.1 agrees):

* letterbox: the image is resized (bilinear, bit-exact with `cv2.resize`'s INTER_LINEAR on uint8)
  to fit the input size (640x640 by default) keeping its aspect ratio, into the top-left corner of
  a black canvas; `det_scale` = new height / image height maps boxes back;
* input: (pixel - 127.5) / 128, RGB, NCHW float32 (insightface swaps its BGR images to RGB);
* outputs, in this order: scores of strides 8, 16, 32, then their box distances, then their
  keypoint offsets (9 outputs; 6 without keypoints; 10/15 for the 5-stride variants with one
  anchor). The released files give each as [H/s * W/s * A, C] (C = 1, 4, 10; A = 2 anchors per
  position; rows ordered y, x, anchor), batched exports as [1, H/s * W/s * A, C]. Scores are
  sigmoids; distances and offsets are in stride units;
* decoding: anchor centres (x * s, y * s) on each stride's grid; box = centre -/+ distance * s
  (left, top, right, bottom); keypoint k = centre + offset_k * s; candidates scoring >= 0.5;
* greedy NMS at IoU 0.4 (areas with insightface's +1 pixel convention), highest score first
  (equal scores in detection order, as 2.1's stable sort; 0.7.3's `argsort()[::-1]` may swap them);
* `max_num` keeps that many faces by area - 2 * (squared distance of the box centre from the
  image centre) (`metric="max"`: area alone), in that order.

`load_detector(path)` reads the file; `FaceDetector.detect(image)` returns `Detections`, highest
score first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.face.extra import import_face_package

INPUT_MEAN, INPUT_STD = 127.5, 128.0
SCORE_THRESHOLD, NMS_THRESHOLD = 0.5, 0.4
DEFAULT_INPUT_SIZE = (640, 640)          # (width, height), as the official pipelines prepare it
# number of outputs -> (strides, anchors per position, keypoints?)
OUTPUT_LAYOUTS = {6: ((8, 16, 32), 2, False), 9: ((8, 16, 32), 2, True),
                  10: ((8, 16, 32, 64, 128), 1, False), 15: ((8, 16, 32, 64, 128), 1, True)}


@dataclasses.dataclass(frozen=True)
class Detections:
  """Faces found in one image, highest score first (after `max_num`: by its metric): boxes
  [n, 4] (x1, y1, x2, y2, image pixels), scores [n], keypoints [n, 5, 2] (x, y: left eye, right
  eye, nose, left and right mouth corners), all float32."""
  boxes: np.ndarray
  scores: np.ndarray
  keypoints: np.ndarray

  def __len__(self) -> int:
    return len(self.scores)

  def take(self, index) -> "Detections":
    return Detections(self.boxes[index], self.scores[index], self.keypoints[index])


# ---------------------------------------------------------------------------------------------
# Letterbox resize, bit-exact with cv2.resize(image, (w, h)) (INTER_LINEAR) on uint8 images:
# OpenCV samples at (i + 0.5) * src / dst - 0.5 with float32 fractions turned into 11-bit fixed
# point weights, clamps at the borders, and rounds the vertical pass as its SIMD code does.

_COEF_BITS = 11


def _linear_taps(src: int, dst: int):
  """Source index [dst] and 11-bit weights (w0, w1) [dst] of each output position."""
  position = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
  index = np.floor(position).astype(np.int64)
  frac = (position - index.astype(np.float32)).astype(np.float32)
  return index, frac


def _fixed_point(frac):
  one = np.float32(1 << _COEF_BITS)
  return (np.rint((np.float32(1) - frac) * one).astype(np.int32),
          np.rint(frac * one).astype(np.int32))


def resize_linear(image, width: int, height: int) -> np.ndarray:
  """uint8 [height, width, C] of uint8 image [H, W, C], resized as cv2.resize's INTER_LINEAR."""
  image = np.asarray(image)
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image.copy()
  sx, fx = _linear_taps(w, width)
  border = (sx < 0) | (sx >= w - 1)       # cv2 clamps columns with a zero fraction
  fx[border] = 0
  sx = np.clip(sx, 0, w - 1)
  ax0, ax1 = _fixed_point(fx)
  sy, fy = _linear_taps(h, height)        # rows keep their fraction; the row index is clamped
  by0, by1 = _fixed_point(fy)
  # the horizontal pass, only on the source rows the vertical pass reads (int32 cannot overflow)
  used, where = np.unique(np.concatenate([np.clip(sy, 0, h - 1), np.clip(sy + 1, 0, h - 1)]),
                          return_inverse=True)
  pixels = image[used].astype(np.int32)
  rows = (pixels[:, sx] * ax0[:, None] + pixels[:, np.minimum(sx + 1, w - 1)] * ax1[:, None]) >> 4
  top, bottom = rows[where[:height]], rows[where[height:]]
  out = (((by0[:, None, None] * top) >> 16) + ((by1[:, None, None] * bottom) >> 16) + 2) >> 2
  return np.clip(out, 0, 255).astype(np.uint8)


def letterbox(image, input_size) -> tuple[np.ndarray, float]:
  """(canvas uint8 [height, width, 3], det_scale): image [H, W, 3] resized to fit input_size
  (width, height) with its aspect ratio, at the canvas's top left, zeros elsewhere."""
  width, height = input_size
  h, w = image.shape[:2]
  if h / w > height / width:
    new_h, new_w = height, int(height / (h / w))
  else:
    new_w, new_h = width, int(width * (h / w))
  canvas = np.zeros((height, width, 3), np.uint8)
  if new_h > 0 and new_w > 0:
    canvas[:new_h, :new_w] = resize_linear(image, new_w, new_h)
  return canvas, new_h / h


# ---------------------------------------------------------------------------------------------
# Decoding


def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
  """float32 [height * width * anchors, 2]: (x, y) * stride of each grid cell, rows ordered
  y, x, anchor as the network's outputs are."""
  centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32) * stride
  return np.repeat(centers.reshape(-1, 2), anchors, axis=0)


def distance_to_box(centers, distances) -> np.ndarray:
  """[n, 4] x1, y1, x2, y2 of centers [n, 2] and distances [n, 4] (left, top, right, bottom)."""
  return np.concatenate([centers - distances[:, :2], centers + distances[:, 2:]], axis=1)


def offsets_to_keypoints(centers, offsets) -> np.ndarray:
  """[n, k, 2] keypoints of centers [n, 2] and offsets [n, 2k] (x, y per keypoint)."""
  return centers[:, None, :] + offsets.reshape(len(offsets), offsets.shape[1] // 2, 2)


def nms(boxes, scores, threshold: float = NMS_THRESHOLD) -> np.ndarray:
  """Indices kept by greedy non-maximum suppression, highest score first: a box goes when its
  IoU with a kept box exceeds threshold (widths and heights + 1, insightface's convention)."""
  x1, y1, x2, y2 = boxes.T
  areas = (x2 - x1 + 1) * (y2 - y1 + 1)
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size:
    i, rest = order[0], order[1:]
    keep.append(i)
    w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
    h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
    overlap = w * h
    order = rest[overlap / (areas[i] + areas[rest] - overlap) <= threshold]
  return np.asarray(keep, np.int64)


def central_order(boxes, image_shape, metric: str = "default") -> np.ndarray:
  """Indices of boxes [n, 4], best first, by area - 2 * squared distance of the box centre from
  the image centre ("default") or by area ("max"): insightface's `max_num` ranking."""
  if metric not in ("default", "max"):
    raise ValueError(f"metric must be 'default' or 'max', got {metric!r}")
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  value = area
  if metric == "default":
    cy, cx = image_shape[0] // 2, image_shape[1] // 2
    dx = (boxes[:, 0] + boxes[:, 2]) / 2 - cx
    dy = (boxes[:, 1] + boxes[:, 3]) / 2 - cy
    value = area - (dx ** 2.0 + dy ** 2.0) * 2.0
  return np.argsort(value, kind="stable")[::-1]


@dataclasses.dataclass
class FaceDetector:
  """An SCRFD network in an onnxruntime session and how to read its outputs.

  `input_size` (width, height) is the letterbox size: the file's own when its input is static,
  else DEFAULT_INPUT_SIZE or what `load_detector` was given."""
  path: Path
  session: object
  strides: tuple
  anchors: int
  batched: bool
  input_size: tuple
  static_size: tuple | None = None
  score_threshold: float = SCORE_THRESHOLD
  nms_threshold: float = NMS_THRESHOLD

  def outputs(self, canvas) -> list[np.ndarray]:
    """The network's raw outputs for a uint8 RGB canvas [h, w, 3], batch dimension dropped."""
    blob = ((canvas.astype(np.float32) - np.float32(INPUT_MEAN)) * np.float32(1 / INPUT_STD))
    blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
    inputs = {self.session.get_inputs()[0].name: blob}
    outs = self.session.run(None, inputs)
    return [o[0] for o in outs] if self.batched else list(outs)

  def candidates(self, canvas, threshold: float):
    """(boxes [n, 4], scores [n], keypoints [n, 5, 2]) in canvas pixels, stride by stride,
    of the anchors scoring >= threshold."""
    outs = self.outputs(canvas)
    levels = len(self.strides)
    boxes, scores, keypoints = [], [], []
    for level, stride in enumerate(self.strides):
      score = outs[level].reshape(-1)
      centers = anchor_centers(canvas.shape[0] // stride, canvas.shape[1] // stride, stride,
                               self.anchors)
      if len(score) != len(centers):
        raise ModelFileError(f"{self.path}: stride {stride} gave {len(score)} scores for "
                             f"{len(centers)} anchors; not an SCRFD output layout")
      hit = score >= threshold
      scores.append(score[hit])
      boxes.append(distance_to_box(centers[hit], outs[levels + level][hit] * stride))
      keypoints.append(offsets_to_keypoints(centers[hit], outs[2 * levels + level][hit] * stride))
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(keypoints)

  def detect(self, image, *, max_num: int = 0, metric: str = "default",
             input_size=None) -> Detections:
    """Faces of uint8 RGB image [H, W, 3]: letterbox, network, decoding, NMS, then `max_num`
    (0: all) by `central_order`. input_size (width, height) overrides `self.input_size` on a
    file whose input is dynamic."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
      raise ValueError(f"detect takes a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    size = self.check_size(input_size)
    canvas, det_scale = letterbox(image, size)
    boxes, scores, keypoints = self.candidates(canvas, self.score_threshold)
    order = np.argsort(-scores, kind="stable")
    boxes = (boxes / det_scale)[order].astype(np.float32)
    keypoints = (keypoints / det_scale)[order].astype(np.float32)
    found = Detections(boxes, scores[order].astype(np.float32), keypoints)
    found = found.take(nms(found.boxes, found.scores, self.nms_threshold))
    if 0 < max_num < len(found):
      found = found.take(central_order(found.boxes, image.shape, metric)[:max_num])
    return found

  def check_size(self, input_size) -> tuple:
    """(width, height) to letterbox into: input_size or the default, checked against the file."""
    size = self.input_size if input_size is None else tuple(int(s) for s in input_size)
    if self.static_size is not None and size != self.static_size:
      fixed, asked = "x".join(map(str, self.static_size)), "x".join(map(str, size))
      raise ConfigError(f"{self.path}: its input is fixed at {fixed}; detect at that size "
                        f"(asked for {asked})")
    if len(size) != 2 or min(size) <= 0 or any(s % max(self.strides) for s in size):
      raise ConfigError(f"detection size {size}: width and height must be positive multiples of "
                        f"{max(self.strides)} (e.g. 640x640)")
    return size


def onnx_signature(path):
  """(input shapes, output shapes) of an ONNX file, as lists of dims (int, or str when dynamic);
  initializers listed among the inputs are left out, as onnxruntime does."""
  onnx = import_face_package("onnx")
  try:
    graph = onnx.load(str(path), load_external_data=False).graph
  except Exception as e:    # protobuf's DecodeError and friends
    raise ModelFileError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
  initializers = {t.name for t in graph.initializer}

  def dims(value):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]
  return ([dims(v) for v in graph.input if v.name not in initializers],
          [dims(v) for v in graph.output])


def load_detector(path, input_size=DEFAULT_INPUT_SIZE) -> FaceDetector:
  """The SCRFD detector in ONNX file `path` (with 5 keypoints), on onnxruntime's CPU provider.
  input_size (width, height) is the default letterbox size of a file with a dynamic input."""
  path = Path(path)
  if not path.is_file():
    raise ModelFileError(f"{path}: no such ONNX file; give insightface's det_10g.onnx (buffalo_l) "
                         "or scrfd_10g_bnkps.onnx (antelopev2)")
  ort = import_face_package("onnxruntime")
  try:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  except Exception as e:    # onnxruntime raises its own exception types
    raise ModelFileError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
  outputs = session.get_outputs()
  if len(outputs) not in OUTPUT_LAYOUTS:
    raise ModelFileError(f"{path}: {len(outputs)} outputs; an SCRFD detector has 6, 9, 10 or 15 "
                         "(scores, boxes[, keypoints] per stride)")
  strides, anchors, has_keypoints = OUTPUT_LAYOUTS[len(outputs)]
  if not has_keypoints:
    raise ModelFileError(f"{path}: this SCRFD detector predicts no keypoints, and alignment needs "
                         "them; use a *_kps/_bnkps model (det_10g.onnx, scrfd_10g_bnkps.onnx)")
  shape = session.get_inputs()[0].shape
  static = tuple(shape[2:4][::-1]) if all(isinstance(d, int) for d in shape[2:4]) else None
  detector = FaceDetector(path=path, session=session, strides=strides, anchors=anchors,
                          batched=len(outputs[0].shape) == 3,
                          input_size=static or tuple(input_size), static_size=static)
  detector.check_size(None)
  return detector


__all__ = ["Detections", "FaceDetector", "load_detector", "letterbox", "resize_linear",
           "anchor_centers", "distance_to_box", "offsets_to_keypoints", "nms", "central_order",
           "onnx_signature", "DEFAULT_INPUT_SIZE"]
