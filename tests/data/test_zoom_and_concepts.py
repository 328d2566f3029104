"""Custom Diffusion's data: the zoom augmentation (pixels, loss mask, caption words) and several
concepts in one run."""

import numpy as np
import pytest
from PIL import Image

from persona_jax import ConfigError
from persona_jax.data import images as img_ops
from persona_jax.data import pipeline as data
from tests.runs import write_class_images


def test_zoom_out_pastes_on_a_blank_canvas_and_masks_the_square_shrunk_by_a_latent_pixel():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  pixels, mask = img_ops.zoom(image, 32, 16, 4, 8, factor=2)
  small = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(pixels[4:20, 8:24], img_ops.to_model_range(small))
  outside = np.ones((32, 32), bool)
  outside[4:20, 8:24] = False
  assert np.all(pixels[outside] == 0)
  expected = np.zeros((16, 16, 1), np.float32)
  expected[3:9, 5:11] = 1             # latent rows 2..9 minus one on each side
  np.testing.assert_array_equal(mask, expected)


def test_zoom_in_crops_and_keeps_the_whole_loss():
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  pixels, mask = img_ops.zoom(image, 32, 40, 3, 5, factor=4)
  big = np.asarray(Image.fromarray(image).resize((40, 40), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(pixels, img_ops.to_model_range(big[3:35, 5:37]))
  assert mask.shape == (8, 8, 1) and np.all(mask == 1)


def test_zoom_draws_pair_the_caption_words_with_the_scale():
  config = data.DataConfig(resolution=64, zoom_augment=True)
  augment = data.Augment(config, None, None, None, None, None, latent_factor=8)
  image = np.full((64, 64, 3), 200, np.uint8)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(60):
    pixels, mask, words = augment.zoom(image, rng)
    seen.add(words)
    pasted = int(np.sum(np.any(pixels != 0, axis=-1), axis=0).max())      # the pasted side
    if words in data.ZOOM_IN_WORDS:
      assert np.all(mask == 1)
    elif words in data.ZOOM_OUT_WORDS:
      assert pasted < 0.6 * 64 and mask.sum() < 64
    else:
      assert words == "" and 0.6 * 64 <= pasted <= 64 and mask.sum() < 64
  assert seen == set(data.ZOOM_IN_WORDS + data.ZOOM_OUT_WORDS) | {""}


def test_two_concepts_load_their_own_images_and_captions(tmp_path):
  second = write_class_images(tmp_path / "chair", 3, size=40)
  config = data.DataConfig(caption_source="prompt", resolution=32, concepts=(
      {"prompt": "photo of a <new1> toy"},
      {"instance_dir": str(second), "prompt": "photo of a <new2> chair"}))
  instances = data.load_instances(config, lambda p: p)
  assert len(instances.images) == 4 + 3                     # the example subject, then the chairs
  assert instances.captions[0] == ["photo of a <new1> toy"]
  assert instances.captions[-1] == ["photo of a <new2> chair"]
  assert "zoomed in photo of a <new2> chair" in data.zoom_captions(instances)


@pytest.mark.parametrize("concepts, match", [
    (({"prompt": "x", "resolution": 64},), r"data.concepts\[0\].resolution: not a per-concept option"),
    (("photo of a <new1> toy",), r"data.concepts\[0\]: expected a mapping"),
])
def test_bad_concepts_are_named(concepts, match):
  with pytest.raises(ConfigError, match=match):
    data.concept_configs(data.DataConfig(concepts=concepts))
