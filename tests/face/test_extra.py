"""Without the face extra's packages (onnx, onnxruntime), detection and recognition stop with one
line naming the extra. Each package is made unimportable here (None in sys.modules), so these
run whether or not the extra is installed."""

import sys

import pytest

from persona_jax.errors import ConfigError
from persona_jax.face import detection, extra, recognition


@pytest.fixture
def some_file(tmp_path):
  """An existing file by a released name (the packages are needed before it is read)."""
  def make(name):
    (tmp_path / name).write_bytes(b"\x08\x07")
    return tmp_path / name
  return make


@pytest.mark.parametrize("package,load", [
    ("onnxruntime", lambda f: detection.load_detector(f("det_10g.onnx"))),
    ("onnx", lambda f: detection.onnx_signature(f("scrfd_10g_bnkps.onnx"))),
    ("onnx", lambda f: recognition.load_recognizer(f("w600k_r50.onnx"))),
], ids=["detection-onnxruntime", "detection-onnx", "recognition-onnx"])
def test_a_missing_package_names_the_face_extra(monkeypatch, some_file, package, load):
  monkeypatch.setitem(sys.modules, package, None)
  with pytest.raises(ConfigError) as e:
    load(some_file)
  message = str(e.value)
  assert message.startswith(f"face analysis needs the {package} package to run insightface's ONNX "
                            "models, and it does not import (")
  assert message.endswith("; install the face extra: pip install 'persona-jax[face]'")
  assert "\n" not in message and extra.FACE_EXTRA in message


def test_a_submodule_of_a_missing_package_names_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)
  monkeypatch.delitem(sys.modules, "onnx.numpy_helper", raising=False)
  with pytest.raises(ConfigError, match=r"^face analysis needs the onnx package .*persona-jax\[face\]"):
    extra.import_face_package("onnx.numpy_helper")
