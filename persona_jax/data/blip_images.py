"""BLIP's image processing, as diffusers' deprecated `BlipImageProcessor.preprocess` runs in
`BlipDiffusionPipeline`: RGB (alpha composited onto white), a PIL resize to exactly `size`
(height, width; bicubic unless the config's `resample` says otherwise), rescale by 1/255, normalize
with the pipeline's `mean` / `std` (model_index.json; where those are null, the processor's
`image_mean` / `image_std`, OpenAI CLIP's by default), then a center crop to `size`.

The crop follows the exact resize, so it changes nothing; that is CLIP's processing
(data/clip_images.py) with the resize to the exact size, which is how it is computed here. The
size must be the Q-Former's vision `image_size` (the release: 224). A config without the resize
(`do_resize` false) is refused: diffusers would crop the normalized image, padding with zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from persona_jax.data.clip_images import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                          CLIPImageProcessorConfig)
from persona_jax.errors import ConfigError

PROCESSOR_FILE = "image_processor/preprocessor_config.json"   # in a BLIP-Diffusion folder


def _rgb_triple(value, what: str, source: str) -> tuple[float, float, float]:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (float(value),) * 3
  if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
    return tuple(float(v) for v in value)
  raise ConfigError(f"{source}: '{what}' = {value!r}; expected 3 numbers (RGB)")


def blip_processing(raw: Mapping | None, image_size: int, *, mean=None, std=None,
                    source: str = PROCESSOR_FILE,
                    index_source: str = "model_index.json") -> CLIPImageProcessorConfig:
  """The processing of a BLIP-Diffusion folder.

  Args:
    raw: image_processor/preprocessor_config.json as read, or None (BlipImageProcessor's
      defaults at `image_size`).
    image_size: the Q-Former's vision image_size; the processor's size must equal it.
    mean, std: model_index.json's `mean` / `std` (None: the processor's).
    source, index_source: the two files, named in errors.
  Raises:
    ConfigError naming the file and key.
  """
  if raw is None:
    config = CLIPImageProcessorConfig(shortest_edge=None, resize_to=(image_size, image_size),
                                      crop_size=(image_size, image_size))
  else:
    if not isinstance(raw, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("crop_size") is not None:
      raise ConfigError(f"{source}: 'crop_size' is not a BlipImageProcessor key (it crops to "
                        "'size'); remove it")
    config = CLIPImageProcessorConfig.from_dict(
        {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, **raw,
         "size": raw.get("size") or {"height": 224, "width": 224}}, source)
    if not config.do_resize:
      raise ConfigError(f"{source}: do_resize false is not supported (the Q-Former takes "
                        f"{image_size}x{image_size} images); set it true")
    if config.resize_to is None:
      raise ConfigError(f"{source}: 'size' = {raw.get('size')!r}; BlipImageProcessor resizes to "
                        "{'height': H, 'width': W}")
    config = dataclasses.replace(config, crop_size=config.resize_to)
  if config.resize_to != (image_size, image_size):
    raise ConfigError(f"{source}: size {config.resize_to[0]}x{config.resize_to[1]} is not the "
                      f"Q-Former's image_size {image_size} (qformer/config.json vision_config)")
  if mean is not None:
    config = dataclasses.replace(config, image_mean=_rgb_triple(mean, "mean", index_source))
  if std is not None:
    config = dataclasses.replace(config, image_std=_rgb_triple(std, "std", index_source))
  if min(config.image_std) <= 0:
    raise ConfigError(f"{index_source}: std {list(config.image_std)} must be positive")
  return config
