"""`persona-jax verify MODEL --ip-adapter FILE [--image-encoder DIR]` (methods/ip_adapter.py): the
image encoder with its preprocessing, then one file loaded by diffusers (`pipe.load_ip_adapter`
into StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL folder) and by
persona_jax, compared on the same random CLIP pixels: the image features (transformers' encoder
vs ours), the projected tokens (diffusers' `encoder_hid_proj` vs ours), the UNet's output with the
decoupled cross-attention at a scale (SDXL: with random pooled embeddings and time ids), and
three DDIM steps with guidance. A last line reports how much the adapter moved diffusers' UNet (a
loader that silently skipped the file shows 0 there).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.convert.ip_adapter_files import (cross_attention_dim, find_file, from_official,
                                                  read_official)
from persona_jax.data.batch import CLIP_PIXELS
from persona_jax.errors import ModelFileError
from persona_jax.methods.ip_adapter_conditioning import (IP_ADAPTER, IPAdapterConditioning,
                                                         image_features)
from persona_jax.models.addons import IP_SCALE, IP_TOKENS, DecoupledCrossAttention
from persona_jax.models.image_projection import PLUS, projection_model

VERIFY_SCALE = 0.6


def reference_pipeline(pipe, model_path):
  """diffusers' pipeline of the folder (SDXL's for an SDXL folder), float32."""
  import torch
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
  if pipe.is_sdxl:
    return StableDiffusionXLPipeline.from_pretrained(model_path, local_files_only=True,
                                                     dtype=torch.float32)
  return StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None,
                                                 local_files_only=True, dtype=torch.float32)


def random_added_cond(unet_config, rng, b: int):
  """SDXL's added conditioning for a UNet comparison: random pooled [B, P], time ids [B, 6]
  (None when the UNet takes none)."""
  c = unet_config
  if c.addition_embed_type != "text_time":
    return None
  pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
  sizes = np.asarray([[64, 96, 8, 0, 64, 96], [32, 48, 0, 16, 32, 32]] * b, np.float32)[:b]
  return {"text_embeds": rng.standard_normal((b, pooled)).astype(np.float32), "time_ids": sizes}


@functools.lru_cache(maxsize=4)
def adapter_program(unet_config, clip_config, projection):
  """The jitted (params, clip_params, pixels, latents, t, ctx, added_cond, scale) -> (image
  features, tokens, the UNet's output with the decoupled cross-attention): one compilation for
  every file of one shape."""
  from persona_jax.models.unet import UNet2DConditionModel
  unet = UNet2DConditionModel(dataclasses.replace(unet_config, addons=(DecoupledCrossAttention(),)))

  @jax.jit
  def ours(params, clip_params, pixels, latents, t, ctx, added, scale):
    feats = image_features(clip_config, projection.kind, clip_params, pixels)
    tokens = projection_model(projection).apply({"params": params[IP_ADAPTER]["image_proj"]}, feats)
    out = unet.apply({"params": params["unet"]}, latents, t, ctx,
                     {IP_TOKENS: tokens, IP_SCALE: scale}, added_cond=added)
    return feats, tokens, out
  return ours


def compare_ip_adapter(pipe, model_path, file, image_encoder, *, scale: float = VERIFY_SCALE,
                       allow_pickle: bool = False, seed: int = 0, sampling_steps: int = 0):
  """[Comparison] of `file` (official layout) on both sides; `pipe` is persona_jax's pipeline of
  the diffusers folder `model_path`, `image_encoder` a CLIPVisionModel(WithProjection) folder.
  With `sampling_steps`, also that many DDIM steps with guidance (`_compare_sampling`)."""
  import torch
  from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.verify import Comparison, compare, nchw, nhwc
  file, image_encoder = Path(file), Path(image_encoder)
  state = read_official(file, allow_pickle)                  # refuses a pickle unless allowed
  projection, trainable = from_official(state, pipe.params["unet"],
                                        cross_attention_dim(pipe.unet_config), str(file))
  clip_config, clip_params = load_image_encoder(image_encoder)
  ref = reference_pipeline(pipe, model_path)
  ref.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name,
                      image_encoder_folder=None)
  cls = CLIPVisionModelWithProjection if clip_config.with_projection else CLIPVisionModel
  encoder = cls.from_pretrained(image_encoder, local_files_only=True).eval().float()

  rng = np.random.default_rng(seed)
  s, f, c = clip_config.image_size, pipe.unet_config.downsample_factor, pipe.unet_config
  pixels = rng.standard_normal((2, s, s, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 4 * f, 3 * f, c.in_channels)).astype(np.float32)
  t = np.array([500, 80])
  ctx = rng.standard_normal((2, 7, cross_attention_dim(c))).astype(np.float32)
  added = random_added_cond(c, rng, 2)
  params = jax.tree.map(jnp.asarray, tree.merge({"unet": pipe.params["unet"]}, trainable))
  ours = adapter_program(c, clip_config, projection)
  with torch.no_grad(), jax.default_matmul_precision("highest"):
    got = jax.device_get(ours(params, clip_params, pixels, latents, t, ctx, added,
                              jnp.float32(scale)))
    out = encoder(torch.from_numpy(nchw(pixels)), output_hidden_states=True)
    feats = out.hidden_states[-2] if projection.kind == PLUS else out.image_embeds
    embeds = [feats[:, None]]                               # [B, 1 image, ...]
    tokens = ref.unet.encoder_hid_proj(embeds)[0][:, 0]
    cond = {"image_embeds": embeds, **{k: torch.from_numpy(v) for k, v in (added or {}).items()}}
    run_ref = lambda: ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t),
                               encoder_hidden_states=torch.from_numpy(ctx),
                               added_cond_kwargs=cond).sample.numpy()
    ref.set_ip_adapter_scale(scale)
    want = run_ref()
    ref.set_ip_adapter_scale(0.0)
    off = run_ref()
  moved = float(np.abs(want - off).max() / max(np.abs(off).max(), 1e-30))
  name = f"ip_adapter({projection.kind})."
  results = [compare(name + "image_features", got[0], feats.numpy()),
             compare(name + "image_proj tokens", got[1], tokens.numpy()),
             compare(name + f"unet (scale {scale})", got[2], nhwc(want))]
  if sampling_steps:
    with torch.no_grad():
      zeros = (encoder(torch.zeros_like(torch.from_numpy(nchw(pixels))),
                       output_hidden_states=True).hidden_states[-2]
               if projection.kind == PLUS else torch.zeros_like(feats))
    ref.set_ip_adapter_scale(scale)
    results.append(_compare_sampling(pipe, ref, model_path, params, clip_params, clip_config,
                                     projection, pixels, feats, zeros, scale, sampling_steps,
                                     seed, name))
  return results + [Comparison("adapter moved diffusers' UNet output", moved, moved)]


def _compare_sampling(pipe, ref, model_path, params, clip_params, clip_config, projection,
                      pixels, feats, zeros, scale, steps, seed, name):
  """`steps` DDIM steps with guidance from identical latents: diffusers' pipeline given the
  image embeddings (`ip_adapter_image_embeds`: the zeros' then the image's) against our sampler
  with the IP-Adapter conditioning (it encodes the pixels itself)."""
  import math

  import torch

  from persona_jax.diffusion.sampling import generate, pipeline_scheduler
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.text_to_image import SampleOptions, prompt_inputs
  from persona_jax.verify import GUIDANCE, PROMPTS, compare, nchw, reference_scheduler
  ref.scheduler = reference_scheduler("ddim", model_path)
  ref.set_progress_bar_config(disable=True)
  b = pixels.shape[0]
  prompts, negative = list(PROMPTS)[:b], ["blurry"] * b
  f, c = pipe.vae_scale_factor, pipe.unet_config
  m = math.lcm(c.downsample_factor, max(1, 8 // f))
  latents = np.random.default_rng(seed + 1).standard_normal(
      (b, 4 * m, 3 * m, c.in_channels)).astype(np.float32)
  size = (latents.shape[1] * f, latents.shape[2] * f)
  # diffusers applies the given embeddings (one set: [negative; positive], each [1, K images,
  # ...]) to every prompt of the batch: the first image conditions both prompts, on our side too.
  embeds = [torch.cat([zeros[:1], feats[:1]])[:, None]]              # [2, 1 image, ...]
  pixels = np.repeat(pixels[:1], b, axis=0)
  with torch.no_grad():
    want = ref(prompt=prompts, negative_prompt=negative, num_inference_steps=steps,
               guidance_scale=GUIDANCE, latents=torch.from_numpy(nchw(latents)),
               height=size[0], width=size[1],
               ip_adapter_image_embeds=embeds, output_type="latent").images.numpy()
  cond = IPAdapterConditioning(clip_config, projection, (), scale)
  models = pipe.models(UNet2DConditionModel(dataclasses.replace(
      c, addons=(DecoupledCrossAttention(),))))
  full = {**pipe.params, **params, "image_encoder": clip_params}     # params: the UNet with the file
  inputs = {**prompt_inputs(pipe, pipe.tokenizer, prompts, negative, SampleOptions(), size),
            CLIP_PIXELS: pixels, IP_SCALE: np.full((b,), scale, np.float32)}
  with jax.default_matmul_precision("highest"):
    got = generate(full, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0, latents, models=models,
                   scheduler=pipeline_scheduler(pipe.scheduler_config, pipe.is_sdxl),
                   num_steps=steps, latent_shape=latents.shape[1:], decode=False,
                   conditioning=cond)
  return compare(f"{name}ddim {steps} steps, cfg {GUIDANCE}: latents", nchw(got), want)


def verify_file(pipe, model_path, file, *, image_encoder=None, allow_pickle: bool = False,
                seed: int = 0, sampling_steps: int = 3):
  """The image encoder (`image_encoder`, else MODEL/image_encoder) with its preprocessing, then
  the file on both sides (and `sampling_steps` DDIM steps with guidance): [Comparison], the last
  one how much the adapter moved diffusers' UNet. `file`: an IP-Adapter file or a run folder."""
  from persona_jax.verify import compare_image_encoder, find_image_encoder
  path, file = Path(model_path), find_file(file)
  encoder = find_image_encoder(path, image_encoder)
  if encoder is None:
    raise ModelFileError(f"{path} has no image_encoder/; pass --image-encoder DIR (the CLIP image "
                         "encoder the IP-Adapter was trained with)")
  results = compare_image_encoder(encoder, allow_pickle=allow_pickle, seed=seed)
  return results + compare_ip_adapter(pipe, path, file, encoder, allow_pickle=allow_pickle,
                                      seed=seed, sampling_steps=sampling_steps)
