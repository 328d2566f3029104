"""FastComposer's training data: images, captions with subject markers, one mask per subject.

A folder (`data.instance_dir`) holds the images and a `metadata.jsonl`, one JSON object per image:
  {"file_name": "0001.png", "text": "a dog <|image|> and a cat <|image|> on a sofa",
   "masks": ["0001.dog.mask.png", "0001.cat.mask.png"]}
`<|image|>` goes right after each subject's noun (the official code's convention); "masks" names
one mask file per marker, in marker order (white = the subject; the image's size). With one
marker "masks" may be left out: NAME.mask.png beside the image is its mask. Mask files are not
training images. Errors name the file and the field.
The toy world provides such examples without a folder (world/fastcomposer_data.py, the
`fastcomposer:tiny` config's data source).

Each example (grain RandomMap, as data/pipeline.py): flip; with `uncondition_prob` the empty
caption and no subjects; each subject kept with `object_appear_prob` (a dropped one loses its
marker, its noun stays plain text); the subject's CLIP input is the reference's: the background
replaced by noise, cropped to the mask's bounding box, padded to a square with black (the
reference's random object augmentations are not applied). Keys: ids [L] (with markers),
pixels [R, R, 3], subject_pixels [K, S, S, 3], subject_masks [K, h, w] (box-pooled; h = R / the
VAE's factor) and subject_union [h, w, 1], the denoising-loss mask as the reference makes it
(fastcomposer/model.py): the kept subjects' masks binarized and united at full resolution, then
resized as F.interpolate(mode="bilinear", align_corners=False) does (`bilinear_downsample`); all
zeros without kept subjects. Whether a batch's loss is masked is drawn in the step (one draw per
batch, methods/fastcomposer.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import numpy as np

from persona_jax.data import images as img_ops
from persona_jax.data.clip_images import preprocess_image
from persona_jax.data.images import DataError
from persona_jax.errors import ConfigError
from persona_jax.data.batch import IDS, PIXELS, SUBJECT_MASKS, SUBJECT_PIXELS, SUBJECT_UNION

IMAGE_TOKEN = "<|image|>"
METADATA = "metadata.jsonl"


@dataclasses.dataclass
class Example:
  image: np.ndarray           # uint8 [R, R, 3]
  caption: str                # with markers
  masks: np.ndarray           # float32 [N, R, R] in [0, 1], one per marker


def _square_mask(path: Path, size: int, image_hw) -> np.ndarray:
  """A mask file as the image was made square: float32 [size, size] in [0, 1]."""
  mask = img_ops.load_image(path)
  if mask.shape[:2] != tuple(image_hw):
    raise DataError(f"{path}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{image_hw[1]}x{image_hw[0]}; a mask must have its image's size")
  square = img_ops.center_crop(img_ops.resize_shorter_side(mask, size), size)
  return square.mean(axis=-1).astype(np.float32) / 255.0


def read_folder(folder, resolution: int) -> list[Example]:
  """The examples of a FastComposer folder (see the module docstring)."""
  folder = Path(folder)
  meta = folder / METADATA
  if not meta.is_file():
    raise DataError(f"{folder}: no {METADATA} (FastComposer needs captions with {IMAGE_TOKEN} "
                    "markers and subject masks; see persona_jax/data/fastcomposer.py)")
  out = []
  for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      raise DataError(f"{meta}: line {n} is not JSON") from None
    if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
      raise DataError(f"{meta}: line {n} needs 'file_name' and 'text'")
    name, caption = str(row["file_name"]), str(row["text"])
    path = folder / name
    if not path.is_file():
      raise DataError(f"{meta}: line {n}: file_name '{name}' is not in {folder}")
    markers = caption.count(IMAGE_TOKEN)
    masks = row.get("masks")
    if masks is None:
      if markers != 1:
        raise DataError(f"{meta}: line {n}: 'text' has {markers} {IMAGE_TOKEN} markers; give "
                        "one mask file per marker in 'masks'")
      masks = [f"{path.stem}.mask.png"]
    if not isinstance(masks, list) or len(masks) != markers:
      raise DataError(f"{meta}: line {n}: 'masks' must list {markers} file(s), one per "
                      f"{IMAGE_TOKEN} marker in 'text'")
    raw = img_ops.load_image(path)
    image = img_ops.center_crop(img_ops.resize_shorter_side(raw, resolution), resolution)
    mask_arrays = []
    for m in masks:
      if not (folder / m).is_file():
        raise DataError(f"{meta}: line {n}: mask '{m}' is not in {folder}")
      mask_arrays.append(_square_mask(folder / m, resolution, raw.shape[:2]))
    out.append(Example(image, caption, np.stack(mask_arrays) if mask_arrays
                       else np.zeros((0, resolution, resolution), np.float32)))
  if not out:
    raise DataError(f"{meta}: no examples")
  return out


def pad_to_square(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> [S, S, 3], S = max(H, W): centered, padded with black (the reference's
  PadToSquare)."""
  h, w = image.shape[:2]
  side = max(h, w)
  out = np.zeros((side, side, 3), np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top: top + h, left: left + w] = image
  return out


def subject_crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 [H, W, 3], mask [H, W] -> the subject as the reference's RandomSegmentProcessor and
  PadToSquare make it: the background (mask < 0.5) replaced by uniform noise, cropped to the
  mask's bounding box, padded to a square with black. uint8 [S, S, 3]."""
  inside = mask >= 0.5
  noise = rng.integers(0, 255, image.shape, dtype=np.uint8)
  out = np.where(inside[..., None], image, noise).astype(np.uint8)
  ys, xs = np.nonzero(inside)
  if len(ys):
    out = out[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
  return pad_to_square(out)


def subject_pixels_from_file(path, processor) -> np.ndarray:
  """A subject image file (the subject, segmented or cropped) as the encoder's input
  [S, S, 3]: padded to a square with black, then the image encoder's preprocessing."""
  return preprocess_image(pad_to_square(img_ops.load_image(Path(path))), processor)


def bilinear_downsample(masks: np.ndarray, factor: int) -> np.ndarray:
  """[N, R, R] -> [N, R/f, R/f] as torch's F.interpolate(mode="bilinear", align_corners=False)
  without antialiasing: output i samples source coordinate (i + 0.5) * f - 0.5, i.e. the mean of
  the two middle rows (columns) of each f-block for an even f, the middle one for an odd f."""
  lo, hi = (factor - 1) // 2, factor // 2
  rows = 0.5 * (masks[:, lo::factor] + masks[:, hi::factor])
  return 0.5 * (rows[:, :, lo::factor] + rows[:, :, hi::factor])


def pool_masks(masks: np.ndarray, factor: int) -> np.ndarray:
  """[N, R, R] -> [N, R/f, R/f] (box mean)."""
  n, r, _ = masks.shape
  return masks.reshape(n, r // factor, factor, r // factor, factor).mean(axis=(2, 4))


@dataclasses.dataclass
class Augment(grain.transforms.RandomMap):
  examples: list
  tokenize: object                   # list[str] -> [B, L] ids (the tokenizer with the marker)
  processor: object
  max_subjects: int
  random_flip: float
  uncondition_prob: float
  object_appear_prob: float
  latent_factor: int

  def random_map(self, index, rng: np.random.Generator):
    ex = self.examples[index]
    image, masks = ex.image, ex.masks
    if rng.random() < self.random_flip:
      image, masks = image[:, ::-1], masks[:, :, ::-1]
    keep = [rng.random() < self.object_appear_prob for _ in range(len(masks))][: self.max_subjects]
    caption = ex.caption
    if rng.random() < self.uncondition_prob:
      caption, keep = "", []
    else:
      parts = caption.split(IMAGE_TOKEN)
      caption = " ".join((parts[0] + "".join((IMAGE_TOKEN if k < len(keep) and keep[k] else "")
                                             + p for k, p in enumerate(parts[1:]))).split())
    kept = [k for k, on in enumerate(keep) if on]
    r, f = image.shape[0], self.latent_factor
    s = self.processor.crop_size
    pixels = np.zeros((self.max_subjects, s[0], s[1], 3), np.float32)
    small = np.zeros((self.max_subjects, r // f, r // f), np.float32)
    for slot, k in enumerate(kept):
      pixels[slot] = preprocess_image(subject_crop(np.ascontiguousarray(image), masks[k], rng),
                                      self.processor)
      small[slot] = pool_masks(masks[k: k + 1], f)[0]
    union = np.zeros((1, r, r), np.float32)
    for k in kept:
      union = np.maximum(union, (masks[k: k + 1] >= 0.5).astype(np.float32))
    return {IDS: self.tokenize([caption])[0], PIXELS: img_ops.to_model_range(image),
            SUBJECT_PIXELS: pixels, SUBJECT_MASKS: small,
            SUBJECT_UNION: bilinear_downsample(union, f)[0][..., None]}


def make_dataset(examples: list[Example], tokenizer, processor, data_config, batch_size: int,
                 seed: int, latent_factor: int, *, max_subjects: int, uncondition_prob: float,
                 object_appear_prob: float):
  """The infinite, reshuffled-every-epoch batch dataset of FastComposer examples (the first
  `data_config.num_images` when > 0)."""
  from persona_jax.tokenizer import tokenize
  d = data_config
  if d.resolution % latent_factor:
    raise ConfigError(f"data.resolution: {d.resolution} is not a multiple of the VAE's factor "
                      f"{latent_factor}")
  if d.num_images > 0:
    examples = examples[: d.num_images]
  augment = Augment(examples, lambda prompts: tokenize(tokenizer, prompts), processor,
                    max_subjects, d.random_flip, uncondition_prob, object_appear_prob,
                    latent_factor)
  return (grain.MapDataset.source(list(range(len(examples)))).seed(seed).shuffle()
          .repeat().random_map(augment).batch(batch_size, drop_remainder=True))
