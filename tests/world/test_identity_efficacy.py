"""The identity benchmark's identities, prompts, references and scores (world/identity_efficacy.py),
judged by a FaceAnalysis of a stub detector that knows the true keypoints of the images it was
shown and the shipped toy recognizer; the paired difference; the CLI's refusals."""

import json

import numpy as np
import pytest

from persona_jax.errors import ConfigError
from persona_jax.face.analysis import FaceAnalysis
from persona_jax.face.detection import Detections
from persona_jax.face.recognition import shipped_toy_recognizer
from persona_jax.world import efficacy as ef
from persona_jax.world import identities, scenes
from persona_jax.world import identity_efficacy as ie
from persona_jax.world.toy_identity_encoder import face_keypoints
from tests.markers import slow


class KnownFacesDetector:
  """A detector stub: the keypoints it was given for an image (by its bytes); no face in others;
  `anywhere`: these keypoints for any image that is not one flat colour."""
  static_size = None

  def __init__(self, known=None, anywhere=None):
    self.known = dict(known or {})
    self.anywhere = anywhere

  def detect(self, image, *, max_num=0, metric="default", input_size=None) -> Detections:
    image = np.asarray(image)
    points = self.known.get(image.tobytes())
    if points is None and self.anywhere is not None and np.ptp(image) > 0:
      points = self.anywhere
    if points is None:
      return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                        np.zeros((0, 5, 2), np.float32))
    box = np.concatenate([points.min(0) - 2, points.max(0) + 2])[None].astype(np.float32)
    return Detections(box, np.ones(1, np.float32), points[None].astype(np.float32))


def judge_of(images, scene_list) -> FaceAnalysis:
  known = {im.tobytes(): face_keypoints(s)[0] for im, s in zip(images, scene_list)}
  return FaceAnalysis(KnownFacesDetector(known), shipped_toy_recognizer())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """(identity, folder, images [4, 32, 32, 3], scenes) of the first eval identity."""
  who = ie.eval_identities(1)[0]
  folder = tmp_path_factory.mktemp("refs") / ie.subject_name(who)
  images, scene_list = ie.write_identity_references(who, folder, 4)
  return who, folder, images, scene_list


def test_identities_are_held_out_fixed_and_cycle_through_the_classes():
  picked = ie.eval_identities(7)
  assert picked == ie.eval_identities(7) and picked[:3] == ie.eval_identities(3)
  assert all(w.held_out for w in picked) and len(set(picked)) == 7
  assert [w.cls for w in picked[:5]] == list(identities.IDENTITY_CLASSES)
  assert [w.cls for w in ie.eval_identities(3, "star")] == ["star"] * 3
  assert len({ie.subject_name(w) for w in ie.eval_identities(200)}) == 200
  with pytest.raises(ConfigError, match="holds out"):
    ie.eval_identities(500, "ball")


def test_prompts_ask_for_new_plain_backgrounds_none_of_the_identitys_colours(references):
  who, _, _, scene_list = references
  backgrounds = ie.new_backgrounds(who, scene_list)
  phrase = ef.subject_phrase(ef.EvalConfig("base_described", domain="identities"), who)
  assert phrase == who.words
  prompts = ef.prompts_for(who, "ball img", 2, backgrounds)
  assert prompts == ef.prompts_for(who, "ball img", 2, backgrounds)
  assert [p.kind for p in prompts] == ["subject", "context", "context", "class", "class"]
  assert prompts[0].text == "a photo of a ball img"
  own = {who.look.colour, who.look.pattern_colour, who.mark_colour}
  for p in prompts[1:]:
    assert p.background in scenes.BG_COLOURS and p.background not in own
    assert p.background not in {s.background for s in scene_list}
    assert ("img" in p.text) == (p.kind == "context") and who.cls in p.text
  with pytest.raises(ConfigError, match="no background is left"):
    ef.prompts_for(who, "x", 2, [])


def test_references_and_their_face_embeddings(references):
  from PIL import Image
  who, folder, images, scene_list = references
  for k, scene in enumerate(scene_list):
    assert scene.identities == (who,)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{k:03d}.png")), images[k])
    assert (folder / "segmented" / f"{k:03d}.png").is_file()
  emb = np.load(folder / ie.EMBEDDINGS_FILE)
  rec = shipped_toy_recognizer()
  assert emb.shape == (4, 512) and emb.dtype == np.float32
  # The same person in four scenes: every pair above the recognizer's threshold; another
  # identity's scene below it.
  unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  assert (unit @ unit.T).min() > rec.threshold
  other = identities.identity_scene(0, "held_out", 0, who=ie.eval_identities(2)[1])
  e = rec.embed_faces(identities.render(other), face_keypoints(other))[0]
  assert (unit @ (e / np.linalg.norm(e))).max() < rec.threshold


def test_references_as_generations_are_the_person_and_blank_images_no_face(references):
  who, _, images, scene_list = references
  judge = judge_of(images, scene_list)
  prompts = ef.prompts_for(who, who.cls, 1, ie.new_backgrounds(who, scene_list))   # 3 prompts
  centre = ie.reference_centre(judge, images, ie.true_keypoints(scene_list))
  # Each prompt's two seeds: references 0..5 cycled (the class prompt's are the person too).
  got = ie.identity_scores(judge, images[np.arange(6) % 4], prompts, 2, centre)
  assert got["face_rate"] == 1.0 and got["identity_match"] == 1.0
  assert got["identity_drift"] == 1.0
  assert rec_threshold(judge) < got["identity_similarity"] <= 1.0
  # One reference, its own centre: similarity 1.
  one = ie.reference_centre(judge, images[:1], ie.true_keypoints(scene_list[:1]))
  assert ie.identity_scores(judge, images[[0] * 6], prompts, 2, one)["identity_similarity"] == (
      pytest.approx(1.0, abs=1e-5))
  blank = np.full((6, 32, 32, 3), 128, np.uint8)
  assert ie.identity_scores(judge, blank, prompts, 2, centre) == {
      "identity_similarity": 0.0, "identity_match": 0.0, "face_rate": 0.0, "identity_drift": 0.0}
  # Another identity's scenes, its faces found: below the threshold.
  other = ie.eval_identities(2)[1]
  other_scenes = ie.reference_scenes(other, 6)
  other_images = np.stack([identities.render(s) for s in other_scenes])
  got = ie.identity_scores(judge_of(other_images, other_scenes), other_images, prompts, 2, centre)
  assert got["face_rate"] == 1.0 and got["identity_match"] == 0.0
  assert got["identity_similarity"] < rec_threshold(judge)


def rec_threshold(judge) -> float:
  return judge.recognizer.threshold


def test_paired_difference_matches_subjects_by_name(tmp_path):
  base = {"method": "base", "subjects": [{"subject": n, "s": v}
                                         for n, v in (("a", 0.2), ("b", 0.4), ("c", 0.3))]}
  run = {"method": "m", "subjects": [{"subject": n, "s": v}
                                     for n, v in (("c", 0.9), ("a", 0.5), ("z", 9.0))]}
  mean, se, n = ef.paired_difference(run, base, "s")
  d = np.asarray([0.6, 0.3])
  assert n == 2 and mean == pytest.approx(d.mean())
  assert se == pytest.approx(d.std(ddof=1) / np.sqrt(2))
  assert ef.paired_difference({"subjects": run["subjects"][:1]}, base, "s")[1] == 0.0
  with pytest.raises(ConfigError, match="shares no subject"):
    ef.paired_difference({"method": "m", "subjects": [{"subject": "q", "s": 1.0}]}, base, "s")
  (tmp_path / "eval.json").write_text(json.dumps(base))
  assert ef.read_summary(tmp_path) == base
  with pytest.raises(ConfigError, match="no such file"):
    ef.read_summary(tmp_path / "nowhere")
  (tmp_path / "bad.json").write_text("[1]")
  with pytest.raises(ConfigError, match="not an eval.json"):
    ef.read_summary(tmp_path / "bad.json")
  row = ie.table_row({"method": "m", "steps": 0, "train_seconds": 0, "sample_seconds": 3,
                      "identity_similarity": 0.5, "identity_match": None, "face_rate": 1.0,
                      "prompt_fidelity": 0.5, "class_fidelity": 0.5, "drift": 0.0,
                      "identity_drift": 0.0,
                      "subjects": [{"subject": "a", "identity_similarity": 0.5}]},
                     {"subjects": [{"subject": "a", "identity_similarity": 0.2}]})
  assert "| 0.500 | +0.300 +- 0.000 | - | 1.00 |" in row


def test_references_placeholder_in_knob_values():
  from pathlib import Path
  got = ef.subject_inputs((("face_embedding", Path("{references}/face_embeddings.npy")),
                           ("face_analysis", "toy"), ("ip_scale", 0.5)), Path("/o/refs/1_x"))
  assert got == (("face_embedding", Path("/o/refs/1_x/face_embeddings.npy")),
                 ("face_analysis", "toy"), ("ip_scale", 0.5))


def test_the_config_checks_the_domains_classes():
  ef.EvalConfig("base", domain="identities", subject_class="heart")
  with pytest.raises(ConfigError, match="'ring': not one of .* identities domain"):
    ef.EvalConfig("base", domain="identities", subject_class="ring")
  with pytest.raises(ConfigError, match="--domain 'faces'"):
    ef.EvalConfig("base", domain="faces")
  with pytest.raises(ConfigError, match="runs the identities domain"):
    ie.evaluate(ef.EvalConfig("base"), "unused")


@pytest.mark.parametrize("argv, message", [
    (["--prompt-following", "4", "--method", "base"], "--method is for the efficacy benchmark"),
    (["--prompt-following", "4", "--vs-base", "x"], "--vs-base is for the efficacy benchmark"),
    (["--method", "base", "--judge", "toy"], "--judge judges identities"),
    (["--domain", "identities"], "give --method NAME"),
    (["--domain", "identities", "--method", "base", "--subject-class", "ring"], "'ring'"),
    (["--domain", "identities", "--method", "ip_adapter"], "give --state WORKDIR"),
    (["--domain", "identities", "--method", "base", "--vs-base", "nowhere"], "nowhere: no such"),
    (["--domain", "identities", "--method", "base", "--vs-base", "BASE"], "contexts 3, this run 2"),
    (["--method", "base", "--contexts", "3", "--vs-base", "BASE"], "domain 'identities', this run"),
])
def test_the_cli_refuses_bad_combinations_in_one_line(argv, message, tmp_path, capsys):
  from persona_jax.cli import main
  base = {"method": "base", "config": {"domain": "identities", "contexts": 3}, "subjects": []}
  (tmp_path / "base.json").write_text(json.dumps(base))
  argv = [str(tmp_path / "base.json") if a == "BASE" else a for a in argv]
  assert main(["eval", "--out", str(tmp_path / "o"), *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o").exists()


@slow
def test_the_base_row_end_to_end(tmp_path, monkeypatch, capsys):
  """`eval --domain identities --method base` on toy-xl, judged by the stub that finds a face
  at the keypoint template's place in any generation (in-process, until the toy detector)."""
  from persona_jax.cli import main
  from persona_jax.world import toy_identity_encoder as tie
  stub = FaceAnalysis(KnownFacesDetector(anywhere=tie.TEMPLATE), shipped_toy_recognizer())
  monkeypatch.setattr(ie, "load_judge", lambda name=ie.JUDGE: stub)
  argv = ["eval", "--domain", "identities", "--method", "base", "--model", "toy-xl",
          "--subjects", "1", "--seeds", "1", "--contexts", "1", "--sample-steps", "2",
          "--noprogress", "--out", str(tmp_path / "base")]
  assert main(argv) == 0
  summary = json.loads((tmp_path / "base" / "eval.json").read_text())
  (row,) = summary["subjects"]
  who = ie.eval_identities(1)[0]
  assert row["subject"] == ie.subject_name(who) and summary["domain"] == "identities"
  assert row["prompts"][0] == f"a photo of a {who.cls}" and row["face_rate"] == 1.0
  assert -1.0 <= row["identity_similarity"] <= 1.0
  assert np.load(tmp_path / "base" / "references" / row["subject"] / ie.EMBEDDINGS_FILE).shape == (
      4, 512)
  assert (tmp_path / "base" / "samples" / f"{row['subject']}.png").is_file()
  out = capsys.readouterr().out
  assert out.startswith(ie.TABLE_HEADER) and "| base | 0 |" in out
  # The same run against itself as the base: a paired difference of 0.
  assert main([*argv[:-1], str(tmp_path / "again"), "--vs-base", str(tmp_path / "base")]) == 0
  assert "| +0.000 +- 0.000 |" in capsys.readouterr().out
