"""Text-to-image on the host side: prompts in batches through the jitted `generate`, with a
progress bar, returning uint8 images. The `sample` and `make-class-images` commands, `eval` and
the training loop's sample grids all call `text_to_image`; a method's (or a result's) part of it is
one `Sampling` value.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from tqdm.auto import tqdm

from persona_jax.data.batch import (IDS, IDS_2, NEGATIVE_IDS, NEGATIVE_IDS_2, NEGATIVE_TIME_IDS,
                                    NEGATIVE_ZERO, TIME_IDS)
from persona_jax.diffusion.conditioning import TextConditioning
from persona_jax.diffusion.samplers import folder_default_sampler
from persona_jax.diffusion.sampling import generate, pipeline_scheduler, progress_to
from persona_jax.distributed import is_main, map_over_processes
from persona_jax.errors import ConfigError
from persona_jax.images import to_uint8
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.pipeline import Pipeline
from persona_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Sampling knobs of the `sample` command (defaults as diffusers' StableDiffusionPipeline).

  scheduler: a sampler of diffusion/samplers.py (`euler`, `dpmpp_2m_karras`, ...); None: the one
    the folder's scheduler config names (DDIM for schedulers we do not have, e.g. PNDM).
  SDXL's micro-conditioning, (H, W) / (top, left) pairs as diffusers takes them: original_size
    and target_size default to the image size, the crop to (0, 0); the negative half uses the
    positive ones unless negative_original_size and negative_target_size are both given.
  """
  steps: int = 50
  guidance: float | None = None  # default: 7.5, SDXL 5.0 (as diffusers' pipelines)
  guidance_rescale: float = 0.0
  eta: float = 0.0
  seed: int = 0
  height: int | None = None      # default: the UNet's sample_size x the VAE's factor
  width: int | None = None
  batch_size: int = 4
  clip_skip: int | None = None
  scheduler: str | None = None
  original_size: tuple[int, int] | None = None
  crops_coords_top_left: tuple[int, int] = (0, 0)
  target_size: tuple[int, int] | None = None
  negative_original_size: tuple[int, int] | None = None
  negative_crops_coords_top_left: tuple[int, int] = (0, 0)
  negative_target_size: tuple[int, int] | None = None


def with_pipeline_defaults(options: SampleOptions, pipe: Pipeline) -> SampleOptions:
  """The options with what they leave to the pipeline filled in (the guidance scale)."""
  if options.guidance is not None:
    return options
  return dataclasses.replace(options, guidance=5.0 if pipe.is_sdxl else 7.5)


def sampler_name(pipe: Pipeline, options: SampleOptions) -> str:
  """The sampler of a run: `options.scheduler`, else the folder's."""
  return options.scheduler or folder_default_sampler(pipe.raw_configs["scheduler"])


def micro_conditioning(options: SampleOptions, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """SDXL's time ids of the positive and the negative half: [6] float32 each (diffusers'
  `_get_add_time_ids`: original size + crop top-left + target size)."""
  original = tuple(options.original_size or size)
  target = tuple(options.target_size or size)
  positive = np.asarray(original + tuple(options.crops_coords_top_left) + target, np.float32)
  if options.negative_original_size is None or options.negative_target_size is None:
    return positive, positive
  negative = (tuple(options.negative_original_size)
              + tuple(options.negative_crops_coords_top_left)
              + tuple(options.negative_target_size))
  return positive, np.asarray(negative, np.float32)


def prompt_inputs(pipe: Pipeline, tokenizer, prompts: list[str], negatives: list[str | None],
                  options: SampleOptions, size: tuple[int, int], tokenizer_2=None,
                  prompt_length: int | None = None) -> dict:
  """The sampler's text inputs of one batch: ids and negative ids [B, L]; for SDXL also the
  second tokenizer's, the time ids [B, 6] and which negatives are zeros [B]: those not given
  (None) when the folder says force_zeros_for_empty_prompt, as diffusers does (None is "" when
  encoded; an explicit "" is always encoded). `prompt_length`: the prompt's ids padded or cut to
  that many tokens instead of the tokenizer's length (the negative's keep it)."""
  given = [n is not None for n in negatives]
  negatives = [n or "" for n in negatives]
  batch = {IDS: tokenize(tokenizer, prompts, prompt_length),
           NEGATIVE_IDS: tokenize(tokenizer, negatives)}
  if pipe.is_sdxl:
    positive, negative = micro_conditioning(options, size)
    n = len(prompts)
    batch.update({
        IDS_2: tokenize(tokenizer_2 or pipe.prompt_tokenizer_2, prompts),
        NEGATIVE_IDS_2: tokenize(tokenizer_2 or pipe.prompt_tokenizer_2, negatives),
        TIME_IDS: np.tile(positive, (n, 1)), NEGATIVE_TIME_IDS: np.tile(negative, (n, 1)),
        NEGATIVE_ZERO: np.asarray([pipe.force_zeros_for_empty_prompt and not g for g in given]),
    })
  return batch


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


def identity_prompt(prompt: str) -> str:
  return prompt


@dataclasses.dataclass(frozen=True)
class Sampling:
  """What a method (or a trained result) brings to sampling, beside the pipeline.

  params: the tree the networks and the conditioning read (None: the pipeline's).
  tokenizer: the pipeline's tokenizer with the method's tokens (None: the pipeline's).
  conditioning: diffusion/conditioning.py's protocol (None: the text path, with
    `SampleOptions.clip_skip`).
  expand_prompt: each prompt as the method tokenizes it (may raise ConfigError for a prompt the
    method cannot sample).
  inputs: the conditioning's extra inputs, the same for every image ({key: [1, ...] array}, e.g.
    E4T's clip_pixels, IP-Adapter's ip_scale), repeated to each batch; traced.
  addons: the UNet add-ons the conditioning feeds (models/addons.py).
  tokenizer_2: SDXL: the second tokenizer with the method's tokens (None: the pipeline's).
  prompt_length: the prompt's token count (None: the tokenizer's; BLIP-Diffusion's prompt leaves
    room for the query embeddings); the negative prompt keeps the tokenizer's.
  """
  params: dict | None = None
  tokenizer: object = None
  conditioning: object = None
  expand_prompt: object = identity_prompt
  inputs: dict = dataclasses.field(default_factory=dict)
  addons: tuple = ()
  tokenizer_2: object = None
  prompt_length: int | None = None


def text_to_image(pipe: Pipeline, prompts: str | list[str],
                  negative_prompt: str | None | list[str | None] = None,
                  num_images: int = 1, options: SampleOptions = SampleOptions(),
                  start_index: int = 0, progress: bool = True,
                  sampling: Sampling | None = None) -> np.ndarray:
  """Generates `num_images` images per prompt (prompt-major order).

  Image k of the run uses the key fold_in(key(seed), start_index + k), so it is the same image
  whatever the batch size. The last batch is padded to the batch size (one compilation). With
  several processes, every process calls it and the batches are split over them.
  `sampling`: a method's params, tokenizer, conditioning, prompt rewrite, inputs and UNet
  add-ons (None: the pipeline as it is).

  Returns:
    [len(prompts) * num_images, H, W, 3] uint8.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  negatives = ([negative_prompt] * len(prompts)
               if negative_prompt is None or isinstance(negative_prompt, str)
               else list(negative_prompt))
  if len(negatives) != len(prompts):
    raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
  options = with_pipeline_defaults(options, pipe)
  sampling = sampling or Sampling()
  expand = sampling.expand_prompt
  tokenizer = sampling.tokenizer or pipe.prompt_tokenizer
  conditioning = sampling.conditioning or TextConditioning()
  if pipe.is_sdxl and not getattr(conditioning, "sdxl", False):
    raise ConfigError(f"{type(conditioning).__name__}: this method samples on SD 1.x/2.x bases "
                      f"for now, and the model ({pipe.path or 'in memory'}) is SDXL; pass "
                      "--model an SD 1.x/2.x base")
  if options.clip_skip:
    if not isinstance(conditioning, TextConditioning):
      raise ConfigError(f"--clip-skip: this method's conditioning ({type(conditioning).__name__}) "
                        "is not the text encoder's output alone")
    conditioning = dataclasses.replace(conditioning, clip_skip=options.clip_skip)
  all_prompts = [p for p in map(expand, prompts) for _ in range(num_images)]
  all_negatives = [n for n in negatives for _ in range(num_images)]
  h, w = image_size(pipe, options.height, options.width)
  f = pipe.vae_scale_factor
  latent_shape = (h // f, w // f, pipe.unet_config.in_channels)
  unet = pipe.unet
  if sampling.addons:
    unet = UNet2DConditionModel(dataclasses.replace(unet.config, addons=sampling.addons))
  models = pipe.models(unet)
  params = pipe.params if sampling.params is None else sampling.params
  sampler = sampler_name(pipe, options)
  total = len(all_prompts)
  bs = max(1, min(options.batch_size, total))
  starts = list(range(0, total, bs))
  mine = len(starts[jax.process_index()::jax.process_count()])
  bar = tqdm(total=mine * options.steps, desc=f"sampling {total} image(s)", unit="step",
             disable=not (progress and is_main()), leave=False)

  def sample_batch(start):
    """[bs, H, W, 3] uint8: images start .. start + bs - 1 (the last batch padded)."""
    chunk = list(range(start, min(start + bs, total)))
    padded = chunk + [chunk[-1]] * (bs - len(chunk))
    batch = prompt_inputs(pipe, tokenizer, [all_prompts[i] for i in padded],
                          [all_negatives[i] for i in padded], options, (h, w),
                          sampling.tokenizer_2, sampling.prompt_length)
    batch.update({k: np.repeat(np.asarray(v), bs, axis=0) for k, v in sampling.inputs.items()})
    images = generate(params, batch, options.seed, np.asarray(padded) + start_index,
                      options.guidance, options.guidance_rescale, options.eta, models=models,
                      scheduler=pipeline_scheduler(pipe.scheduler_config, pipe.is_sdxl),
                      num_steps=options.steps,
                      latent_shape=latent_shape, conditioning=conditioning,
                      sampler=sampler, progress=progress)
    return to_uint8(images)

  # With several processes each samples its share of the batches (the same programs as one
  # process runs, so the same images), and every process gets them all.
  with bar, progress_to(bar):
    out = map_over_processes(sample_batch, starts)
  out = [images[: min(bs, total - start)] for images, start in zip(out, starts)]
  return np.concatenate(out, axis=0)
