"""The efficacy benchmark's subjects, prompts and scores (scored here by an oracle that knows each
image's scene, so the arithmetic is checked apart from the metric encoder)."""

from pathlib import Path

import numpy as np
import pytest

from persona_jax.errors import ConfigError
from persona_jax.world import efficacy as ef
from persona_jax.world import metric_encoder as me
from persona_jax.world import scenes


def test_subjects_are_held_out_fixed_and_cycle_through_the_classes():
  picked = ef.eval_subjects(8)
  assert picked == ef.eval_subjects(8) and picked[:3] == ef.eval_subjects(3)
  assert all(s.look in scenes.HELD_OUT_LOOKS for s in picked)
  assert [s.cls for s in picked[:6]] == list(scenes.CLASSES)
  assert len(set(picked)) == 8


def test_prompts_use_new_backgrounds_and_the_class_prompts_drop_the_identifier():
  subject = ef.eval_subjects(1)[0]
  prompts = ef.prompts_for(subject, f"sks {subject.cls}", contexts=2)
  assert [p.kind for p in prompts] == ["subject", "context", "context", "class", "class"]
  assert prompts[0].text == f"a photo of a sks {subject.cls}"
  for p in prompts[1:]:
    assert p.background not in scenes.reference_backgrounds()
    assert p.background not in (subject.look.colour, subject.look.pattern_colour)
    assert p.text.endswith(scenes.background_phrase(p.background))
    assert ("sks" in p.text) == (p.kind == "context")
  assert ef.subject_phrase(ef.EvalConfig("base_described"), subject) == subject.words
  assert ef.subject_phrase(ef.EvalConfig("textual_inversion"), subject) == "<sks>"
  with pytest.raises(ConfigError, match="not one of"):
    ef.EvalConfig(method="dreambooh")


def test_scores_count_matches_backgrounds_and_drift(monkeypatch):
  subject = ef.eval_subjects(1)[0]
  prompts = ef.prompts_for(subject, f"sks {subject.cls}", contexts=2)
  other = scenes.Look("red") if subject.look.colour != "red" else scenes.Look("blue")
  # Two seeds per prompt. Subject prompt: the subject twice. Context prompts: the subject on the
  # asked background, then a wrong look on it. Class prompts: one generic, one collapsed onto the
  # subject's look, both on the asked background.
  shown = [scenes.Scene(subject.cls, subject.look, "large", "center", "white")] * 2
  for p in prompts[1:3]:
    shown += [scenes.Scene(subject.cls, subject.look, "large", "center", p.background),
              scenes.Scene(subject.cls, other, "large", "center", p.background)]
  for p in prompts[3:]:
    shown += [scenes.Scene(subject.cls, other, "large", "center", p.background),
              scenes.Scene(subject.cls, subject.look, "large", "center", p.background)]
  images = np.stack([scenes.render(s) for s in shown])
  references = np.stack([scenes.render(s) for s in scenes.subject_scenes(subject, 3)])
  lookup = {images[i].tobytes(): s for i, s in enumerate(shown)}
  lookup.update({r.tobytes(): s for r, s in zip(references, scenes.subject_scenes(subject, 3))})

  def oracle(config, params, batch):
    truth = [lookup[np.asarray(x).tobytes()] for x in batch]
    feats = np.asarray([[1.0, 0.0] if s.look == subject.look else [0.0, 1.0] for s in truth])
    return feats, me.labels(truth)

  monkeypatch.setattr(me, "predict", oracle)
  got = ef.score((None, None), images, prompts, 2, subject, references)
  # Subject and context rows: 4 of 6 are the subject; similarity is 1 for those, 0 otherwise.
  assert got == pytest.approx({"subject_similarity": 4 / 6, "subject_match": 4 / 6,
                               "prompt_fidelity": 1.0, "class_fidelity": 1.0, "drift": 0.5})


def test_bundled_example_subject_is_the_first_eval_subject():
  from PIL import Image

  from persona_jax.data.pipeline import example_subject_dir
  subject = ef.eval_subjects(1)[0]
  files = sorted(example_subject_dir().glob("*.png"))
  assert len(files) == 4
  for f, scene in zip(files, scenes.subject_scenes(subject, 4)):
    np.testing.assert_array_equal(np.asarray(Image.open(f)), scenes.render(scene, 128))


TUNED = sorted(name for name, (_, r) in ef.recipes().items() if r.kind == "tuned")
TUNING_FREE = sorted(name for name, (_, r) in ef.recipes().items() if r.kind == "tuning_free")


def test_the_registry_gives_every_method_its_recipe():
  assert TUNED == ["blip_diffusion_finetune", "custom_diffusion", "dreambooth", "dreambooth_lora",
                   "dreambooth_noprior", "lora", "pivotal", "textual_inversion"]
  assert TUNING_FREE == ["blip_diffusion", "fastcomposer", "instantbooth", "ip_adapter",
                         "photomaker"]
  assert sorted(ef.method_names()) == [
      "base", "base_described", "blip_diffusion", "blip_diffusion_finetune", "custom_diffusion",
      "dreambooth", "dreambooth_lora",
      "dreambooth_noprior", "e4t",
      "fastcomposer", "instantbooth", "ip_adapter", "lora", "photomaker", "pivotal",
      "textual_inversion"]
  assert ef.recipes()["e4t"][1].kind == "one_image"


@pytest.mark.parametrize("method", TUNED)
def test_every_recipe_is_a_valid_run_with_class_images_only_under_a_prior(method, tmp_path):
  from persona_jax.train.config import run_config
  subject = ef.eval_subjects(1)[0]
  recipe = ef.recipes()[method][1]
  state = "runs/x" if recipe.state_key and not recipe.state_default else None
  cfg = ef.EvalConfig(method, steps=7, lr=0.0, state=state)
  run = run_config(ef.recipe_config(cfg, subject, tmp_path / "refs", tmp_path / "classes"))
  assert run.steps == 7 and run.optim.lr == 0.0 and run.data.resolution == 32
  assert (run.data.num_class_images > 0) == cfg.recipe.prior
  if cfg.recipe.prior:
    assert run.data.class_prompt == f"a photo of a {subject.cls}"
  if method == "dreambooth_noprior":
    assert run.prior_loss_weight == 0.0


def test_subjects_of_one_class_and_the_image_methods_phrases():
  balls = ef.eval_subjects(3, "ball")
  assert [s.cls for s in balls] == ["ball"] * 3 and len(set(balls)) == 3
  assert balls[0] == ef.eval_subjects(1)[0]          # the first subject is a ball either way
  assert all(s.look in scenes.HELD_OUT_LOOKS for s in balls)
  with pytest.raises(ConfigError, match="holds out"):
    ef.eval_subjects(1000, "ball")
  with pytest.raises(ConfigError, match="--subject-class 'cat'"):
    ef.EvalConfig("e4t", subject_class="cat")
  phrase = lambda method: ef.subject_phrase(ef.EvalConfig(method, state="x"), balls[0])
  assert phrase("e4t") == "*s"
  assert phrase("instantbooth") == "sks ball"
  assert phrase("ip_adapter") == "ball"
  assert phrase("fastcomposer") == "ball <|image|>"
  for method in TUNING_FREE:
    with pytest.raises(ConfigError, match="give --state WORKDIR"):
      ef.EvalConfig(method)
  with pytest.raises(ConfigError, match="--state is for .*e4t"):
    ef.EvalConfig("lora", state="runs/x")


def test_references_and_their_segmented_subjects(tmp_path):
  from PIL import Image
  subject = ef.eval_subjects(1)[0]
  refs = ef.write_references(subject, tmp_path, 2)
  for k, scene in enumerate(scenes.subject_scenes(subject, 2)):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{k:03d}.png")), refs[k])
    seg = np.asarray(Image.open(tmp_path / "segmented" / f"{k:03d}.png"))
    inside = scenes.coverage(scene) >= 0.5
    ys, xs = np.nonzero(inside)
    side = max(np.ptp(ys), np.ptp(xs)) + 1
    assert seg.shape == (side, side, 3)                 # cropped to the object, padded square
    assert set(map(tuple, seg.reshape(-1, 3))) >= set(map(tuple, refs[k][inside][:4]))


def test_e4t_recipe_tunes_the_first_reference_from_the_shipped_state(tmp_path):
  from persona_jax.train.config import run_config
  subject = ef.eval_subjects(1, "ball")[0]
  run = run_config(ef.recipe_config(ef.EvalConfig("e4t"), subject, tmp_path, tmp_path / "c"))
  assert run.steps == 15 and run.data.num_images == 1 and run.data.num_class_images == 0
  assert run.method_options["class_word"] == "ball" and run.method_options["pretrained"] == "shipped"
  run = run_config(ef.recipe_config(ef.EvalConfig("e4t", state="runs/e4t_pre"), subject, tmp_path,
                                    tmp_path / "c"))
  assert run.method_options["pretrained"] == "runs/e4t_pre"


def test_recipe_knobs_states_and_variants_are_generic(tmp_path):
  """The recipe's knobs under --input's, "{cls}" and "{references}" filled per subject; a state
  key with a required state that takes the run's result; a "name:variant" config."""
  from persona_jax.train.config import run_config
  subject = ef.eval_subjects(1, "ball")[0]
  cfg = ef.EvalConfig("blip_diffusion", state="x", inputs=(("prompt_reps", 1),
                                                          ("target_class", "{cls} at {references}")))
  assert ef.subject_inputs(ef.knob_values(cfg), tmp_path, subject.cls) == (
      ("subject_class", "ball"), ("prompt_reps", 1), ("target_class", f"ball at {tmp_path}"))
  assert ef.subject_inputs((("subject_class", "cat"),), tmp_path, "ball") == (("subject_class", "cat"),)
  with pytest.raises(ConfigError, match="give --state WORKDIR"):
    ef.EvalConfig("blip_diffusion_finetune")
  run_dir = tmp_path / "pre"
  cfg = ef.EvalConfig("blip_diffusion_finetune", state=str(run_dir))
  assert ef.state_value(cfg) == str(run_dir)                        # no result there: as given
  (run_dir / cfg.spec.result.file).mkdir(parents=True)
  run = run_config(ef.recipe_config(cfg, subject, tmp_path / "refs", tmp_path / "c"))
  assert run.model == str(run_dir / cfg.spec.result.file)
  assert (run.steps, run.optim.lr, run.data.source, run.data.instance_dir) == (
      40, 2e-4, "blip_diffusion", str(tmp_path / "refs"))
  assert run.method_options["stage"] == "finetune" and run.method_options["subject_class"] == "ball"


def test_tuning_free_samples_on_a_run_that_is_its_own_model(monkeypatch, tmp_path):
  """A tuning-free run whose recorded base is a method's own pipeline folder samples on it, with
  the first reference ("first"); the class prompts stay on the base."""
  from persona_jax.methods import registry
  own = tmp_path / "model"
  spec = type("Spec", (), {"base_model": staticmethod(lambda result: str(own))})()
  monkeypatch.setattr(registry, "find_run", lambda path, method: (spec, "result"))
  folder = own                                    # the one folder a method owns
  monkeypatch.setattr(registry, "pipeline_owner", lambda path: spec if Path(path) == folder else None)
  monkeypatch.setattr(registry, "load_model", lambda path: ("loaded", str(path)))
  calls = []
  monkeypatch.setattr(ef, "run_sampling", lambda s, r, pipe, images, inputs: calls.append(
      (pipe, tuple(images))) or "personal")
  base = type("Pipe", (), {"path": str(tmp_path / "base")})()
  refs = [tmp_path / f"{k:03d}.png" for k in range(3)]
  pipe, personal, plain = ef.tuning_free_sampling(ef.EvalConfig("blip_diffusion", state="x"), base,
                                                  refs, [])
  assert pipe == ("loaded", str(own)) and personal == "personal" and plain is None
  assert calls == [(pipe, (refs[0],))]
  own = tmp_path / "elsewhere"                    # not a method's own folder: the base
  pipe, _, _ = ef.tuning_free_sampling(ef.EvalConfig("ip_adapter", state="x"), base, refs, [])
  assert pipe is base
