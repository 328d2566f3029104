"""Text-to-image on the host side: prompts in batches through the jitted `generate`, with a
progress bar, returning uint8 images. The `sample` and `make-class-images` commands and the
training loop's sample grids all call `text_to_image`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from persona_jax.models.components import SDModels

from persona_jax.diffusion.sampling import (TextConditioning, generate, pipeline_scheduler,
                                            progress_to)
from persona_jax.errors import ConfigError
from persona_jax.images import to_uint8
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.pipeline import Pipeline
from persona_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Sampling knobs of the `sample` command (defaults as diffusers' StableDiffusionPipeline)."""
  steps: int = 50
  guidance: float = 7.5
  guidance_rescale: float = 0.0
  eta: float = 0.0
  seed: int = 0
  height: int | None = None      # default: the UNet's sample_size x the VAE's factor
  width: int | None = None
  batch_size: int = 4
  clip_skip: int | None = None


def image_size(pipe: Pipeline, height: int | None, width: int | None) -> tuple[int, int]:
  """The output size, checked: a multiple of the VAE's downsampling factor."""
  f = pipe.vae_scale_factor
  default = (pipe.unet_config.sample_size or 64) * f
  height, width = height or default, width or default
  for name, v in (("height", height), ("width", width)):
    if v <= 0 or v % f:
      raise ConfigError(f"--{name} {v} must be a positive multiple of {f} (the VAE's "
                        "downsampling factor)")
  return height, width


SAMPLING_FIELDS = ("params", "tokenizer", "conditioning", "inputs", "unet_options")


def sampling_kwargs(sampling) -> dict:
  """`text_to_image` keyword arguments of a method's `for_sampling` result (the methods'
  ForSampling dataclasses): those of its fields that `text_to_image` takes."""
  return {n: getattr(sampling, n) for n in SAMPLING_FIELDS if hasattr(sampling, n)}


def text_to_image(pipe: Pipeline, prompts: str | list[str], negative_prompt: str | list[str] = "",
                  num_images: int = 1, options: SampleOptions = SampleOptions(),
                  start_index: int = 0, params=None, progress: bool = True, tokenizer=None,
                  conditioning=None, expand_prompt=None, inputs=None,
                  unet_options: tuple = ()) -> np.ndarray:
  """Generates `num_images` images per prompt (prompt-major order).

  Image k of the run uses the key fold_in(key(seed), start_index + k), so it is the same image
  whatever the batch size. The last batch is padded to the batch size (one compilation).
  A method's sampling passes its own `params` (the transformed tree), `tokenizer` (with added
  tokens), `conditioning` hook and `expand_prompt`; `inputs` are the hook's extra inputs, the
  same for every image ({key: [1, ...] array}, e.g. E4T's clip_pixels), repeated to each batch;
  `unet_options` ((UNetConfig runtime field, value), ...) builds the UNet with a method's added
  layers (its `Method.unet_options`).

  Returns:
    [len(prompts) * num_images, H, W, 3] uint8.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
               else list(negative_prompt))
  if len(negatives) != len(prompts):
    raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
  expand = expand_prompt or (lambda p: p)
  tokenizer = tokenizer or pipe.tokenizer
  conditioning = conditioning or TextConditioning(options.clip_skip)
  all_prompts = [expand(p) for p in prompts for _ in range(num_images)]
  all_negatives = [n for n in negatives for _ in range(num_images)]
  h, w = image_size(pipe, options.height, options.width)
  f = pipe.vae_scale_factor
  latent_shape = (h // f, w // f, pipe.unet_config.in_channels)
  unet = pipe.unet
  if unet_options:
    unet = UNet2DConditionModel(dataclasses.replace(unet.config, **dict(unet_options)))
  models = SDModels(unet, pipe.text_encoder, pipe.vae)
  params = pipe.params if params is None else params
  total = len(all_prompts)
  bs = max(1, min(options.batch_size, total))
  out = []
  bar = tqdm(total=-(-total // bs) * options.steps, desc=f"sampling {total} image(s)", unit="step",
             disable=not progress, leave=False)
  with bar, progress_to(bar):
    for start in range(0, total, bs):
      chunk = list(range(start, min(start + bs, total)))
      padded = chunk + [chunk[-1]] * (bs - len(chunk))
      batch = {"ids": tokenize(tokenizer, [all_prompts[i] for i in padded]),
               "negative_ids": tokenize(tokenizer, [all_negatives[i] for i in padded])}
      batch.update({k: np.repeat(np.asarray(v), bs, axis=0) for k, v in (inputs or {}).items()})
      images = generate(params, batch, options.seed, np.asarray(padded) + start_index,
                        options.guidance, options.guidance_rescale, options.eta, models=models,
                        scheduler=pipeline_scheduler(pipe.scheduler_config), num_steps=options.steps,
                        latent_shape=latent_shape, conditioning=conditioning,
                        progress=progress)
      out.append(to_uint8(images)[: len(chunk)])
  return np.concatenate(out, axis=0)
