"""Face analysis over an insightface model pack (`buffalo_l`, `antelopev2`): detect (SCRFD, 5
keypoints), align (`align.norm_crop` to the recognizer's 112x112 template), embed (ArcFace).

`load_face_analysis(folder)` finds the pack's detector and recognizer as insightface's
`model_zoo.get_model` routes its files, by each ONNX file's inputs and outputs, in sorted file
order, the first of each kind winning: a file with 5 or more outputs is the detector; one with a
192x192 input (landmarks), 96x96 (gender/age) or two inputs at 128 (the face swapper) is not
used; a square input of at least 112, a multiple of 16, is the recognizer (loaded with
`recognition.load_recognizer`).

Which face each official pipeline uses (`PIPELINE_PICKS`), all at insightface's 640x640:
* InstantID (antelopev2) and StoryMaker (buffalo_l): "largest", the largest box area
  (`sorted(faces, key=area)[-1]`: the last detected among equal areas); InstantID takes the raw
  embedding, StoryMaker the normalized one;
* PhotoMaker v2 (buffalo_l): "first", the first detected (the highest detection score), with
  the raw embedding; when no face is found it detects again at 576, 512, ... 256
  (`PHOTOMAKER_V2_DET_SIZES`);
* IP-Adapter-FaceID (buffalo_l): "first", normalized embedding.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from persona_jax.errors import ModelFileError, PersonaError
from persona_jax.face import recognition
from persona_jax.face.detection import (DEFAULT_INPUT_SIZE, FaceDetector, load_detector,
                                        onnx_signature)
from persona_jax.face.recognizer import Recognizer

log = logging.getLogger(__name__)

PICK_POLICIES = ("largest", "first")
PIPELINE_PICKS = {"instantid": "largest", "storymaker": "largest", "photomaker_v2": "first",
                  "ip_adapter_faceid": "first"}
# PhotoMaker v2's `analyze_faces`: the prepared 640, then smaller sizes until a face is found
PHOTOMAKER_V2_DET_SIZES = (640, 576, 512, 448, 384, 320, 256)
# Analyses named by a word instead of a pack folder: word -> a function making it. The toy
# world's ("toy") is registered by the command line at start (imported only when used) and by
# `world.toy_face_detector.register()`; this core layer never imports the world.
NAMED_ANALYSES: dict = {}


def register_named_analysis(name: str, make) -> None:
  """`load_face_analysis(name)` returns `make()` from now on."""
  NAMED_ANALYSES[name] = make
PACK_HELP = ("expected an insightface model pack: buffalo_l (det_10g.onnx, w600k_r50.onnx) or "
             "antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx)")


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
  """One face: box [4] (x1, y1, x2, y2, image pixels), detection score, keypoints [5, 2] (x, y:
  eyes, nose, mouth corners), the recognizer's raw embedding [D] and its L2 norm."""
  box: np.ndarray
  score: float
  keypoints: np.ndarray
  embedding: np.ndarray
  norm: float

  @property
  def normed_embedding(self) -> np.ndarray:
    """embedding / norm (insightface's `normed_embedding`)."""
    return self.embedding / self.norm

  @property
  def area(self) -> float:
    return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def pick(faces, policy: str, image_name="image") -> Face:
  """The face a pipeline uses: "largest" box area or "first" detected (module docstring). No
  face is an error naming the image; several are a warning naming the image, count and choice."""
  if policy not in PICK_POLICIES:
    raise ValueError(f"face pick policy must be one of {PICK_POLICIES}, got {policy!r}")
  if not faces:
    raise PersonaError(f"{image_name}: no face found; use a photo where one face is clearly "
                       "visible, frontal and not too small")
  chosen = sorted(faces, key=lambda f: f.area)[-1] if policy == "largest" else faces[0]
  if len(faces) > 1:
    rule = "largest box" if policy == "largest" else "first detected (highest score)"
    log.warning("%s: %d faces found; using the %s, at box %s with score %.3f", image_name,
                len(faces), rule, np.round(chosen.box).astype(int).tolist(), chosen.score)
  return chosen


@dataclasses.dataclass(frozen=True, eq=False)
class FaceAnalysis:
  """A detector and a recognizer: `analyze` an RGB image into `Face`s."""
  detector: FaceDetector
  recognizer: Recognizer
  folder: Path | None = None

  def analyze(self, image, *, max_num: int = 0, det_sizes=None) -> list[Face]:
    """Faces of uint8 RGB image [H, W, 3], highest detection score first (with max_num > 0:
    at most max_num, by insightface's central ranking). det_sizes: square detection sizes tried
    in order until one finds a face (default: the detector's own size only)."""
    found = None
    for size in self._sizes(det_sizes):
      found = self.detector.detect(image, max_num=max_num, input_size=size)
      if len(found):
        break
    if not len(found):
      return []
    embeddings = self.recognizer.embed_faces(image, found.keypoints)
    norms = np.linalg.norm(embeddings, axis=-1)
    return [Face(box=found.boxes[i], score=float(found.scores[i]), keypoints=found.keypoints[i],
                 embedding=embeddings[i], norm=float(norms[i])) for i in range(len(found))]

  def face(self, image, policy: str, *, image_name="image", det_sizes=None) -> Face:
    """The one face of `image` a pipeline uses (`pick`), e.g. policy=PIPELINE_PICKS["instantid"]."""
    return pick(self.analyze(image, det_sizes=det_sizes), policy, image_name)

  def _sizes(self, det_sizes):
    if det_sizes is None or self.detector.static_size is not None:
      return [None]
    return [(int(s), int(s)) for s in det_sizes]


def route(signature) -> str | None:
  """"detection", "recognition" or None (not used) for an ONNX file's (inputs, outputs) shapes,
  as insightface's `model_zoo.ModelRouter` decides."""
  inputs, outputs = signature
  if len(outputs) >= 5:
    return "detection"
  shape = inputs[0] if inputs else []
  h, w = (shape[2], shape[3]) if len(shape) == 4 else (None, None)
  if not (isinstance(h, int) and isinstance(w, int)):
    return None
  if (h, w) in ((192, 192), (96, 96)) or (len(inputs) == 2 and (h, w) == (128, 128)):
    return None                      # landmarks, gender/age, face swapper
  if h == w and h >= 112 and h % 16 == 0:
    return "recognition"
  return None


def find_pack_models(folder) -> dict[str, Path]:
  """{"detection": path, "recognition": path} of the pack in `folder` (module docstring)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ModelFileError(f"{folder}: no such folder; {PACK_HELP}")
  files = sorted(folder.glob("*.onnx"))
  if not files:
    nested = sorted({p.parent for p in folder.glob("*/*.onnx")})
    hint = f" (found some in {nested[0]}: pass that folder)" if nested else ""
    raise ModelFileError(f"{folder}: no .onnx files{hint}; {PACK_HELP}")
  found: dict[str, Path] = {}
  for path in files:
    kind = route(onnx_signature(path))
    if kind is None or kind in found:
      log.info("face analysis: not using %s (%s)", path.name,
               f"a second {kind}" if kind else "not a detector or recognizer")
      continue
    found[kind] = path
  for kind, what in (("detection", "SCRFD detector (an ONNX file with 5 or more outputs)"),
                     ("recognition", "face recognizer (an ONNX file with a square input of 112)")):
    if kind not in found:
      raise ModelFileError(f"{folder}: no {what} among {', '.join(p.name for p in files)}; "
                           f"{PACK_HELP}")
  return found


def load_face_analysis(folder, det_size=DEFAULT_INPUT_SIZE) -> FaceAnalysis:
  """The face analysis of the insightface model pack in `folder`; det_size (width, height) is
  the detection size (the official pipelines' 640x640 by default). A word of NAMED_ANALYSES
  instead of a folder: that analysis ("toy": the toy world's detector and shipped identity
  encoder, `world.toy_face_detector.toy_face_analysis`; det_size unused)."""
  if str(folder) in NAMED_ANALYSES:
    return NAMED_ANALYSES[str(folder)]()
  found = find_pack_models(folder)
  detector = load_detector(found["detection"], input_size=det_size)
  recognizer = recognition.load_recognizer(found["recognition"])
  log.info("face analysis: detector %s, recognizer %s", found["detection"].name,
           found["recognition"].name)
  return FaceAnalysis(detector=detector, recognizer=recognizer, folder=Path(folder))


__all__ = ["Face", "FaceAnalysis", "pick", "route", "find_pack_models", "load_face_analysis",
           "PICK_POLICIES", "PIPELINE_PICKS", "PHOTOMAKER_V2_DET_SIZES", "NAMED_ANALYSES"]
