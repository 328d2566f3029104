"""Face analysis over a model-pack folder: routing the pack's ONNX files as insightface does, the
faces it returns (the detector's boxes and keypoints, the recognizer's embeddings of the aligned
faces), the pipelines' face picks, and the bad-input messages. The pack holds a tiny SCRFD and
small stand-ins for the other files; the recognizer is a stand-in `Recognizer` (the ArcFace port
has its own tests)."""

import logging
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from persona_jax.errors import ConfigError, ModelFileError, PersonaError  # noqa: E402
from persona_jax.face import align, analysis, detection, recognition  # noqa: E402
from persona_jax.face.recognizer import Recognizer  # noqa: E402
from tests.face import tiny_scrfd  # noqa: E402


def _image_model(path, size, out_dim, inputs=1):
  """An ONNX file taking [1, 3, size, size] (inputs times) to [1, out_dim]."""
  from onnx import TensorProto, helper, numpy_helper
  xs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 3, size, size])
        for i in range(inputs)]
  w = numpy_helper.from_array(np.ones((3, out_dim), np.float32), "w")
  nodes = [helper.make_node("GlobalAveragePool", ["x0"], ["p"]),
           helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
  y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])
  onnx.save(helper.make_model(helper.make_graph(nodes, "g", xs, [y], [w]),
                              opset_imports=[helper.make_opsetid("", 11)]), path)


def _stand_in_recognizer():
  projection = np.random.default_rng(7).normal(0, 1, (28 * 28 * 3, 512)).astype(np.float32)

  def embed(crops):                      # float32 [N, 112, 112, 3] -> [N, 512]
    pooled = crops.reshape(len(crops), 28, 4, 28, 4, 3).mean((2, 4))
    return (pooled.reshape(len(crops), -1) / 255 - 0.5) @ projection
  return Recognizer(name="stand-in", input_size=112, template=align.arcface_template(112),
                    embed_fn=embed)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
  """A buffalo_l-shaped folder: 1k3d68 and 2d106det (192), det_10g (tiny SCRFD), genderage (96),
  w600k_r50 (112 -> 512)."""
  folder = tmp_path_factory.mktemp("buffalo_l")
  model = tiny_scrfd.calibrate(tiny_scrfd.build(0), tiny_scrfd.image(100, (640, 640)), 0.001)
  tiny_scrfd.export(model, folder / "det_10g.onnx")
  _image_model(folder / "1k3d68.onnx", 192, 3309)
  _image_model(folder / "2d106det.onnx", 192, 212)
  _image_model(folder / "genderage.onnx", 96, 3)
  _image_model(folder / "w600k_r50.onnx", 112, 512)
  return folder


@pytest.fixture
def stand_in(monkeypatch):
  """load_recognizer replaced by the stand-in; the paths it was asked for."""
  asked = []
  recognizer = _stand_in_recognizer()

  def load(path):
    asked.append(path)
    return recognizer
  monkeypatch.setattr(recognition, "load_recognizer", load)
  return asked


def test_the_pack_is_routed_as_insightface_routes_it(pack, stand_in):
  assert analysis.find_pack_models(pack) == {"detection": pack / "det_10g.onnx",
                                             "recognition": pack / "w600k_r50.onnx"}
  faces = analysis.load_face_analysis(pack)
  assert stand_in == [pack / "w600k_r50.onnx"]
  assert faces.detector.path == pack / "det_10g.onnx" and faces.detector.input_size == (640, 640)
  # insightface's own router on the same files, where it is installed
  model_zoo = pytest.importorskip("insightface.model_zoo.model_zoo")
  tasks = {p.name: getattr(model_zoo.get_model(str(p), providers=["CPUExecutionProvider"]),
                           "taskname", None) for p in sorted(pack.glob("*.onnx"))}
  assert tasks["det_10g.onnx"] == "detection" and tasks["w600k_r50.onnx"] == "recognition"
  for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"):
    assert tasks[name] not in ("detection", "recognition")


def test_analyze_returns_detections_with_embeddings_of_the_aligned_faces(pack, stand_in):
  faces = analysis.load_face_analysis(pack)
  image = tiny_scrfd.image(3, (480, 560))
  found = faces.detector.detect(image)
  result = faces.analyze(image)
  assert len(result) == len(found) >= 2
  expected = faces.recognizer.embed_faces(image, found.keypoints)
  for i, face in enumerate(result):
    np.testing.assert_array_equal(face.box, found.boxes[i])
    np.testing.assert_array_equal(face.keypoints, found.keypoints[i])
    assert face.score == found.scores[i]
    np.testing.assert_array_equal(face.embedding, expected[i])
    assert face.embedding.shape == (512,)
    np.testing.assert_allclose(face.norm, np.linalg.norm(expected[i]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(face.normed_embedding), 1.0, rtol=1e-6)
  assert len(faces.analyze(image, max_num=1)) == 1


def test_pick_policies_follow_the_pipelines(pack, stand_in, caplog):
  faces = analysis.load_face_analysis(pack)
  result = faces.analyze(tiny_scrfd.image(3, (480, 560)))
  assert len(result) > 1
  areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in result]
  # InstantID / StoryMaker: sorted(faces, key=area)[-1]; PhotoMaker v2: faces[0] (highest score)
  with caplog.at_level(logging.WARNING, logger="persona_jax.face.analysis"):
    largest = analysis.pick(result, analysis.PIPELINE_PICKS["instantid"], "me.jpg")
  assert largest is sorted(result, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))[-1]
  assert largest.area == max(areas)
  assert f"me.jpg: {len(result)} faces found; using the largest box" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="persona_jax.face.analysis"):
    first = analysis.pick(result, analysis.PIPELINE_PICKS["photomaker_v2"], "me.jpg")
  assert first is result[0] and first.score == max(f.score for f in result)
  assert "using the first detected (highest score)" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="persona_jax.face.analysis"):
    assert analysis.pick(result[:1], "largest", "me.jpg") is result[0]
  assert caplog.text == ""
  with pytest.raises(ValueError, match="policy"):
    analysis.pick(result, "biggest")


def test_no_face_and_detection_sizes(pack, stand_in):
  import dataclasses
  faces = analysis.load_face_analysis(pack)
  blind = dataclasses.replace(faces.detector, score_threshold=1.01)
  sizes = []

  def spy(image, *, max_num=0, metric="default", input_size=None):
    sizes.append(input_size)
    return detection.FaceDetector.detect(blind, image, max_num=max_num, input_size=input_size)
  object.__setattr__(blind, "detect", spy)
  none = analysis.FaceAnalysis(blind, faces.recognizer)
  image = tiny_scrfd.image(3, (480, 560))
  assert none.analyze(image, det_sizes=analysis.PHOTOMAKER_V2_DET_SIZES) == []
  assert sizes == [(s, s) for s in analysis.PHOTOMAKER_V2_DET_SIZES]
  with pytest.raises(PersonaError, match=r"^holiday\.png: no face found; use a photo"):
    none.face(image, "first", image_name="holiday.png")
  sizes.clear()
  object.__setattr__(blind, "score_threshold", 0.5)
  assert len(none.analyze(image, det_sizes=analysis.PHOTOMAKER_V2_DET_SIZES)) > 0
  assert sizes == [(640, 640)]                  # the first size that finds a face ends the search


def test_bad_pack_folders(pack, tmp_path, stand_in, monkeypatch):
  expected = r"expected an insightface model pack: buffalo_l \(det_10g\.onnx, w600k_r50\.onnx\)"
  with pytest.raises(ModelFileError, match=rf"missing: no such folder; {expected}"):
    analysis.load_face_analysis(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ModelFileError, match=rf"empty: no \.onnx files; {expected}"):
    analysis.load_face_analysis(tmp_path / "empty")
  nested = tmp_path / "antelopev2" / "antelopev2"
  nested.mkdir(parents=True)
  shutil.copy(pack / "det_10g.onnx", nested / "scrfd_10g_bnkps.onnx")
  with pytest.raises(ModelFileError, match=r"no \.onnx files \(found some in .*antelopev2"
                                           r"/antelopev2: pass that folder\)"):
    analysis.load_face_analysis(tmp_path / "antelopev2")
  with pytest.raises(ModelFileError, match=r"antelopev2: no face recognizer \(an ONNX file "
                                           r"with a square input of 112\) among "
                                           r"scrfd_10g_bnkps\.onnx; expected an") as e:
    analysis.load_face_analysis(nested)
  assert "\n" not in str(e.value)
  only_rec = tmp_path / "only_rec"
  only_rec.mkdir()
  shutil.copy(pack / "w600k_r50.onnx", only_rec / "glintr100.onnx")
  with pytest.raises(ModelFileError, match=r"only_rec: no SCRFD detector \(an ONNX file with 5 or "
                                           r"more outputs\) among glintr100\.onnx"):
    analysis.load_face_analysis(only_rec)
  monkeypatch.setitem(sys.modules, "onnx", None)
  with pytest.raises(ConfigError, match=r"pip install 'persona-jax\[face\]'"):
    analysis.load_face_analysis(pack)


@pytest.fixture(scope="module")
def insightface_root(pack):
  """root/models/buffalo_l/ (insightface's layout under its `root`) with the pack's tiny SCRFD as
  det_10g.onnx and a tiny ArcFace IResNet exported as the released w600k_r50.onnx."""
  pytest.importorskip("torch")
  from tests.face import tiny_iresnet
  folder = pack.parent / "insightface_root" / "models" / "buffalo_l"
  folder.mkdir(parents=True)
  shutil.copy(pack / "det_10g.onnx", folder / "det_10g.onnx")
  tiny_iresnet.export(tiny_iresnet.build(0), folder / "w600k_r50.onnx")
  return folder.parent.parent


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # skimage, in insightface
def test_a_whole_pack_matches_insightfaces_face_analysis(insightface_root):
  """Boxes, scores and keypoints as insightface's; embeddings as its recognizer's on its aligned
  crops (1e-5 relative). Whole-pipeline embeddings agree to 1e-3 only: cv2.warpAffine rounds its
  samples in its own way (fixed point before OpenCV 4.11, float32 with FMAs after), so our
  alignment differs from it by 1 level on the odd pixel near a .5 tie."""
  app = pytest.importorskip("insightface.app")
  face_align = pytest.importorskip("insightface.utils.face_align")
  image = tiny_scrfd.image(3, (480, 560))
  faces = analysis.load_face_analysis(insightface_root / "models" / "buffalo_l")
  ours = faces.analyze(image)
  theirs = app.FaceAnalysis(name="buffalo_l", root=str(insightface_root),
                            allowed_modules=["detection", "recognition"],
                            providers=["CPUExecutionProvider"])
  theirs.prepare(ctx_id=-1, det_size=(640, 640))   # 2.1's default detects at 128 and at 640
  assert theirs.det_model.input_sizes == [(640, 640)]
  bgr = np.ascontiguousarray(image[..., ::-1])     # insightface reads images as cv2 does
  reference = theirs.get(bgr)
  assert len(ours) == len(reference) >= 2
  for face, expected in zip(ours, reference):
    np.testing.assert_array_equal(face.box, expected.bbox[:4])
    np.testing.assert_array_equal(face.keypoints, expected.kps)
    assert face.score == expected.det_score
    their_crop = face_align.norm_crop(bgr, expected.kps)[..., ::-1]
    our_crop = align.norm_crop(image, face.keypoints)
    assert np.abs(our_crop.astype(int) - their_crop).max() <= 1
    assert np.mean(our_crop != their_crop) < 1e-3
    on_their_crop = faces.recognizer.embed(np.ascontiguousarray(their_crop)[None])[0]
    assert _relative(on_their_crop, expected.embedding) < 1e-5
    assert _relative(face.embedding, expected.embedding) < 1e-3
    np.testing.assert_allclose(face.norm, expected.embedding_norm, rtol=1e-3)


def _relative(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
