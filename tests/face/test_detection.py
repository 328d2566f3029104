"""SCRFD detection: our letterbox, decoding, NMS and max_num against insightface's own `SCRFD`
class on tiny random SCRFD networks exported as the released files are (bit-identical results),
and the pieces on hand-made cases."""

import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from persona_jax.errors import ConfigError, ModelFileError  # noqa: E402
from persona_jax.face import detection  # noqa: E402
from tests.face import tiny_scrfd  # noqa: E402

SHAPES = [(640, 640), (480, 640), (700, 300), (123, 457), (1000, 900)]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """det_10g's layout: outputs [K * 2, C], input [1, 3, ?, ?]."""
  model = tiny_scrfd.calibrate(tiny_scrfd.build(0), tiny_scrfd.image(100, (640, 640)))
  return tiny_scrfd.export(model, tmp_path_factory.mktemp("scrfd") / "det_10g.onnx")


@pytest.fixture(scope="module")
def batched_static(tmp_path_factory):
  """A batched export ([1, K * 2, C] outputs) with its input fixed at 320x256 (width x height)."""
  model = tiny_scrfd.build(1, batched=True)
  model = tiny_scrfd.calibrate(model, detection.letterbox(tiny_scrfd.image(101, (256, 320)),
                                                          (320, 256))[0])
  return tiny_scrfd.export(model, tmp_path_factory.mktemp("scrfd") / "batched.onnx", (320, 256))


def _insightface(path, input_size):
  scrfd = pytest.importorskip("insightface.model_zoo.scrfd")
  ref = scrfd.SCRFD(model_file=str(path))
  ref.prepare(ctx_id=-1, input_size=input_size)
  return ref


def _assert_same(ours, det, kps):
  np.testing.assert_array_equal(ours.boxes, det[:, :4])
  np.testing.assert_array_equal(ours.scores, det[:, 4])
  np.testing.assert_array_equal(ours.keypoints, kps)


def test_resize_linear_is_cv2_resize():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(0)
  pairs = [((300, 200), (150, 100)), ((7, 5), (7, 5)), ((1, 9), (4, 3)), ((2, 2), (640, 17))]
  pairs += [(tuple(rng.integers(1, 400, 2)), tuple(rng.integers(1, 400, 2))) for _ in range(60)]
  for (h, w), (nh, nw) in pairs:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(detection.resize_linear(image, int(nw), int(nh)),
                                  cv2.resize(image, (int(nw), int(nh))),
                                  err_msg=f"{h}x{w} -> {nh}x{nw}")


def test_detect_matches_insightface(released):
  ref = _insightface(released, (640, 640))
  ours = detection.load_detector(released)
  layout = (ours.strides, ours.anchors, ours.batched, ours.static_size)
  assert layout == ((8, 16, 32), 2, False, None)
  suppressed = 0
  for seed, shape in enumerate(SHAPES):
    image = tiny_scrfd.image(seed, shape)
    found = ours.detect(image)
    det, kps = ref.detect(np.ascontiguousarray(image[:, :, ::-1]), max_num=0)   # BGR
    _assert_same(found, det, kps)
    assert len(found) >= 2
    assert np.all(np.diff(found.scores) <= 0)
    canvas, _ = detection.letterbox(image, (640, 640))
    suppressed += len(ours.candidates(canvas, 0.5)[1]) - len(found)
  assert suppressed > 0                       # NMS had work to do


def test_detect_at_another_size_matches_insightface(released):
  ref = _insightface(released, (640, 640))
  ours = detection.load_detector(released, input_size=(320, 256))
  for seed, shape in enumerate(SHAPES[:3]):
    image = tiny_scrfd.image(seed, shape)
    det, kps = ref.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=(320, 256))
    _assert_same(ours.detect(image), det, kps)
    _assert_same(detection.load_detector(released).detect(image, input_size=(320, 256)), det, kps)


def test_batched_static_detector_matches_insightface(batched_static):
  ref = _insightface(batched_static, (640, 640))          # a static input overrides the size
  ours = detection.load_detector(batched_static)
  assert (ours.batched, ours.static_size, ours.input_size) == (True, (320, 256), (320, 256))
  for seed, shape in enumerate(SHAPES[:3]):
    image = tiny_scrfd.image(seed, shape)
    found = ours.detect(image)
    det, kps = ref.detect(np.ascontiguousarray(image[:, :, ::-1]), max_num=0)
    _assert_same(found, det, kps)
    assert len(found) >= 1
  with pytest.raises(ConfigError, match=r"batched\.onnx: its input is fixed at 320x256"):
    ours.detect(image, input_size=(640, 640))


@pytest.mark.parametrize("metric", ["default", "max"])
def test_max_num_matches_insightface(released, metric):
  ref = _insightface(released, (640, 640))
  ours = detection.load_detector(released)
  for seed, shape in enumerate(SHAPES[:3]):
    image = tiny_scrfd.image(seed, shape)
    for max_num in (1, 3):
      det, kps = ref.detect(np.ascontiguousarray(image[:, :, ::-1]), max_num=max_num, metric=metric)
      found = ours.detect(image, max_num=max_num, metric=metric)
      assert len(found) == max_num
      _assert_same(found, det, kps)


def test_nms_matches_insightface_on_random_boxes(released):
  ref = _insightface(released, (640, 640))
  rng = np.random.default_rng(0)
  corner = rng.uniform(0, 100, (300, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (300, 2))], 1).astype(np.float32)
  scores = rng.uniform(0.5, 1, 300).astype(np.float32)
  order = np.argsort(-scores, kind="stable")
  dets = np.concatenate([boxes, scores[:, None]], 1)[order]
  keep = detection.nms(dets[:, :4], dets[:, 4])
  assert 10 < len(keep) < 300
  np.testing.assert_array_equal(keep, ref.nms(dets))


def test_nms_drops_boxes_overlapping_a_better_one_above_the_threshold():
  # IoU with +1 pixel sides: box 0 is 10x10 (area 121 with +1); box 1 shifted by d overlaps it
  # (11 - d) * 11 over 242 - (11 - d) * 11.
  def iou(d):
    inter = (11 - d) * 11
    return inter / (242 - inter)
  shift_kept = next(d for d in range(11) if iou(d) <= 0.4)        # the first shift at or below 0.4
  boxes = np.asarray([[0, 0, 10, 10], [shift_kept - 1, 0, 10 + shift_kept - 1, 10],
                      [shift_kept, 0, 10 + shift_kept, 10], [50, 50, 60, 60]], np.float32)
  scores = np.asarray([0.9, 0.8, 0.7, 0.6], np.float32)
  np.testing.assert_array_equal(detection.nms(boxes, scores), [0, 2, 3])
  # Highest score first; box 1 goes (it overlaps box 2 by more), so it does not take box 0 along.
  np.testing.assert_array_equal(detection.nms(boxes, scores[::-1].copy()), [3, 2, 0])


def test_central_order_weighs_area_against_distance_from_the_centre():
  image_shape = (200, 200, 3)
  boxes = np.asarray([[0, 0, 60, 60],          # big, far from the centre: 3600 - 2 * 2 * 70^2
                      [90, 90, 110, 110],      # small, central: 400
                      [70, 70, 130, 130]],     # big and central: 3600
                     np.float32)
  np.testing.assert_array_equal(detection.central_order(boxes, image_shape), [2, 1, 0])
  np.testing.assert_array_equal(detection.central_order(boxes, image_shape, "max")[:1], [2])
  assert detection.central_order(boxes, image_shape, "max")[-1] == 1


def test_anchor_rows_run_over_y_then_x_then_anchor():
  centers = detection.anchor_centers(3, 4, 16, 2)
  assert centers.shape == (24, 2)
  for y in range(3):
    for x in range(4):
      for a in range(2):
        np.testing.assert_array_equal(centers[(y * 4 + x) * 2 + a], [x * 16, y * 16])
  box = detection.distance_to_box(np.asarray([[32.0, 48.0]]), np.asarray([[1.0, 2.0, 3.0, 4.0]]))
  np.testing.assert_array_equal(box, [[31, 46, 35, 52]])
  kps = detection.offsets_to_keypoints(np.asarray([[32.0, 48.0]]), np.arange(10.0)[None])
  np.testing.assert_array_equal(kps[0], [[32, 49], [34, 51], [36, 53], [38, 55], [40, 57]])


def test_bad_input(released, tmp_path, monkeypatch):
  with pytest.raises(ModelFileError, match=r"nothing\.onnx: no such ONNX file; give insightface's "
                                           r"det_10g\.onnx"):
    detection.load_detector(tmp_path / "nothing.onnx")
  (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
  with pytest.raises(ModelFileError, match=r"broken\.onnx: onnxruntime cannot load it"):
    detection.load_detector(tmp_path / "broken.onnx")
  with pytest.raises(ConfigError, match="multiples of 32"):
    detection.load_detector(released, input_size=(600, 600))
  with pytest.raises(ValueError, match="uint8 RGB image"):
    detection.load_detector(released).detect(np.zeros((64, 64), np.uint8))
  monkeypatch.setitem(sys.modules, "onnxruntime", None)
  with pytest.raises(ConfigError, match=r"pip install 'persona-jax\[face\]'"):
    detection.load_detector(released)


def test_a_detector_without_keypoints_or_with_other_outputs_is_refused(tmp_path):
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto, helper

  def graph_file(name, outputs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])
    outs = [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None) for i in range(outputs)]
    nodes = [helper.make_node("Identity", ["x"], [f"o{i}"]) for i in range(outputs)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs),
                              opset_imports=[helper.make_opsetid("", 11)])
    onnx.save(model, tmp_path / name)
    return tmp_path / name
  with pytest.raises(ModelFileError, match=r"scrfd_10g\.onnx: this SCRFD detector predicts no "
                                           "keypoints"):
    detection.load_detector(graph_file("scrfd_10g.onnx", 6))
  with pytest.raises(ModelFileError, match=r"w600k_r50\.onnx: 1 outputs; an SCRFD detector has"):
    detection.load_detector(graph_file("w600k_r50.onnx", 1))
