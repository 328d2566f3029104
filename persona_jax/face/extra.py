"""The `face` extra's packages (onnx, onnxruntime), imported when face analysis first needs them.

They stay out of the run-time dependencies: only reading insightface's ONNX model packs needs
them. Without them, face analysis stops with one line naming the extra to install.
"""

from __future__ import annotations

import importlib

from persona_jax.errors import ConfigError

FACE_EXTRA = "pip install 'persona-jax[face]'"


def import_face_package(name: str):
  """Module `name` ("onnx", "onnx.numpy_helper", "onnxruntime"), or a one-line ConfigError
  naming the face extra when its package is missing or does not import."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    package = name.split(".")[0]
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"face analysis needs the {package} package to run insightface's ONNX "
                      f"models, and it does not import ({reason}); install the face extra: "
                      f"{FACE_EXTRA}") from None


__all__ = ["FACE_EXTRA", "import_face_package"]
