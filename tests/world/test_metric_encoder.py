"""The metric encoder's labels and outputs (its held-out accuracy test joins with its shipped
weights)."""

import jax
import jax.numpy as jnp
import numpy as np

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
