"""Loading face-recognition networks (ArcFace and its stand-in) as `face.recognizer.Recognizer`s.

A `Recognizer` embeds aligned crops: uint8 [N, S, S, 3] -> float32 [N, 512], raw as ArcFace's
output (not unit-normalized; its norm says how face-like and sharp the crop is, its direction
who it is). `embed_faces` aligns faces of a whole image by their 5 keypoints (`align.norm_crop`
onto the network's `template`) and embeds them. Identity similarity is the cosine of two
embeddings; `threshold`, where the network has one, is the cosine above which two faces are
called the same person.

`load_recognizer(path)` reads insightface's ArcFace ONNX files (`w600k_r50.onnx`,
`glintr100.onnx`: an IResNet run in Flax, `face.onnx_iresnet`) or a folder with config.json
naming its "architecture" (the toy world's `toy_identity_encoder`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path


from persona_jax.errors import ConfigError
from persona_jax.face.recognizer import Recognizer, cosine  # noqa: F401  (the interface, re-exported)

# architecture names in config.json (the networks' loaders are imported when used)
ARCHITECTURES = ("toy_identity_encoder",)


def load_recognizer(path) -> Recognizer:
  """The recognizer saved at `path`: insightface's IResNet ONNX file (needs the `face` extra), or
  a folder with config.json whose "architecture" is one of ARCHITECTURES (and its weights)."""
  path = Path(path)
  if path.suffix.lower() == ".onnx":
    from persona_jax.face import onnx_iresnet
    return onnx_iresnet.load(path)
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
  from persona_jax.face import toy_network
  return toy_network.load(path)


def shipped_toy_dir() -> Path:
  import importlib.resources
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "toy_identity_encoder"))


@functools.lru_cache(maxsize=1)
def shipped_toy_recognizer() -> Recognizer:
  """The toy world's identity encoder shipped in assets/toy_identity_encoder/ (ArcFace's stand-in)."""
  return load_recognizer(shipped_toy_dir())


__all__ = ["Recognizer", "cosine", "load_recognizer", "shipped_toy_recognizer", "ARCHITECTURES"]
