"""The metric encoder's labels and outputs, and the shipped encoder's held-out accuracy (the
bar: 95% per attribute), which every efficacy number rests on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.world import metric_encoder as me
from persona_jax.world import scenes


def test_labels_index_the_attribute_tables():
  scene = scenes.Scene("star", scenes.Look("green", "dotted", "white"), "small", "left", "grass")
  y = me.labels([scene, scenes.Scene("ball", scenes.Look("red"), "large", "center", "blue")])
  assert scenes.ATTRIBUTES["class"][y["class"][0]] == "star"
  assert scenes.ATTRIBUTES["pattern_colour"][y["pattern_colour"][0]] == "white"
  assert scenes.ATTRIBUTES["pattern_colour"][y["pattern_colour"][1]] == "none"
  assert scenes.ATTRIBUTES["background"][y["background"][0]] == "grass"


def test_outputs_are_unit_features_and_one_head_per_attribute():
  model = me.MetricEncoder()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  images, _, _ = scenes.batch(0, "test", 0, 3, captions=False)
  feats, logits = model.apply({"params": params}, images)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
  assert {k: v.shape for k, v in logits.items()} == {k: (3, len(v)) for k, v in scenes.ATTRIBUTES.items()}


@pytest.fixture(scope="module")
def shipped():
  return me.load()


def test_shipped_encoder_meets_the_bar_on_held_out_scenes(shipped):
  # "test"-split scenes (the encoder trained on "train" scenes), every look, rendered by the
  # reference numpy renderer rather than the JAX one it trained with.
  accuracy = me.accuracy(*shipped, seed=1, n=1000)
  assert min(accuracy.values()) >= 0.95, accuracy


def test_shipped_encoder_recognizes_the_eval_subjects_looks(shipped):
  from persona_jax.world.efficacy import eval_subjects
  subject_list = eval_subjects(12)
  scene_list = [sc for s in subject_list for sc in scenes.subject_scenes(s, 4, seed=7)]
  images = np.stack([scenes.render(sc) for sc in scene_list])
  _, predicted = me.predict(*shipped, images)
  truth = me.labels(scene_list)
  right = np.all([predicted[k] == truth[k] for k in ("class", "colour", "pattern", "pattern_colour")],
                 axis=0)
  assert right.mean() >= 0.9, right.mean()


def test_prompt_following_scores_the_scenes_themselves_high_and_mismatches_low(shipped):
  from persona_jax.world import prompt_following as pf
  prompts, asked = pf.held_out_prompts(64, seed=3)
  assert len(set(prompts)) == 64 and all(p.startswith("a photo of a ") for p in prompts)
  images = np.stack([scenes.render(scenes.sample_scene(3, "test", k)) for k in range(64)])
  good = pf.score(shipped, images, asked)
  assert good["class_colour_background"] >= 0.9 and good["all"] >= 0.85, good
  bad = pf.score(shipped, images[::-1], asked)
  assert bad["class_colour_background"] <= 0.2, bad
