"""The grain pipeline: deterministic batches, checkpointable iterator, caching choices."""

import numpy as np
import pytest

from persona_jax import ConfigError
from persona_jax.data import pipeline as data
from persona_jax.data.batch import CONTEXT, IDS, LATENT_LOGVAR, LATENT_MEAN, MASK, PIXELS, TIME_IDS


def instances(config):
  return data.load_instances(config, lambda p: p.replace("<t>", "<t> <t>_1"))


def fake_tokenize(prompts):
  return {IDS: np.asarray([[len(p), hash(p) % 1000] for p in prompts], np.int32)}


def test_batches_are_deterministic_and_resume_from_iterator_state():
  config = data.DataConfig(prompt="<t>", resolution=32, center_crop=False)
  inst = instances(config)
  assert len(inst.images) == 4 and inst.captions[0][0] == "a photo of a <t> <t>_1"
  ds = data.make_dataset(config, inst, 3, seed=7, tokenize=fake_tokenize)
  it = data.make_iterator(ds)
  first = [next(it) for _ in range(3)]
  assert first[0][PIXELS].shape == (3, 32, 32, 3) and first[0][IDS].shape == (3, 2)
  assert -1 <= first[0][PIXELS].min() < first[0][PIXELS].max() <= 1
  state = it.get_state()
  later = [next(it) for _ in range(3)]
  again = data.make_iterator(data.make_dataset(config, inst, 3, seed=7, tokenize=fake_tokenize))
  again.set_state(state)
  for a, b in zip(later, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a[PIXELS], b[PIXELS])
    np.testing.assert_array_equal(a[IDS], b[IDS])
  other = next(data.make_iterator(data.make_dataset(config, inst, 3, seed=8, tokenize=fake_tokenize)))
  assert not np.array_equal(other[PIXELS], first[0][PIXELS])


def test_cached_moments_and_contexts():
  config = data.DataConfig(prompt="<t>", resolution=32, caption_dropout=0.5)
  inst = instances(config)
  n = len(inst.images)
  moments = (np.arange(n * 2, dtype=np.float32).reshape(n, 2, 1, 1, 1) * np.ones((1, 1, 4, 4, 2)),
             np.zeros((n, 2, 4, 4, 2), np.float32))
  captions = data.all_captions(inst, config.caption_dropout)
  assert "" in captions
  contexts = {CONTEXT: np.arange(len(captions), dtype=np.float32)[:, None, None] * np.ones((1, 3, 5))}
  ds = data.make_dataset(config, inst, 4, seed=0, moments=moments,
                         caption_index={c: i for i, c in enumerate(captions)}, contexts=contexts)
  seen_flip, seen_empty = set(), False
  it = data.make_iterator(ds)
  for _ in range(10):
    b = next(it)
    assert set(b) == {LATENT_MEAN, LATENT_LOGVAR, CONTEXT, TIME_IDS}
    seen_flip |= {int(v) % 2 for v in b[LATENT_MEAN][:, 0, 0, 0]}
    seen_empty |= bool((b[CONTEXT][:, 0, 0] == captions.index("")).any())
  assert seen_flip == {0, 1} and seen_empty


def test_bad_data_config():
  with pytest.raises(ConfigError, match="data.caption_source"):
    instances(data.DataConfig(caption_source="auto", prompt="x"))
  with pytest.raises(ConfigError, match="data.prompt"):
    instances(data.DataConfig(caption_source="templates"))


def test_class_stream_appends_class_rows(tmp_path):
  from persona_jax.data.batch import PRIOR
  from tests.runs import write_class_images
  config = data.DataConfig(prompt="<t>", caption_source="prompt", resolution=32, caption_dropout=0.5,
                           num_class_images=3, class_prompt="a toy")
  inst = instances(config)
  folder = write_class_images(tmp_path / "c", n=5)
  classes = data.load_class_images(config, folder)
  assert len(classes.images) == 3 and classes.captions == [["a toy"]] * 3
  captions = data.all_captions(inst, config.caption_dropout, classes)
  assert captions == ["", "<t> <t>_1", "a toy"]
  index = {c: i for i, c in enumerate(captions)}
  contexts = {CONTEXT: np.arange(3, dtype=np.float32)[:, None, None] * np.ones((1, 2, 4))}
  ds = data.make_dataset(config, inst, 2, seed=0, caption_index=index, contexts=contexts,
                         classes=classes)
  it = data.make_iterator(ds)
  seen = set()
  for _ in range(6):
    b = next(it)
    assert b[PIXELS].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(b[PRIOR], [0, 0, 1, 1])
    assert set(b[CONTEXT][2:, 0, 0]) == {index["a toy"]}            # never dropped
    assert index["a toy"] not in set(b[CONTEXT][:2, 0, 0])
    seen |= {img.tobytes() for img in b[PIXELS][2:]}
  assert len(seen) >= 3                                             # all class images, flipped or not
  state = it.get_state()
  nxt = next(it)
  again = data.make_iterator(data.make_dataset(config, inst, 2, seed=0, caption_index=index,
                                               contexts=contexts, classes=classes))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)[PIXELS], nxt[PIXELS])


def test_subject_masks_weight_the_loss(tmp_path):
  from PIL import Image
  for k in range(2):
    Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
  mask = np.zeros((32, 32), np.uint8)
  mask[:, :8] = 255                                                # the left quarter: subject
  mask[:4, 8:16] = 255                                             # half of one 8x8 block
  Image.fromarray(mask).save(tmp_path / "0.mask.png")              # image 1 has no mask
  config = data.DataConfig(instance_dir=str(tmp_path), caption_source="prompt", prompt="x",
                           resolution=32, random_flip=0.5, mask_loss_weight=4.0)
  inst = data.load_instances(config, lambda p: p)
  n = len(inst.images)
  # Moments whose value says (image, flip): row index * 2 + flip.
  moments = (np.arange(n * 2, dtype=np.float32).reshape(n, 2, 1, 1, 1) * np.ones((1, 1, 4, 4, 2)),
             np.zeros((n, 2, 4, 4, 2), np.float32))
  ds = data.make_dataset(config, inst, 2, seed=0, moments=moments, caption_index={"x": 0},
                         contexts={CONTEXT: np.zeros((1, 3, 5), np.float32)})
  expected = np.ones((4, 4), np.float32)
  expected[:, 0] = 5.0
  expected[0, 1] = 1 + 4 * 0.5
  seen = set()
  it = data.make_iterator(ds)
  for _ in range(8):
    b = next(it)
    assert b[MASK].shape == (2, 4, 4, 1)
    for code, weights in zip(b[LATENT_MEAN][:, 0, 0, 0].astype(int), b[MASK][..., 0]):
      image, flip = divmod(code, 2)
      want = np.ones((4, 4)) if image == 1 else expected[:, ::-1] if flip else expected
      np.testing.assert_allclose(weights, want, atol=1e-6)
      seen.add((image, flip))
  assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}
  with pytest.raises(ConfigError, match="data.mask_loss_weight"):
    data.make_dataset(data.DataConfig(mask_loss_weight=-1.0), inst, 2, seed=0, tokenize=fake_tokenize)
  (tmp_path / "0.mask.png").unlink()
  unmasked = data.load_instances(config, lambda p: p)
  with pytest.raises(ConfigError, match="data.mask_loss_weight: no image in .* has a subject mask"):
    data.make_dataset(config, unmasked, 2, seed=0, tokenize=fake_tokenize)


def test_moments_of_unflipped_runs_skip_the_mirror_and_do_not_depend_on_the_batch(pipes):
  pipe = pipes["sd1"]
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  mean2, logvar2 = data.encode_moments(pipe.vae, pipe.params["vae"], images, batch=2)
  mean1, logvar1 = data.encode_moments(pipe.vae, pipe.params["vae"], images, mirror=False)
  assert mean2.shape == (3, 2, 16, 16, 4) and mean1.shape == (3, 1, 16, 16, 4)
  np.testing.assert_allclose(mean1[:, 0], mean2[:, 0], atol=1e-5)
  np.testing.assert_allclose(logvar1[:, 0], logvar2[:, 0], atol=1e-5)
  assert not np.allclose(mean2[:, 0], mean2[:, 1])                  # the mirror differs
