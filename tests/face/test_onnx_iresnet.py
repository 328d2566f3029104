"""insightface's ArcFace ONNX files read into the Flax IResNet (face/onnx_iresnet.py, face/iresnet.py).

A tiny IResNet re-created in torch and exported as the released files are (tests/face/tiny_iresnet.py:
opset 11, eval mode, batch norm folded) is read back; our embeddings are compared with
onnxruntime's and with insightface's own `ArcFaceONNX.get_feat` on aligned crops (1e-5 relative,
float32).
"""

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from persona_jax.errors import ConfigError  # noqa: E402
from persona_jax.face import align, onnx_iresnet, recognition  # noqa: E402
from tests.face import tiny_iresnet  # noqa: E402
from tests.markers import slow  # noqa: E402

STEM, WIDTHS, LAYERS, EMBEDDING = (tiny_iresnet.STEM, tiny_iresnet.WIDTHS, tiny_iresnet.LAYERS,
                                   tiny_iresnet.EMBEDDING)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("arcface")
  net = tiny_iresnet.build(0)
  inside = tiny_iresnet.build(1, normalize_inside=True)
  return {"folded": tiny_iresnet.export(net, folder / "w600k_r50.onnx"),
          "unfolded": tiny_iresnet.export(net, folder / "unfolded.onnx", fold=False),
          "inside": tiny_iresnet.export(inside, folder / "mxnet_style.onnx",
                                        rename={"Sub": "_minusscalar0", "Mul": "_mulscalar0"})}


@pytest.fixture(scope="module")
def faces():
  """RGB image [160, 160, 3], keypoints [3, 5, 2] of three faces, and their aligned crops."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
  keypoints = np.stack([align.ARCFACE_TEMPLATE_112 * s + o + rng.normal(0, 1.5, (5, 2))
                        for s, o in ((1.0, (10, 5)), (0.7, (60, 70)), (1.3, (5, 2)))]).astype(np.float32)
  crops = np.stack([align.norm_crop(image, k) for k in keypoints])
  return image, keypoints, crops


def _onnxruntime(path, crops):
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  blob = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
  return session.run(None, {session.get_inputs()[0].name: blob})[0]


def _relative(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def recognizer(files):
  return recognition.load_recognizer(files["folded"])


def test_the_export_has_the_released_files_form_and_reads_back_its_sizes(files, recognizer):
  model = onnx.load(str(files["folded"]))
  assert [o.version for o in model.opset_import] == [11]
  nodes = [n for n in model.graph.node if n.op_type != "Identity"]
  assert {n.op_type for n in nodes} == {"Conv", "PRelu", "BatchNormalization", "Add", "Flatten", "Gemm"}
  # batch norm after a convolution is folded: only each block's bn1, bn2 and features remain
  assert sum(n.op_type == "BatchNormalization" for n in nodes) == sum(LAYERS) + 2
  feeds = {i: n.op_type for n in nodes for i in n.input}
  assert not any(feeds.get(n.output[0]) == "BatchNormalization" for n in nodes if n.op_type == "Conv")
  config, variables = onnx_iresnet.read_iresnet(files["folded"])
  assert (config.stem, config.widths, config.layers, config.strides, config.embedding,
          config.input_size) == (STEM, WIDTHS, LAYERS, (2, 2, 2, 2), EMBEDDING, 112)
  assert variables["params"]["layer1_1"]["conv2"]["kernel"].shape == (3, 3, WIDTHS[0], WIDTHS[0])
  assert "downsample" in variables["params"]["layer2_0"]
  assert "downsample" not in variables["params"]["layer1_1"]
  assert recognizer.name == "w600k_r50" and recognizer.input_size == 112
  np.testing.assert_array_equal(recognizer.template, align.arcface_template(112))


def test_embeddings_match_onnxruntime_and_insightface(files, recognizer, faces):
  image, keypoints, crops = faces
  ours = recognizer.embed(crops)                           # 3 crops: a batch padded to 4
  assert ours.shape == (3, EMBEDDING) and ours.dtype == np.float32
  reference = _onnxruntime(files["folded"], crops)
  assert _relative(ours, reference) < 1e-5
  np.testing.assert_allclose(recognizer.embed_faces(image, keypoints), ours, rtol=0, atol=1e-6)
  arcface = pytest.importorskip("insightface.model_zoo.arcface_onnx")
  theirs = arcface.ArcFaceONNX(model_file=str(files["folded"]))
  assert (theirs.input_mean, theirs.input_std) == (127.5, 127.5)
  feats = theirs.get_feat([np.ascontiguousarray(c[..., ::-1]) for c in crops])  # cv2's BGR
  assert _relative(ours, feats) < 1e-5


def test_unfolded_batch_norms_and_in_graph_normalization(files, recognizer, faces):
  _, _, crops = faces
  unfolded = recognition.load_recognizer(files["unfolded"])
  assert "BatchNormalization" in [n.op_type for n in onnx.load(str(files["unfolded"])).graph.node[:3]]
  assert _relative(unfolded.embed(crops), recognizer.embed(crops)) < 1e-5
  # an MXNet-style graph normalizing its 0..255 input itself: insightface feeds it raw pixels
  config, _ = onnx_iresnet.read_iresnet(files["inside"])
  np.testing.assert_allclose(config.input_scale, [0.0078125] * 3)
  np.testing.assert_allclose(config.input_shift, [-127.5 * 0.0078125] * 3)
  ours = recognition.load_recognizer(files["inside"]).embed(crops)
  session = ort.InferenceSession(str(files["inside"]), providers=["CPUExecutionProvider"])
  raw = session.run(None, {"input.1": crops.astype(np.float32).transpose(0, 3, 1, 2)})[0]
  assert _relative(ours, raw) < 1e-5
  arcface = pytest.importorskip("insightface.model_zoo.arcface_onnx")
  theirs = arcface.ArcFaceONNX(model_file=str(files["inside"]))
  assert (theirs.input_mean, theirs.input_std) == (0.0, 1.0)
  assert _relative(ours, theirs.get_feat([np.ascontiguousarray(c[..., ::-1]) for c in crops])) < 1e-5


def _detector_like(path):
  """A small SCRFD-like graph: conv trunk, two heads (scores, boxes)."""
  h = onnx.helper
  w = onnx.numpy_helper.from_array
  rng = np.random.default_rng(0)
  nodes = [h.make_node("Conv", ["input.1", "w0"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
           h.make_node("Relu", ["a"], ["b"]),
           h.make_node("Conv", ["b", "w1"], ["score"], kernel_shape=[1, 1]),
           h.make_node("Conv", ["b", "w2"], ["bbox"], kernel_shape=[1, 1])]
  inits = [w(rng.normal(size=s).astype(np.float32), n)
           for n, s in (("w0", (8, 3, 3, 3)), ("w1", (2, 8, 1, 1)), ("w2", (8, 8, 1, 1)))]
  graph = h.make_graph(nodes, "det", [h.make_tensor_value_info("input.1", 1, [1, 3, 640, 640])],
                       [h.make_tensor_value_info(n, 1, None) for n in ("score", "bbox")], inits)
  onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 11)]), str(path))
  return path


def test_other_graphs_and_files_are_refused_in_one_line(tmp_path, files):
  detector = _detector_like(tmp_path / "det_10g.onnx")
  with pytest.raises(ConfigError, match=r"det_10g.onnx: not a face-recognition IResNet \(.*\); "
                                        "expected insightface's ArcFace") as e:
    recognition.load_recognizer(detector)
  # a recognizer cut short: a graph whose embedding is not its output
  model = onnx.load(str(files["folded"]))
  gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
  model.graph.output[0].name = gemm.input[0]
  onnx.save(model, str(tmp_path / "cut.onnx"))
  with pytest.raises(ConfigError, match="cut.onnx: not a face-recognition IResNet") as e2:
    onnx_iresnet.read_iresnet(tmp_path / "cut.onnx")
  (tmp_path / "broken.onnx").write_bytes(b"\x08\x07not a protobuf at all")
  with pytest.raises(ConfigError, match="broken.onnx: not a readable ONNX file") as e3:
    recognition.load_recognizer(tmp_path / "broken.onnx")
  for err in (e, e2, e3):
    assert "\n" not in str(err.value)


@slow
def test_a_real_size_r50_matches_onnxruntime_and_insightface(tmp_path, faces):
  """insightface's iresnet50 (w600k_r50's sizes: 64, (64, 128, 256, 512), (3, 4, 14, 3))."""
  net = tiny_iresnet.build(2, stem=64, widths=(64, 128, 256, 512), layers=(3, 4, 14, 3))
  path = tiny_iresnet.export(net, tmp_path / "w600k_r50.onnx")
  config, _ = onnx_iresnet.read_iresnet(path)
  assert (config.layers, config.widths) == ((3, 4, 14, 3), (64, 128, 256, 512))
  _, _, crops = faces
  ours = recognition.load_recognizer(path).embed(crops)
  assert _relative(ours, _onnxruntime(path, crops)) < 1e-5
  arcface = pytest.importorskip("insightface.model_zoo.arcface_onnx")
  feats = arcface.ArcFaceONNX(model_file=str(path)).get_feat([np.ascontiguousarray(c[..., ::-1]) for c in crops])
  assert _relative(ours, feats) < 1e-5
