"""Aspect-ratio buckets (`data.buckets`), as kohya sd-scripts makes them (library/model_util.py
make_bucket_resolutions, library/train_util.py BucketManager; NovelAI's aspect-ratio bucketing).

The buckets: the square of side `resolution` (rounded down to `bucket_step`) and, for every width
w from `bucket_min` to `bucket_max` in `bucket_step`s, (w, h) and (h, w) with
h = min(bucket_max, (resolution^2 // w) // step * step) when h >= bucket_min: about the area of
the square, in steps. An image goes to the bucket of least aspect-ratio error, is resized (bicubic)
to cover it and cropped to it (in the middle, or at random with `data.center_crop=False`). Its
SDXL time ids name the crop's top-left in the resized image, as diffusers' SDXL scripts do
(kohya's get_crop_ltrb gives where the image would sit letterboxed in the bucket instead).

The batches (`BucketBatches`): every batch is `batch_size` images of one bucket. Epoch e of the
infinite stream shuffles each bucket's images, cuts them into batches (the last one filled by
repeating the bucket's images from its start, so a bucket smaller than the batch still makes one)
and shuffles the batches, all with a generator seeded by (seed, e). Every epoch has the same
number of batches, so batch k is a pure function of (seed, k): grain's iterator state (the next
batch index, in every checkpoint) resumes exactly. Class rows (prior preservation) come from a
second stream of shuffled epochs of the class images, seeded by (seed, e, 1), cropped to the
batch's bucket.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import grain
import numpy as np

from persona_jax.errors import ConfigError


class Bucket(NamedTuple):
  """A bucket's size in pixels, kohya's (width, height) order."""
  width: int
  height: int

  @property
  def shape(self) -> tuple[int, int]:
    """(height, width), the order of image arrays."""
    return self.height, self.width

  def __str__(self) -> str:
    return f"{self.width}x{self.height}"


def bucket_sides(config) -> tuple[int, int, int]:
  """(min side, max side, step) of a DataConfig's buckets, checked. `bucket_min` 0: resolution/2,
  `bucket_max` 0: 2 x resolution, each rounded to the step (256 and 1024 at 512, kohya's
  defaults; 512 and 2048 at 1024, the SDXL paper's range)."""
  step, r = config.bucket_step, config.resolution
  if step <= 0:
    raise ConfigError(f"data.bucket_step: {step} must be > 0 (64 for SD 1.x and SDXL)")
  low = config.bucket_min or max(step, r // 2 // step * step)
  high = config.bucket_max or -(-2 * r // step) * step
  for name, v in (("bucket_min", low), ("bucket_max", high)):
    if v <= 0 or v % step:
      raise ConfigError(f"data.{name}: {v} must be a positive multiple of data.bucket_step "
                        f"({step})")
  if not low <= r <= high:
    raise ConfigError(f"data.resolution: {r} must lie between data.bucket_min ({low}) and "
                      f"data.bucket_max ({high})")
  return low, high, step


def bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int) -> list[Bucket]:
  """kohya's make_bucket_resolutions with max_reso = (resolution, resolution): sorted Buckets."""
  area = resolution * resolution
  side = int(math.sqrt(area) // step) * step
  out = {Bucket(side, side)}
  for width in range(min_side, max_side + 1, step):
    height = min(max_side, (area // width) // step * step)
    if height >= min_side:
      out |= {Bucket(width, height), Bucket(height, width)}
  return sorted(out)


def config_buckets(config) -> list[Bucket]:
  """The buckets of a DataConfig with `buckets` on."""
  return bucket_resolutions(config.resolution, *bucket_sides(config))


def check_config(config, latent_factor: int) -> None:
  """Bucket options that need the model (its VAE factor) or exclude others: one-line errors."""
  bucket_sides(config)
  if config.bucket_step % latent_factor:
    raise ConfigError(f"data.bucket_step: {config.bucket_step} must be a multiple of "
                      f"{latent_factor} (the VAE's downsampling factor)")
  if config.zoom_augment:
    raise ConfigError("data.zoom_augment: Custom Diffusion's zoom augmentation works on square "
                      "images; turn it off with data.buckets")


def assign(buckets: Sequence[Bucket], height: int, width: int) -> Bucket:
  """The bucket of an image of (height, width): its own size if that is a bucket, else the one
  of least aspect-ratio error (the first of equals, as kohya's argmin)."""
  if Bucket(width, height) in buckets:
    return Bucket(width, height)
  errors = np.abs(np.asarray([b.width / b.height for b in buckets]) - width / height)
  return buckets[int(errors.argmin())]


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
  """(height, width) an image is resized to so it covers `bucket` (kohya's resized_size: the
  side that fits exactly, the other rounded, never below the bucket's)."""
  if width / height > bucket.width / bucket.height:
    scale = bucket.height / height
  else:
    scale = bucket.width / width
  return (max(bucket.height, int(height * scale + 0.5)),
          max(bucket.width, int(width * scale + 0.5)))


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([k % 2**63 for k in key])


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Which images make batch k: per bucket its image count; see the module docstring."""
  counts: tuple[int, ...]          # images per bucket (buckets with none have no batches)
  batch_size: int
  seed: int

  @property
  def batches_per_epoch(self) -> int:
    return sum(-(-n // self.batch_size) for n in self.counts)

  def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
    """The batches of epoch e in order: (bucket index, [batch_size] image indices in it)."""
    rng = _rng(self.seed, e)
    batches = []
    for b, n in enumerate(self.counts):
      if n:
        k = -(-n // self.batch_size)
        order = np.resize(rng.permutation(n), k * self.batch_size).reshape(k, self.batch_size)
        batches += [(b, row) for row in order]
    return [batches[i] for i in rng.permutation(len(batches))]

  def batch(self, k: int) -> tuple[int, np.ndarray]:
    """(bucket index, image indices) of batch k of the infinite stream."""
    e, i = divmod(k, self.batches_per_epoch)
    return self._epoch(e)[i]

  def class_rows(self, k: int, count: int) -> np.ndarray:
    """The [batch_size] class-image indices of batch k (epochs of `count` shuffled images)."""
    start = k * self.batch_size
    return np.asarray([_rng(self.seed, p // count, 1).permutation(count)[p % count]
                       for p in range(start, start + self.batch_size)])

  def _epoch(self, e: int):
    cache = self.__dict__.setdefault("_cache", {})
    if e not in cache:
      cache.clear()
      cache[e] = self.epoch(e)
    return cache[e]


@dataclasses.dataclass
class BucketBatches(grain.transforms.Map):
  """Batch index -> the batch: `batch_size` rows of one bucket (then as many class rows), or
  only rows `take` of it.

  `rows[b](index, rng)` / `class_rows[b](index, rng)` make one example of bucket b (its image
  `index` among the bucket's, or among the class images), e.g. pipeline.Augment.random_map; each
  row's generator is seeded by (seed, k, row, instance 0 / class 1)."""
  plan: BucketPlan
  rows: Sequence[Callable]
  class_rows: Sequence[Callable] | None = None
  class_count: int = 0
  take: slice | None = None          # the batch rows to make (a process's part); None: all

  def map(self, k):
    b, indices = self.plan.batch(k)
    seed, n = self.plan.seed, self.plan.batch_size
    take = self.take or slice(0, n * (1 if self.class_rows is None else 2))
    picks = (self.plan.class_rows(k, self.class_count)
             if self.class_rows is not None and take.stop > n else None)
    out = [self.rows[b](int(indices[r]), _rng(seed, k, r, 0)) if r < n else
           self.class_rows[b](int(picks[r - n]), _rng(seed, k, r - n, 1))
           for r in range(take.start, take.stop)]
    return {key: np.stack([row[key] for row in out]) for key in out[0]}


__all__ = ["Bucket", "BucketBatches", "BucketPlan", "assign", "bucket_resolutions",
           "bucket_sides", "check_config", "config_buckets", "cover_size"]
