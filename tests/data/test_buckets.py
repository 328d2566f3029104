"""Aspect-ratio buckets (data/buckets.py): kohya's bucket lists, assignment by aspect, batches of
one bucket (class rows cropped to it), determinism and resume, time ids and masks of crops."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from persona_jax import ConfigError
from persona_jax.data import buckets as B
from persona_jax.data import images as img_ops
from persona_jax.data import pipeline as data
from persona_jax.data.batch import (IDS, LATENT_LOGVAR, LATENT_MEAN, MASK, PIXELS, PRIOR,
                                    TIME_IDS)
from tests.runs import write_class_images

# (H, W): square, 3:2, 2:3 and an odd size (37 wide, 53 high).
SIZES = {"a": (32, 32), "b": (32, 48), "c": (48, 32), "d": (53, 37)}


def kohya_resolutions(max_reso, min_size, max_size, divisible):
  """sd-scripts library/model_util.py make_bucket_resolutions, transcribed."""
  max_width, max_height = max_reso
  max_area = max_width * max_height
  resos = set()
  width = int(math.sqrt(max_area) // divisible) * divisible
  resos.add((width, width))
  width = min_size
  while width <= max_size:
    height = min(max_size, int((max_area // width) // divisible) * divisible)
    if height >= min_size:
      resos.add((width, height))
      resos.add((height, width))
    width += divisible
  return sorted(resos)


def test_bucket_lists_are_kohyas():
  for resolution, sides in ((1024, (512, 2048, 64)), (512, (256, 1024, 64)),
                            (768, (384, 1536, 64))):
    config = data.DataConfig(resolution=resolution, buckets=True)
    assert B.bucket_sides(config) == sides
    buckets = B.config_buckets(config)
    assert buckets == kohya_resolutions((resolution, resolution), *sides)
    area = resolution ** 2
    for b in buckets:
      assert b.width % 64 == 0 and b.height % 64 == 0 and (b.height, b.width) in buckets
      assert area - 64 * max(b) < b.width * b.height <= area      # within a step of the square's
  xl = B.config_buckets(data.DataConfig(resolution=1024, buckets=True))
  for wh in ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
             (1536, 640), (512, 2048)):
    assert wh in xl
  assert str(xl[0]) == "512x1856" and xl[0].shape == (1856, 512)
  # kohya's own defaults (min 256, max 1024) at 1024: the capped sides are its too.
  assert (B.bucket_resolutions(1024, 256, 1024, 64)
          == kohya_resolutions((1024, 1024), 256, 1024, 64))


@pytest.mark.parametrize("fields, match", [
    (dict(bucket_step=12), r"^data.bucket_step: 12 must be a multiple of 8 \(the VAE"),
    (dict(bucket_step=0), r"^data.bucket_step: 0 must be > 0"),
    (dict(bucket_min=100), r"^data.bucket_min: 100 must be a positive multiple of data.bucket_st"),
    (dict(bucket_max=448), r"^data.resolution: 512 must lie between data.bucket_min \(256\) and "
                           r"data.bucket_max \(448\)"),
    (dict(zoom_augment=True), r"^data.zoom_augment: .*square"),
])
def test_bad_bucket_options_name_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    B.check_config(data.DataConfig(resolution=512, buckets=True, **fields), latent_factor=8)


def test_assignment_by_aspect_and_cover_size():
  buckets = B.config_buckets(data.DataConfig(resolution=1024, buckets=True))
  assert B.assign(buckets, 1000, 1500) == (1216, 832)         # 3:2 -> 1.46
  assert B.assign(buckets, 1500, 1000) == (832, 1216)
  assert B.assign(buckets, 700, 700) == (1024, 1024)
  assert B.assign(buckets, 832, 1216) == (1216, 832)          # its own size
  for h, w in ((1000, 1500), (1500, 1000), (53, 37), (4000, 300)):
    b = B.assign(buckets, h, w)
    errors = [abs(c.width / c.height - w / h) for c in buckets]
    assert abs(b.width / b.height - w / h) == min(errors)
    rh, rw = B.cover_size(h, w, b)
    assert rh >= b.height and rw >= b.width and (rh == b.height or rw == b.width)
    assert abs(rw / rh - w / h) < 2 / min(rh, rw)            # the aspect kept, up to rounding


def fake_tokenize(prompts):
  return {IDS: np.asarray([[len(p)] for p in prompts], np.int32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("buckets")
  rng = np.random.default_rng(0)
  inst = root / "inst"
  inst.mkdir()
  for name, (h, w) in SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inst / f"{name}.png")
  mask = np.zeros((32, 48), np.uint8)
  mask[:, :20] = 255                                          # b's left part is the subject
  Image.fromarray(mask).save(inst / "b.mask.png")
  return SimpleNamespace(inst=inst, cls=write_class_images(root / "cls", n=3, size=40))


def config(folders, **kw):
  values = dict(instance_dir=str(folders.inst), caption_source="prompt", prompt="x", resolution=32,
                buckets=True, bucket_step=8, num_class_images=3, class_prompt="y")
  return data.DataConfig(**{**values, **kw})


def dataset(c, folders, batch=2, seed=0, **kw):
  inst = data.load_instances(c, lambda p: p)
  classes = data.load_class_images(c, folders.cls, sorted(set(inst.buckets)))
  return inst, classes, data.make_dataset(c, inst, batch, seed, tokenize=fake_tokenize,
                                          classes=classes, latent_factor=4, **kw)


def test_batches_are_one_bucket_with_class_rows_and_resume_exactly(folders):
  c = config(folders, center_crop=False)
  inst, classes, ds = dataset(c, folders)
  assert [str(b) for b in inst.buckets] == ["32x32", "40x24", "24x40", "24x40"]
  assert sorted(classes) == sorted(set(inst.buckets))
  for b, s in classes.items():              # the 40x40 class images resized to cover each bucket
    assert [i.shape[:2] for i in s.images] == [B.cover_size(40, 40, b)] * 3
  it = data.make_iterator(ds)
  batches = [next(it) for _ in range(9)]                       # three epochs of 3 batches
  seen = []
  for k, b in enumerate(batches):
    h, w = b[PIXELS].shape[1:3]
    assert b[PIXELS].shape == (4, h, w, 3) and (w, h) in inst.buckets    # one bucket, 2 + 2 rows
    np.testing.assert_array_equal(b[PRIOR], [0, 0, 1, 1])
    np.testing.assert_array_equal(b[TIME_IDS][:, 4:], [[h, w]] * 4)
    assert (b[TIME_IDS][2:, :2] == 40).all()                  # class rows: their 40x40 files
    seen.append(tuple(map(tuple, b[TIME_IDS][:2, :2].astype(int))))
    np.testing.assert_array_equal(b[PIXELS], ds[k][PIXELS])   # batch k alone is batch k
  for epoch in range(3):                                      # every image every epoch; the 1-image
    rows = {s for batch in seen[3 * epoch: 3 * epoch + 3] for s in batch}   # buckets repeat it
    assert rows == {(32, 32), (32, 48), (48, 32), (53, 37)}
  assert ((32, 48), (32, 48)) in seen and ((32, 32), (32, 32)) in seen
  # Resume from the iterator's state; another seed gives another order.
  again = data.make_iterator(dataset(c, folders)[2])
  again.set_state({"next_index": 4})
  for a, b in zip(batches[4:], [next(again) for _ in range(5)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = [dataset(c, folders, seed=1)[2][k][TIME_IDS] for k in range(3)]
  assert any(not np.array_equal(o, b[TIME_IDS]) for o, b in zip(other, batches))


def test_time_ids_and_masks_follow_the_crop(folders):
  """Random crops and flips of the non-square images: the pixels and the mask weights are the
  cover-resized image's and mask's window that the time ids name (mirrored when flipped)."""
  c = config(folders, center_crop=False, mask_loss_weight=2.0, num_class_images=0)
  inst = data.load_instances(c, lambda p: p)
  ds = data.make_dataset(c, inst, 2, 0, tokenize=fake_tokenize, latent_factor=4)
  resized = {}
  for name, (h, w) in SIZES.items():
    b = B.assign(B.config_buckets(c), h, w)
    image = img_ops.load_image(folders.inst / f"{name}.png")
    resized[(h, w)] = (img_ops.resize(image, *B.cover_size(h, w, b)), b)
  mask = img_ops.resize(img_ops.load_mask(folders.inst / "b.mask.png", (32, 48)), 27, 40)
  checked = set()
  for k in range(12):
    batch = ds[k]
    for row in range(2):
      oh, ow, top, left, bh, bw = batch[TIME_IDS][row].astype(int)
      image, bucket = resized[(oh, ow)]
      assert bucket.shape == (bh, bw)
      window = img_ops.crop(image, (bh, bw), top, left)
      mirrored = img_ops.crop(image, (bh, bw), top, image.shape[1] - left - bw)[:, ::-1]
      pixels = img_ops.to_model_range(window)
      flipped = not np.array_equal(batch[PIXELS][row], pixels)
      if flipped:
        np.testing.assert_array_equal(batch[PIXELS][row], img_ops.to_model_range(mirrored))
      weights = batch[MASK][row]
      assert weights.shape == (bh // 4, bw // 4, 1)
      if (oh, ow) == (32, 48):
        m = img_ops.crop(mask, (bh, bw), top, image.shape[1] - left - bw if flipped else left)
        np.testing.assert_array_equal(
            weights, data.mask_loss_weights(m[:, ::-1] if flipped else m, (bh, bw), 4, 2.0))
        checked.add(flipped)
      else:
        assert (weights == 1).all()
  assert checked == {False, True}
  # Center crops: the 37x53 image covers 24x40 at 28x40, its crop 2 pixels from the left.
  centered = config(folders, random_flip=0.0, num_class_images=0)
  inst = data.load_instances(centered, lambda p: p)
  ds = data.make_dataset(centered, inst, 1, 0, tokenize=fake_tokenize, latent_factor=4)
  ids = {tuple(ds[k][TIME_IDS][0].astype(int)) for k in range(4)}
  assert (53, 37, 0, 2, 40, 24) in ids and (32, 48, 1, 0, 24, 40) in ids


def test_cached_moments_are_per_bucket_shape(folders):
  """Moments encoded per shape (each image at its bucket's), picked by flip; class moments per
  bucket."""
  c = config(folders)
  inst = data.load_instances(c, lambda p: p)
  used = sorted(set(inst.buckets))
  classes = data.load_class_images(c, folders.cls, used)
  calls = []

  def encode(images):                     # fake VAE: latent = the image's mean, row = flip
    calls.append(images.shape)
    n, h, w, _ = images.shape
    mean = images.mean(axis=(1, 2, 3)).reshape(n, 1, 1, 1, 1) + np.arange(2.0).reshape(2, 1, 1, 1)
    return mean * np.ones((1, 2, h // 4, w // 4, 4)), np.zeros((n, 2, h // 4, w // 4, 4))
  moments = data.encode_moments_by_shape(encode, inst.images)
  assert sorted(calls) == sorted((inst.buckets.count(b), *b.shape, 3) for b in used)
  class_moments = {b: encode(np.stack(classes[b].images)) for b in used}
  ds = data.make_dataset(c, inst, 2, 0, tokenize=fake_tokenize, moments=moments, classes=classes,
                         class_moments=class_moments, latent_factor=4)
  for k in range(6):
    b = ds[k]
    h, w = b[TIME_IDS][0, 4:].astype(int)
    assert b[LATENT_MEAN].shape == (4, h // 4, w // 4, 4) == b[LATENT_LOGVAR].shape
    assert PIXELS not in b


def test_buckets_need_the_images_source():
  from persona_jax.train import data_sources
  request = SimpleNamespace(config=SimpleNamespace(data=data.DataConfig(buckets=True,
                                                                        source="fastcomposer")))
  with pytest.raises(ConfigError, match=r"^data.buckets: the data source 'fastcomposer'"):
    data_sources.build(request)
