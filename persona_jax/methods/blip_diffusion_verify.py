"""`persona-jax verify BLIPDIFFUSION_DIR` (methods/blip_diffusion.py): the folder run by persona_jax
and by diffusers' deprecated `BlipDiffusionPipeline`, its Q-Former and context text encoder under
the transformers 5 shim (persona_jax/blip_diffusion_torch.py, the Q-Former on the folder's
qformer_tokenizer/ or the shipped vocabulary), compared on:
  BLIP's image processing of three odd-sized random images (RGB, RGBA, L) against
  BlipImageProcessor.preprocess with the folder's mean and std; the Q-Former's query embeddings
  of two of them with the categories "dog" and "teddy bear" (padding masked); the assembled
  prompts (exact) and the context text encoder's prompt embeddings with the query embeddings at
  ctx_begin_pos; the negative prompt's embeddings without them; three sampler steps with
  classifier-free guidance from identical initial latents (the latents and the decoded images).
The sampler is the one `sample` uses (the folder's; DDIM for the release's PNDM), diffusers' class
`from_config` of the folder's scheduler config with steps_offset 1 and clip_sample False, the
rewrite persona_jax's sampling applies to SD 1.x configs (BlipDiffusionPipeline does not rewrite
its scheduler: a DDIM built there from the PNDM config would clip the latents to [-1, 1]).
"""

from __future__ import annotations

import numpy as np

PROMPTS = ("swimming underwater", "  on a red sofa, highly detailed ")
CATEGORIES = ("dog", "teddy bear")
TARGETS = ("dog", "bear")
NEGATIVE = "blurry, low quality"
PROMPT_STRENGTH, PROMPT_REPS = 1.0, 20


def random_images(size: int, seed: int):
  """Three PIL images around `size`, one down- and two up-sampled: RGB, RGBA and L."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  shapes = ((size * 4 // 3 + 1, size * 5 // 6 + 3), (size // 2 + 1, size + 7), (size + 5, size - 3))
  modes = ((3, "RGB"), (4, "RGBA"), (1, "L"))
  return [Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze(), mode)
          for (h, w), (c, mode) in zip(shapes, modes)]


def _reference_scheduler(sampler: str, path):
  """diffusers' scheduler of `sampler` from the folder's config, rewritten as persona_jax's SD
  sampling rewrites it."""
  from persona_jax.verify import reference_scheduler
  scheduler = reference_scheduler(sampler, path)
  fixes = {"steps_offset": 1,
           **({"clip_sample": False} if "clip_sample" in scheduler.config else {})}
  return type(scheduler).from_config(scheduler.config, **fixes)


def reference_pipeline(pipe, path, sampler: str, variant=None, allow_pickle: bool = False):
  """diffusers' BlipDiffusionPipeline of the folder (shimmed Q-Former and text encoder)."""
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import (
      BlipImageProcessor)
  from diffusers.pipelines.deprecated.blip_diffusion.pipeline_blip_diffusion import (
      BlipDiffusionPipeline)

  import torch

  from persona_jax import blip_diffusion_torch as shim
  kw = dict(variant=variant, use_safetensors=None if allow_pickle else True, local_files_only=True)
  processor_dir = path / "image_processor"
  processor = (BlipImageProcessor.from_pretrained(processor_dir)
               if (processor_dir / "preprocessor_config.json").is_file() else BlipImageProcessor())
  index = pipe.raw_configs["model_index"]
  qformer = shim.load_qformer(path / "qformer", pipe.qformer_tokenizer_dir)
  text_encoder = shim.load_context_text_encoder(path / "text_encoder")
  with torch.no_grad():       # a file without the position_ids buffers leaves them uninitialized
    for positions in (qformer.embeddings.position_ids,
                      text_encoder.text_model.embeddings.position_ids):
      positions.copy_(torch.arange(positions.shape[-1]).expand_as(positions))
  ref = BlipDiffusionPipeline(
      tokenizer=pipe.tokenizer, text_encoder=text_encoder,
      vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).eval().float(),
      unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).eval().float(),
      scheduler=_reference_scheduler(sampler, path),
      qformer=qformer,
      image_processor=processor, ctx_begin_pos=index.get("ctx_begin_pos", 2),
      mean=index.get("mean"), std=index.get("std"))
  ref.set_progress_bar_config(disable=True)
  return ref


def verify_folder(pipe, path, *, seed: int = 0, sampler: str | None = None, variant=None,
                  allow_pickle: bool = False, steps: int = 3):
  """[Comparison] of the folder on both sides (module docstring); `pipe` is persona_jax's
  BlipDiffusionPipeline of the folder `path`."""
  import jax
  import torch

  from persona_jax.data.clip_images import preprocess
  from persona_jax.methods.blip_diffusion_conditioning import (BLIP_PIXELS, CATEGORY_IDS,
                                                               CATEGORY_MASK, build_prompt)
  from persona_jax.qformer_tokenizer import tokenize_category
  from persona_jax.text_to_image import SampleOptions, sampler_name
  from persona_jax.tokenizer import tokenize
  from persona_jax.verify import Comparison, compare, nchw

  sampler = sampler or sampler_name(pipe, SampleOptions())
  if sampler == "euler_ancestral":
    sampler = "euler"           # its noise is diffusers' own: compare the deterministic twin
  ref = reference_pipeline(pipe, path, sampler, variant, allow_pickle)
  cond = pipe.conditioning()
  size = pipe.qformer_config.vision_config.image_size
  images = random_images(size, seed)
  index = pipe.raw_configs["model_index"]
  want_pixels = ref.image_processor.preprocess(images, image_mean=index.get("mean"),
                                               image_std=index.get("std"),
                                               return_tensors="np")["pixel_values"]
  pixels = preprocess(images, pipe.image_processing)
  results = [compare("blip image processing", nchw(pixels), want_pixels)]

  b = len(PROMPTS)
  ids, mask = tokenize_category(pipe.qformer_tokenizer, list(CATEGORIES))
  subject = {BLIP_PIXELS: pixels[:b], CATEGORY_IDS: ids, CATEGORY_MASK: mask}
  built = [build_prompt(p, t, PROMPT_STRENGTH, PROMPT_REPS) for p, t in zip(PROMPTS, TARGETS)]
  want_built = ref._build_prompt(list(PROMPTS), list(TARGETS), PROMPT_STRENGTH, PROMPT_REPS)
  same = built == want_built
  results.append(Comparison("prompt assembly (exact)", float(not same), float(not same)))
  length = cond.prompt_length
  prompt_ids = tokenize(pipe.tokenizer, built, length)
  negative_ids = tokenize(pipe.tokenizer, [NEGATIVE] * b)
  params = pipe.params
  with torch.no_grad():
    ref_pixels = torch.from_numpy(want_pixels[:b])
    want_query = ref.get_query_embeddings(ref_pixels, list(CATEGORIES))
    want_context = ref.encode_prompt(want_query, want_built, device="cpu").numpy()
    want_negative = ref.text_encoder(input_ids=torch.from_numpy(negative_ids).long(),
                                     ctx_embeddings=None)[0].numpy()

  def encodings(params, subject, prompt_ids, negative_ids):
    query = cond.query_embeddings(params, subject)
    return query, cond.encode(params, prompt_ids, query), cond.encode(params, negative_ids)
  with jax.default_matmul_precision("highest"):
    query, context, negative = jax.jit(encodings)(params, subject, prompt_ids, negative_ids)
  results += [compare("qformer query embeddings", query, want_query.numpy()),
              compare("text_encoder: prompt with ctx", context, want_context),
              compare("text_encoder: negative (no ctx)", negative, want_negative)]
  results += _compare_sampling(pipe, ref, cond, images[:b], subject, built, sampler, seed, steps)
  return results


def _compare_sampling(pipe, ref, cond, images, subject, built, sampler, seed, steps):
  """`steps` sampler steps with guidance on both sides from the same latents: the final latents
  (what diffusers' VAE decode receives, times the scaling factor) and the images."""
  import jax
  import torch

  from persona_jax.diffusion.sampling import decode_latents, generate, pipeline_scheduler
  from persona_jax.text_to_image import SampleOptions, prompt_inputs
  from persona_jax.verify import GUIDANCE, compare, nchw
  b = len(built)
  f = pipe.vae_scale_factor
  uc = pipe.unet_config
  m = max(1, 8 // f)                                   # diffusers wants sizes divisible by 8
  latents = np.random.default_rng(seed + 1).standard_normal(
      (b, 4 * m, 3 * m, uc.in_channels)).astype(np.float32)
  h, w = latents.shape[1] * f, latents.shape[2] * f
  seen = {}
  decode = ref.vae.decode

  def capture(z, *args, **kwargs):
    seen["latents"] = z.numpy() * ref.vae.config.scaling_factor
    return decode(z, *args, **kwargs)
  ref.vae.decode = capture
  with torch.no_grad():
    want_images = ref(list(PROMPTS), images, list(CATEGORIES), list(TARGETS),
                      latents=torch.from_numpy(nchw(latents)), guidance_scale=GUIDANCE, height=h,
                      width=w, num_inference_steps=steps, neg_prompt=NEGATIVE,
                      prompt_strength=PROMPT_STRENGTH, prompt_reps=PROMPT_REPS,
                      output_type="np").images
  inputs = prompt_inputs(pipe, pipe.tokenizer, built, [NEGATIVE] * b, SampleOptions(), (h, w),
                         prompt_length=cond.prompt_length)
  inputs.update(subject)
  with jax.default_matmul_precision("highest"):
    final = generate(pipe.params, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0, latents,
                     models=pipe.models(), scheduler=pipeline_scheduler(pipe.scheduler_config),
                     num_steps=steps, latent_shape=latents.shape[1:], conditioning=cond,
                     sampler=sampler, decode=False)
    out = jax.jit(decode_latents, static_argnums=0)(pipe.vae, pipe.params, final)
  name = f"{sampler} {steps} steps, cfg {GUIDANCE}"
  return [compare(f"{name}: latents", nchw(final), seen["latents"]),
          compare(f"{name}: images", out, want_images)]
