"""The image pipeline: grain MapDataset -> shuffled epochs -> per-example augmentation -> batches
of numpy arrays keyed as data/batch.py says. With class images (prior preservation) a second,
independently shuffled stream of class examples is appended to every batch: `batch_size`
instance rows, then `batch_size` class rows (`prior` = 1).

Expensive work happens once, before training:
  * images are decoded, resized (shorter side to `resolution`) and, with center crops, cropped;
  * with center crops the only randomness left is the flip, so the VAE moments of every
    (image, flip) pair are encoded once; a latent is sampled from them in the step. With random
    crops the step encodes pixels instead;
  * when nothing in the text path trains, the text-encoder output of every caption the run can
    see is computed once (`context`, and SDXL's `pooled`); otherwise the step gets token ids.
Every example carries its micro-conditioning (`time_ids`: original size, crop top-left in the
resized image, target size), which SDXL's conditioning reads, as diffusers'
train_dreambooth_lora_sdxl.py computes it (a flipped example's left offset is the mirrored one).
Augmentation randomness comes from grain's per-element generator, so batch k is the same
whenever it is produced (resume, iterator state in checkpoints).
With `buckets` (data/buckets.py), images are fitted to aspect-ratio buckets instead of the square
and every batch is one bucket's (`bucketed_dataset`), batch k still a function of k alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import grain
import jax
import numpy as np

from persona_jax.data import buckets as bucket_ops
from persona_jax.data import images as img_ops
from persona_jax.data.images import DataError
from persona_jax.data.sources import read_image_folder
from persona_jax.data.templates import TEMPLATES
from persona_jax.errors import ConfigError
from persona_jax.data.batch import LATENT_LOGVAR, LATENT_MEAN, MASK, PIXELS, PRIOR, TIME_IDS

log = logging.getLogger(__name__)

CAPTION_SOURCES = ("templates", "prompt", "files")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "images"            # the data source (train/data_sources.py): images, a method's
                                    # (fastcomposer), or package.module:function
  instance_dir: str = ""            # "": the bundled example subject
  caption_source: str = "templates"  # templates | prompt | files (NAME.txt or metadata.jsonl)
  prompt: str = ""                  # templates: the words put into each template; prompt: the caption
  templates: str = "object"         # object | style
  resolution: int = 512
  center_crop: bool = True          # False: random crops, encoded by the VAE every step
  random_flip: float = 0.5
  # > 1 (random crops only): each example is first scaled up by a random factor in
  # [1, random_zoom], so even a square image gives differently framed crops (E4T's augmented
  # copies of one image).
  random_zoom: float = 1.0
  num_images: int = 0               # > 0: only the first N images of the folder (by name)
  caption_dropout: float = 0.0      # probability of training on the empty caption (for CFG)
  # Class images (DreamBooth's prior preservation, Custom Diffusion's regularization; their loss
  # weight is the run's `prior_loss_weight`):
  num_class_images: int = 0         # 0: no class stream. Missing images are generated from the base
  class_dir: str = ""               # "": WORKDIR/class_images
  class_prompt: str = ""            # the caption of every class image, e.g. "a photo of a dog"
  class_generate: bool = True       # False: too few class images is an error
  class_sample_steps: int = 50      # the sampler settings used to generate missing class images
  class_guidance: float = 7.5
  class_negative_prompt: str = ""
  # Several concepts trained jointly (Custom Diffusion): each a mapping of CONCEPT_FIELDS that
  # override the fields above for that concept's images; (): one concept, the fields above.
  concepts: tuple = ()
  # Custom Diffusion's zoom-in/zoom-out augmentation: instance images rescaled (1/3 of the time
  # 1.2-1.4x and cropped, "zoomed in "/"close up " prepended to the caption; otherwise 1/3-1x and
  # pasted on a blank canvas, "a far away "/"very small " below 0.6x) and the loss masked to
  # the image. Images are then VAE-encoded in the step.
  zoom_augment: bool = False
  # > 0: subject masks (NAME.mask.png) weight the denoising loss, as kohya's masked loss does but
  # keeping the background: a latent pixel counts 1 + mask_loss_weight * (the mask's mean over
  # it), and each example's loss is the weighted mean. Images without a mask weigh 1 everywhere.
  mask_loss_weight: float = 0.0
  # Aspect-ratio buckets (data/buckets.py, kohya's): each image goes to the bucket of about
  # resolution^2 pixels nearest its aspect ratio, resized to cover it and cropped; every batch is
  # from one bucket (one compiled step per bucket used). Sides from bucket_min to bucket_max in
  # bucket_step pixels (a multiple of the VAE's factor); 0: resolution/2 and 2 x resolution.
  buckets: bool = False
  bucket_min: int = 0
  bucket_max: int = 0
  bucket_step: int = 64


CONCEPT_FIELDS = ("instance_dir", "caption_source", "prompt", "templates", "class_prompt",
                  "class_dir")
ZOOM_IN_WORDS = ("zoomed in ", "close up ")
ZOOM_OUT_WORDS = ("a far away ", "very small ")


def concept_configs(config: DataConfig) -> list[DataConfig]:
  """One DataConfig per concept (the config itself when `concepts` is empty)."""
  if not config.concepts:
    return [config]
  out = []
  for i, concept in enumerate(config.concepts):
    if not isinstance(concept, Mapping):
      raise ConfigError(f"data.concepts[{i}]: expected a mapping of {', '.join(CONCEPT_FIELDS)}, "
                        f"got {concept!r}")
    unknown = sorted(set(concept) - set(CONCEPT_FIELDS))
    if unknown:
      raise ConfigError(f"data.concepts[{i}].{unknown[0]}: not a per-concept option (options: "
                        f"{', '.join(CONCEPT_FIELDS)})")
    out.append(dataclasses.replace(config, concepts=(), **dict(concept)))
  return out


def example_subject_dir() -> Path:
  """The bundled example subject (package data): four 128x128 renders of the toy world's first
  evaluation subject, a pink ball with yellow dots (`world.efficacy.eval_subjects(1)[0]`), a look
  the toy base model never saw in pre-training."""
  import importlib.resources
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "example_subject"))


@dataclasses.dataclass
class InstanceSet:
  """Decoded, resized instance images and their captions (one per image, or None)."""
  images: list[np.ndarray]          # uint8 [R, R, 3] (center crop) or [>=R, >=R, 3]
  captions: list[str]               # the caption pool of each image
  folder: Path
  # Subject masks (NAME.mask.png, data/sources.py), uint8 [R, R] / [>=R, >=R] resized and
  # cropped as their images, or None per image; None: no image of the set has one.
  masks: list[np.ndarray | None] | None = None
  # Per image: its file's size (H, W) and where the stored image sits in the resized one
  # (top, left, resized width; (0, 0, W) for uncropped images). None: as stored, uncropped.
  sizes: list[tuple[int, int]] | None = None
  crops: list[tuple[int, int, int]] | None = None
  buckets: list | None = None       # data.buckets: each image's Bucket (its stored image's size)

  def subset(self, indices) -> "InstanceSet":
    """The images at `indices`, with their captions, masks and geometry."""
    pick = lambda xs: None if xs is None else [xs[i] for i in indices]     # noqa: E731
    return InstanceSet(pick(self.images), pick(self.captions), self.folder, pick(self.masks),
                       pick(self.sizes), pick(self.crops), pick(self.buckets))

  def geometry(self, index: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(original (H, W), (top, left, resized width)) of image `index`."""
    h, w = self.images[index].shape[:2]
    size = self.sizes[index] if self.sizes is not None else (h, w)
    return size, (self.crops[index] if self.crops is not None else (0, 0, w))


def caption_pool(config: DataConfig, file_caption: str | None, expand: Callable[[str], str]):
  """All captions an image can be trained with (before caption dropout)."""
  if config.caption_source == "templates":
    if config.templates not in TEMPLATES:
      raise ConfigError(f"data.templates: '{config.templates}' is not one of {', '.join(TEMPLATES)}")
    if not config.prompt:
      raise ConfigError("data.prompt: templates need the words to put in them (e.g. the placeholder)")
    return [expand(t.format(config.prompt)) for t in TEMPLATES[config.templates]]
  if config.caption_source == "prompt":
    if not config.prompt:
      raise ConfigError("data.prompt: caption_source 'prompt' needs a prompt")
    return [expand(config.prompt)]
  return [expand(file_caption)]


def fit_image(image: np.ndarray, config: DataConfig, bucket=None):
  """An image (or mask) resized to cover the target, the square of `resolution` or a `bucket`,
  and with center crops cropped to it: (uint8 [H, W(, 3)] (the target) or at least that large,
  (top, left, resized width) of the crop)."""
  if bucket is None:
    image, target = img_ops.resize_shorter_side(image, config.resolution), config.resolution
  else:
    image = img_ops.resize(image, *bucket_ops.cover_size(*image.shape[:2], bucket))
    target = bucket.shape
  top, left = img_ops.center_crop_offsets(image, target) if config.center_crop else (0, 0)
  width = image.shape[1]
  if config.center_crop:
    image = img_ops.crop(image, target, top, left)
  return image, (top, left, width)


def prepare_image(path: Path, config: DataConfig, bucket=None):
  """An image decoded, resized to cover the square of `resolution` (its shorter side to it) or
  `bucket` and, with center crops, cropped. Returns (uint8 [R, R, 3] / the bucket's [H, W, 3]
  (center crop) or at least that large, its file's (H, W), (top, left, resized width) of the
  crop)."""
  image = img_ops.load_image(path)
  fitted, where = fit_image(image, config, bucket)
  return fitted, image.shape[:2], where


def prepare_mask(path: Path, image_path: Path, config: DataConfig, bucket=None) -> np.ndarray:
  """A subject mask resized and cropped as `prepare_image` does its image: uint8 [R, R] or
  [>=R, >=R] (a bucket's [H, W]); a DataError naming the mask when its size is not the image's."""
  mask = img_ops.load_mask(path, img_ops.image_shape(image_path))
  return fit_image(mask, config, bucket)[0]


def load_instances(config: DataConfig, expand: Callable[[str], str]) -> InstanceSet:
  """The instance images of every concept, each with its caption pool (and its mask, if any);
  with `buckets`, each resized and cropped to its bucket."""
  images, captions, masks, sizes, crops, buckets = [], [], [], [], [], []
  choices = bucket_ops.config_buckets(config) if config.buckets else None
  for concept in concept_configs(config):
    if concept.caption_source not in CAPTION_SOURCES:
      raise ConfigError(f"data.caption_source: '{concept.caption_source}' is not one of "
                        f"{', '.join(CAPTION_SOURCES)}")
    folder = Path(concept.instance_dir) if concept.instance_dir else example_subject_dir()
    examples = read_image_folder(folder, need_captions=concept.caption_source == "files")
    if config.num_images > 0:
      examples = examples[: config.num_images]
    for e in examples:
      bucket = None if choices is None else bucket_ops.assign(choices, *img_ops.image_shape(e.path))
      image, size, where = prepare_image(e.path, concept, bucket)
      images.append(image)
      sizes.append(size)
      crops.append(where)
      buckets.append(bucket)
      masks.append(None if e.mask is None else prepare_mask(e.mask, e.path, concept, bucket))
    captions += [caption_pool(concept, e.caption, expand) for e in examples]
    log.info("%s: %d instance image(s) at %dpx", folder, len(examples), config.resolution)
  return InstanceSet(images, captions, folder,
                     masks if any(m is not None for m in masks) else None, sizes, crops,
                     buckets if choices is not None else None)


def load_class_images(config: DataConfig, folder: Path, buckets=None):
  """The first `num_class_images` images of `folder` (by name), each captioned `class_prompt`:
  an InstanceSet at the square `resolution`, or with `buckets` (a list of Buckets) a dict
  {bucket: InstanceSet} of the same images resized to cover each bucket and cropped to it."""
  examples = read_image_folder(folder)[: config.num_class_images]
  log.info("%s: %d class image(s), caption '%s'", folder, len(examples), config.class_prompt)
  captions = [[config.class_prompt]] * len(examples)
  if buckets is None:
    prepared = [prepare_image(e.path, config) for e in examples]
    return InstanceSet([p[0] for p in prepared], captions, folder,
                       sizes=[p[1] for p in prepared], crops=[p[2] for p in prepared])
  raw = [img_ops.load_image(e.path) for e in examples]
  out = {}
  for b in buckets:
    fitted = [fit_image(image, config, b) for image in raw]
    out[b] = InstanceSet([f[0] for f in fitted], captions, folder, sizes=[r.shape[:2] for r in raw],
                         crops=[f[1] for f in fitted], buckets=[b] * len(raw))
  return out


def encode_batch(shape: tuple[int, int]) -> int:
  """encode_moments' default batch for images of `shape` (H, W): as many as 8 at 512x512 hold
  pixels (8 .. 256)."""
  return int(np.clip(8 * 512 * 512 // (shape[0] * shape[1]), 8, 256))


def encode_moments(vae, vae_params, images: np.ndarray, batch: int | None = None,
                   mirror: bool = True):
  """VAE moments of every image and its mirror: (mean, logvar), each [N, 2, h, w, c] float32
  (row [:, flip]); without `mirror` (no flips) [N, 1, h, w, c], half the work. `batch` defaults
  to as many images as 8 at 512x512 hold pixels (8 .. 256)."""
  if batch is None:
    batch = encode_batch(images.shape[1:3])
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
  pixels = img_ops.to_model_range(images)
  views = [pixels, pixels[:, :, ::-1]] if mirror else [pixels]
  both = np.stack(views, axis=1).reshape(-1, *pixels.shape[1:])
  means, logvars = [], []
  for start in range(0, len(both), batch):
    chunk = both[start: start + batch]
    pad = batch - len(chunk)
    m = encode(vae_params, np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk)
    means.append(np.asarray(m.mean)[: len(chunk)])
    logvars.append(np.asarray(m.logvar)[: len(chunk)])
  shape = (len(images), len(views)) + means[0].shape[1:]
  return (np.concatenate(means).reshape(shape).astype(np.float32),
          np.concatenate(logvars).reshape(shape).astype(np.float32))


def encode_captions(encode_fn, tokenize_fn, captions: list[str], batch: int = 16) -> dict:
  """Text-encoder outputs of `captions`, by batch key: {"context": [K, L, D] (, SDXL "pooled":
  [K, P])} float32. `tokenize_fn(prompts) -> {ids key: [B, L]}`, `encode_fn(that) -> {key: [B, ...]}`."""
  out = {}
  for start in range(0, len(captions), batch):
    chunk = captions[start: start + batch]
    encoded = encode_fn(tokenize_fn(chunk + [chunk[-1]] * (batch - len(chunk))))
    for k, v in encoded.items():
      out.setdefault(k, []).append(np.asarray(v)[: len(chunk)])
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def micro_conditioning(size: tuple[int, int], top: int, left: int,
                       target: tuple[int, int]) -> np.ndarray:
  """SDXL's time ids of one example: [6] float32, original (H, W) + crop (top, left) + target (H, W)."""
  return np.asarray(tuple(size) + (top, left) + tuple(target), np.float32)


@dataclasses.dataclass
class Augment(grain.transforms.RandomMap):
  """Index of an instance -> one training example (flip, crop, caption, dropout)."""
  config: DataConfig
  instances: InstanceSet
  tokenize: Callable[[list[str]], dict] | None           # -> {ids key: [B, L]}; None: cached
  moments: tuple[np.ndarray, np.ndarray] | None           # [N, 2 (1: no flips), h, w, c] each
  caption_index: dict[str, int] | None                    # caption -> row of the context tables
  contexts: dict[str, np.ndarray] | None                  # {"context": [K, L, D], ...}
  prior: float | None = None                              # the `prior` value, when there are classes
  latent_factor: int = 8                                  # the VAE's downsampling (loss masks)
  # A method's per-example hook (Method.image_inputs): image_inputs(uint8 image, mask=, rng=)
  # -> extra keys; the subject mask is cropped and flipped as the image (None without one), the
  # rng is the example's.
  image_inputs: Callable | None = None
  size: tuple[int, int] | None = None                     # (H, W) of the example; None: (R, R)

  def random_map(self, index, rng: np.random.Generator):
    c = self.config
    th, tw = self.size or (c.resolution, c.resolution)
    flip = int(rng.random() < c.random_flip)
    pool = self.instances.captions[index]
    caption = pool[int(rng.integers(len(pool)))]
    if c.caption_dropout and not self.prior and rng.random() < c.caption_dropout:
      caption = ""
    out = {}
    masks = getattr(self.instances, "masks", None)
    mask = None if masks is None else masks[index]
    size, (top, left, width) = self.instances.geometry(index)
    if self.moments is not None:
      out[LATENT_MEAN] = self.moments[0][index, flip]
      out[LATENT_LOGVAR] = self.moments[1][index, flip]
      image = self.instances.images[index]
      image = image[:, ::-1] if flip else image
      if mask is not None:
        mask = mask[:, ::-1] if flip else mask
    else:
      image = self.instances.images[index]
      r = c.resolution
      if c.random_zoom > 1:
        image = img_ops.resize_shorter_side(
            image, int(round(min(image.shape[:2]) * rng.uniform(1.0, c.random_zoom))))
        if mask is not None:
          mask = img_ops.resize_shorter_side(mask, min(image.shape[:2]))
        top, left, width = 0, 0, image.shape[1]          # the zoomed image is the resized one
      dy = int(rng.integers(image.shape[0] - th + 1))
      dx = int(rng.integers(image.shape[1] - tw + 1))
      image = img_ops.crop(image, (th, tw), dy, dx)
      top, left = top + dy, left + dx     # in the resized image (a stored center crop's offsets)
      image = image[:, ::-1] if flip else image
      if mask is not None:
        mask = img_ops.crop(mask, (th, tw), dy, dx)
        mask = mask[:, ::-1] if flip else mask
      if c.zoom_augment and not self.prior:
        out[PIXELS], out[MASK], words = self.zoom(image, rng)
        caption = words + caption
      else:
        out[PIXELS] = img_ops.to_model_range(image)
        if c.zoom_augment:
          out[MASK] = np.ones((r // self.latent_factor,) * 2 + (1,), np.float32)
    if c.mask_loss_weight:
      out[MASK] = mask_loss_weights(mask, (th, tw), self.latent_factor, c.mask_loss_weight)
    out[TIME_IDS] = micro_conditioning(size, top, width - left - tw if flip else left, (th, tw))
    if self.contexts is not None:
      out.update({k: v[self.caption_index[caption]] for k, v in self.contexts.items()})
    else:
      out.update({k: v[0] for k, v in self.tokenize([caption]).items()})
    if self.prior is not None:
      out[PRIOR] = np.float32(self.prior)
    if self.image_inputs is not None:
      out.update(self.image_inputs(np.ascontiguousarray(image),
                                   mask=None if mask is None else np.ascontiguousarray(mask),
                                   rng=rng))
    return out

  def zoom(self, image, rng: np.random.Generator):
    """Custom Diffusion's draw (diffusers' train_custom_diffusion.py): zoom out with p 0.66 to a
    side in [R/3, R], else in to [1.2R, 1.4R). Returns (pixels, mask, caption words)."""
    r = self.config.resolution
    if rng.random() < 0.66:
      scale = int(rng.integers(r // 3, r + 1))
    else:
      scale = int(rng.integers(int(1.2 * r), int(1.4 * r)))
    top, left = (int(v) for v in rng.integers(abs(scale - r) + 1, size=2))
    pixels, mask = img_ops.zoom(image, r, scale, top, left, self.latent_factor)
    if scale < 0.6 * r:
      words = ZOOM_OUT_WORDS[int(rng.integers(2))]
    elif scale > r:
      words = ZOOM_IN_WORDS[int(rng.integers(2))]
    else:
      words = ""
    return pixels, mask, words


def mask_loss_weights(mask: np.ndarray | None, size, latent_factor: int,
                      weight: float) -> np.ndarray:
  """Per-latent-pixel loss weights float32 [H/f, W/f, 1] of one example (`size`: the side R or
  (H, W)): 1 + weight * the subject mask (uint8 [H, W], 255 = subject) averaged over each f x f
  block; ones without a mask."""
  h, w = (size, size) if isinstance(size, int) else size
  h, w = h // latent_factor, w // latent_factor
  if mask is None:
    return np.ones((h, w, 1), np.float32)
  blocks = mask.astype(np.float32).reshape(h, latent_factor, w, latent_factor)
  cover = blocks.mean(axis=(1, 3)) / 255.0
  return (1.0 + weight * cover)[..., None].astype(np.float32)


def row_slice(rows: int, block: tuple[int, int] = (0, 1)) -> slice:
  """Block i of n equal, contiguous blocks of a global batch's `rows` rows (`block` = (i, n)):
  the rows process i of n loads (parallel/mesh.py `process_block`)."""
  i, n = block
  if rows % n:
    raise ConfigError(f"a batch of {rows} rows does not split over {n} processes; use a batch "
                      "size that does")
  return slice(i * rows // n, (i + 1) * rows // n)


@dataclasses.dataclass
class Rows(grain.transforms.Map):
  """Global batch index k -> rows `rows` of batch k (each key stacked over them), loading only
  those: row r < B is example k*B + r of `streams[0]` (the instances), row B + r example
  k*B + r of `streams[1]` (the class images), B = `batch_size`."""
  streams: tuple
  batch_size: int
  rows: slice

  def map(self, k):
    b = self.batch_size
    examples = [self.streams[r // b][k * b + r % b]
                for r in range(self.rows.start, self.rows.stop)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@dataclasses.dataclass
class TakeRows(grain.transforms.Map):
  """A whole global batch -> block `block` of its rows (for sources that load every row)."""
  block: tuple[int, int]

  def map(self, batch):
    return {k: v[row_slice(len(v), self.block)] for k, v in batch.items()}


def make_dataset(config: DataConfig, instances: InstanceSet, batch_size: int, seed: int, *,
                 tokenize=None, moments=None, caption_index=None, contexts=None,
                 classes: InstanceSet | None = None, class_moments=None, latent_factor: int = 8,
                 image_inputs=None, row_block: tuple[int, int] = (0, 1)):
  """The infinite, reshuffled-every-epoch batch dataset (grain MapDataset). With `classes`,
  every batch is `batch_size` instance rows then `batch_size` class rows; `row_block` (i, n):
  each element is only block i of n of those rows (`row_slice`: process i of n loads its part
  of every global batch, nothing else). `image_inputs`: a
  method's per-example extra keys from the augmented uint8 image (`Method.image_inputs`).
  With `data.buckets` (`bucketed_dataset`): `moments` per image (lists of [V, h, w, c], its
  bucket's shape), `classes` and `class_moments` dicts by bucket."""
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  if config.random_zoom < 1 or (config.random_zoom > 1 and moments is not None):
    raise ConfigError(f"data.random_zoom: {config.random_zoom} must be >= 1, and > 1 only with "
                      "random crops (data.center_crop=False)")
  if config.zoom_augment and moments is not None:
    raise ConfigError("data.zoom_augment: zoomed images are VAE-encoded in the step; do not pass "
                      "cached moments")
  if config.mask_loss_weight < 0 or (config.mask_loss_weight and config.zoom_augment):
    raise ConfigError(f"data.mask_loss_weight: {config.mask_loss_weight} must be >= 0, and 0 with "
                      "data.zoom_augment (which masks the loss itself)")
  if config.mask_loss_weight and instances.masks is None:
    raise ConfigError(f"data.mask_loss_weight: no image in {instances.folder} has a subject mask "
                      "(NAME.mask.png beside NAME.png, white = subject); add masks or set it to 0")

  if config.buckets:
    return bucketed_dataset(config, instances, batch_size, seed, moments=moments, classes=classes,
                            class_moments=class_moments, latent_factor=latent_factor,
                            row_block=row_block, augment=functools.partial(
                                Augment, config, tokenize=tokenize, caption_index=caption_index,
                                contexts=contexts, latent_factor=latent_factor,
                                image_inputs=image_inputs))

  def stream(images, moments_, prior, stream_seed):
    augment = Augment(config, images, tokenize, moments_, caption_index, contexts, prior,
                      latent_factor, image_inputs)
    return (grain.MapDataset.source(list(range(len(images.images)))).seed(stream_seed).shuffle()
            .repeat().random_map(augment))
  if classes is None:
    streams = (stream(instances, moments, None, seed),)
  else:
    streams = (stream(instances, moments, 0.0, seed),
               stream(classes, class_moments, 1.0, seed + 7919))
  rows = row_slice(batch_size * len(streams), row_block)
  return grain.MapDataset.range(sys.maxsize).map(Rows(streams, batch_size, rows))


def bucketed_dataset(config: DataConfig, instances: InstanceSet, batch_size: int, seed: int, *,
                     moments, classes, class_moments, latent_factor: int, augment,
                     row_block: tuple[int, int] = (0, 1)):
  """The bucketed batch dataset (data/buckets.py): batch k holds `batch_size` rows of one bucket
  (then as many class rows cropped to it). `moments`: (means, logvars), lists of each image's
  [V, h, w, c]; `classes` / `class_moments`: {bucket: InstanceSet / (mean, logvar)};
  `augment(instances, moments=, prior=, size=)` -> a per-example Augment."""
  bucket_ops.check_config(config, latent_factor)
  if instances.buckets is None:
    raise ConfigError("data.buckets: the instances were loaded without buckets (load_instances "
                      "with data.buckets on)")
  used = sorted(set(instances.buckets))
  rows, class_rows, counts = [], [], []
  for b in used:
    idx = [i for i, x in enumerate(instances.buckets) if x == b]
    m = None if moments is None else tuple(np.stack([v[i] for i in idx]) for v in moments)
    rows.append(augment(instances.subset(idx), moments=m, prior=None if classes is None else 0.0,
                        size=b.shape).random_map)
    counts.append(len(idx))
    if classes is not None:
      cm = None if class_moments is None else class_moments[b]
      class_rows.append(augment(classes[b], moments=cm, prior=1.0, size=b.shape).random_map)
  log.info("buckets: %d of %d used (%s)", len(used), len(bucket_ops.config_buckets(config)),
           ", ".join(f"{b}: {n} image(s)" for b, n in zip(used, counts)))
  plan = bucket_ops.BucketPlan(tuple(counts), batch_size, seed)
  batches = bucket_ops.BucketBatches(
      plan, rows, class_rows if classes is not None else None,
      len(classes[used[0]].images) if classes is not None else 0,
      row_slice(batch_size * (1 if classes is None else 2), row_block))
  return grain.MapDataset.range(sys.maxsize).map(batches)


def encode_moments_by_shape(encode, images: list[np.ndarray]):
  """VAE moments of images of several shapes (buckets): `encode` ([n, H, W, 3] uint8 ->
  (mean, logvar) [n, V, h, w, c], e.g. encode_moments) over each shape's images; returns
  (means, logvars), lists of each image's [V, h, w, c]."""
  groups = {}
  for i, image in enumerate(images):
    groups.setdefault(image.shape, []).append(i)
  means, logvars = [None] * len(images), [None] * len(images)
  for idx in groups.values():
    mean, logvar = encode(np.stack([images[i] for i in idx]))
    for j, i in enumerate(idx):
      means[i], logvars[i] = mean[j], logvar[j]
  return means, logvars


def make_iterator(dataset):
  """A checkpointable iterator (grain state: the next batch index)."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def all_captions(instances: InstanceSet, caption_dropout: float,
                 classes: InstanceSet | None = None) -> list[str]:
  """Every caption a run can train with, sorted (the rows of the cached context table)."""
  pools = instances.captions + (classes.captions if classes is not None else [])
  return sorted({c for p in pools for c in p} | ({""} if caption_dropout else set()))


def zoom_captions(instances: InstanceSet) -> list[str]:
  """The instance captions with the zoom augmentation's words prepended."""
  return sorted({w + c for p in instances.captions for c in p
                 for w in ZOOM_IN_WORDS + ZOOM_OUT_WORDS})


__all__ = ["DataConfig", "DataError", "InstanceSet", "load_instances", "load_class_images",
           "concept_configs", "zoom_captions", "row_slice", "Rows", "TakeRows",
           "encode_moments",
           "encode_moments_by_shape", "bucketed_dataset", "fit_image",
           "encode_captions", "make_dataset", "make_iterator", "all_captions", "example_subject_dir"]
