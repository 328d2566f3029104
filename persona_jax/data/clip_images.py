"""CLIP image preprocessing, equal to transformers' PIL image processor (`CLIPImageProcessorPil`).

Per image: convert to RGB (alpha composited onto white), resize with PIL so the shorter side is
`shortest_edge` (the longer one truncated, as transformers computes it), center crop (zero-padded
when the image is smaller), rescale by 1/255 in float64, then normalize in float32. transformers'
default `CLIPImageProcessor` is torchvision-backed when torchvision is installed and resizes
differently; the PIL one is the reference here. Output is channels-last float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from persona_jax.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "preprocessor_config.json"

# Keys of a preprocessor_config.json that do not change the result (class names, output options).
_METADATA_KEYS = frozenset({
    "image_processor_type", "feature_extractor_type", "processor_class", "data_format",
    "input_data_format", "return_tensors", "device", "disable_grouping", "image_seq_length",
})
_SIZE_KEYS = ("size", "crop_size", "default_to_square")     # read after the loop


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessorConfig:
  """The settings of transformers' CLIP image processor (its defaults: OpenAI CLIP at 224)."""
  do_convert_rgb: bool = True
  do_resize: bool = True
  shortest_edge: int | None = 224            # resize the shorter side to this ...
  resize_to: tuple[int, int] | None = None   # ... or, when set, to exactly (height, width)
  resample: int = Image.Resampling.BICUBIC.value
  do_center_crop: bool = True
  crop_size: tuple[int, int] = (224, 224)    # (height, width)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  @classmethod
  def for_image_size(cls, size: int) -> "CLIPImageProcessorConfig":
    """CLIP's defaults for a model of another input size (resize and crop to `size`)."""
    return cls(shortest_edge=size, crop_size=(size, size))

  @classmethod
  def from_dict(cls, raw, source: str = PROCESSOR_FILE) -> "CLIPImageProcessorConfig":
    """Reads a preprocessor_config.json object strictly (unknown keys only when null/false)."""
    if not isinstance(raw, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    direct = {"do_convert_rgb", "do_resize", "resample", "do_center_crop", "do_rescale",
              "rescale_factor", "do_normalize"}
    values = {}
    for key, value in raw.items():
      if key in direct:
        values[key] = value
      elif key in ("image_mean", "image_std"):
        rgb = tuple(map(float, value)) if isinstance(value, Sequence) else (float(value),) * 3
        if len(rgb) != 3:
          raise ConfigError(f"{source}: '{key}' needs 3 values (RGB), got {value!r}")
        values[key] = rgb
      elif key in _SIZE_KEYS or key in _METADATA_KEYS or key.startswith("_"):
        continue
      elif value is not None and value is not False:
        raise ConfigError(f"{source}: unknown image processor key '{key}' = {value!r}; "
                          "persona_jax implements CLIP's resize / center crop / rescale / normalize")
    square = bool(raw.get("default_to_square", False))
    if raw.get("size") is not None:
      size = _size(raw["size"], square, "size", source)
      values["shortest_edge"] = size if isinstance(size, int) else None
      values["resize_to"] = None if isinstance(size, int) else size
    if raw.get("crop_size") is not None:
      values["crop_size"] = _size(raw["crop_size"], True, "crop_size", source)
    if "resample" in values and values["resample"] not in {int(r) for r in Image.Resampling}:
      raise ConfigError(f"{source}: resample {values['resample']!r} is not a PIL resampling filter")
    return cls(**values)

  def to_dict(self) -> dict:
    """The preprocessor_config.json transformers writes for these settings."""
    size = ({"shortest_edge": self.shortest_edge} if self.resize_to is None
            else {"height": self.resize_to[0], "width": self.resize_to[1]})
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": self.do_convert_rgb,
        "do_resize": self.do_resize, "size": size, "resample": self.resample,
        "do_center_crop": self.do_center_crop,
        "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
        "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
        "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
        "image_std": list(self.image_std),
    }


def _size(value, square: bool, name: str, source: str):
  """transformers' size forms -> an int shortest edge or a (height, width) tuple."""
  if isinstance(value, int) and not isinstance(value, bool):
    return (value, value) if square else value
  if isinstance(value, Sequence) and len(value) == 2:
    return tuple(int(v) for v in value)
  if isinstance(value, Mapping):
    if set(value) == {"shortest_edge"}:
      if name == "crop_size":
        raise ConfigError(f"{source}: crop_size needs height and width, got {value!r}")
      return int(value["shortest_edge"])
    if set(value) == {"height", "width"}:
      return int(value["height"]), int(value["width"])
  raise ConfigError(f"{source}: '{name}' = {value!r} is not supported (an int, [height, width], "
                    "{'shortest_edge': n} or {'height': h, 'width': w})")


def load_image_processor(folder, image_size: int | None = None) -> CLIPImageProcessorConfig:
  """The settings in `folder/preprocessor_config.json`, or CLIP's defaults when it is absent
  (resizing and cropping to `image_size` when given, else 224)."""
  from persona_jax.models.configs import read_json
  path = Path(folder) / PROCESSOR_FILE
  if path.is_file():
    return CLIPImageProcessorConfig.from_dict(read_json(path), str(path))
  if image_size is not None:
    return CLIPImageProcessorConfig.for_image_size(image_size)
  return CLIPImageProcessorConfig()


def _rgb(image, convert: bool) -> np.ndarray:
  """A PIL image or an [H, W, 3] uint8 array -> [H, W, 3] uint8 (transformers' RGB rule)."""
  if isinstance(image, Image.Image):
    if convert:
      if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
      image = image.convert("RGB")
    image = np.asarray(image)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"CLIP preprocessing takes PIL images or [H, W, 3] uint8 arrays, got "
                     f"{image.dtype} {image.shape}")
  return image


def _resize_shape(h: int, w: int, config: CLIPImageProcessorConfig) -> tuple[int, int]:
  if config.resize_to is not None:
    return config.resize_to
  s = config.shortest_edge
  return (int(s * h / w), s) if w <= h else (s, int(s * w / h))


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W, C] -> [size..., C] around the center; zero-padded where the image is smaller."""
  h, w = image.shape[:2]
  ch, cw = size
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return image[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  pad_t, pad_l = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
  canvas = np.zeros((nh, nw, image.shape[2]), image.dtype)
  canvas[pad_t:pad_t + h, pad_l:pad_l + w] = image
  top, left = top + pad_t, left + pad_l
  return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def preprocess_image(image, config=CLIPImageProcessorConfig()) -> np.ndarray:
  """One PIL image or [H, W, 3] uint8 array -> [h, w, 3] float32 model input."""
  x = _rgb(image, config.do_convert_rgb)
  if config.do_resize:
    h, w = _resize_shape(*x.shape[:2], config)
    x = np.asarray(Image.fromarray(x).resize((w, h), resample=config.resample))
  if config.do_center_crop:
    x = center_crop(x, config.crop_size)
  if config.do_rescale:
    x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  x = x.astype(np.float32)
  if config.do_normalize:
    x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
  return x


def preprocess(images, config=CLIPImageProcessorConfig()) -> np.ndarray:
  """PIL images or [H, W, 3] uint8 arrays -> [B, h, w, 3] float32, as CLIPImageProcessorPil."""
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  out = [preprocess_image(img, config) for img in images]
  if len({x.shape for x in out}) > 1:
    raise ValueError("preprocessed images differ in size ({}); enable do_center_crop or resize to "
                     "a fixed size".format(sorted({x.shape for x in out})))
  return np.stack(out)
