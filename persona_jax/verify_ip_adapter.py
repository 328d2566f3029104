"""`persona-jax verify MODEL --ip-adapter FILE [--image-encoder DIR]`: one IP-Adapter file loaded by
diffusers (`pipe.load_ip_adapter`) and by persona_jax (methods/ip_adapter.py), compared on the
same random CLIP pixels: the image features (transformers' encoder vs ours), the projected
tokens (diffusers' `encoder_hid_proj` vs ours) and the UNet's output with the decoupled
cross-attention at a scale. A last line reports how much the adapter moved diffusers' UNet (a
loader that silently skipped the file shows 0 there). torch/diffusers are imported only here.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree

VERIFY_SCALE = 0.6


def compare_ip_adapter(pipe, model_path, file, image_encoder, *, scale: float = VERIFY_SCALE,
                       allow_pickle: bool = False, seed: int = 0, sampling_steps: int = 0):
  """[Comparison] of `file` (official layout) on both sides; `pipe` is persona_jax's pipeline of
  the diffusers folder `model_path`, `image_encoder` a CLIPVisionModel(WithProjection) folder.
  With `sampling_steps`, also that many DDIM steps with guidance (`_compare_sampling`)."""
  import dataclasses

  import torch
  from diffusers import StableDiffusionPipeline
  from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.methods import ip_adapter as ipa
  from persona_jax.models.extra_conditioning import ExtraConditioning
  from persona_jax.models.image_projection import PLUS, projection_model
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.verify import Comparison, compare, nchw
  file, image_encoder = Path(file), Path(image_encoder)
  state = ipa.read_official(file, allow_pickle)                  # refuses a pickle unless allowed
  projection, trainable = ipa.from_official(state, pipe.params["unet"],
                                            ipa.cross_attention_dim(pipe.unet_config), str(file))
  clip_config, clip_params = load_image_encoder(image_encoder)
  ref = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None,
                                                local_files_only=True, dtype=torch.float32)
  ref.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name,
                      image_encoder_folder=None)
  cls = CLIPVisionModelWithProjection if clip_config.with_projection else CLIPVisionModel
  encoder = cls.from_pretrained(image_encoder, local_files_only=True).eval().float()

  rng = np.random.default_rng(seed)
  s, f, c = clip_config.image_size, pipe.unet_config.downsample_factor, pipe.unet_config
  pixels = rng.standard_normal((2, s, s, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 4 * f, 3 * f, c.in_channels)).astype(np.float32)
  t = np.array([500, 80])
  ctx = rng.standard_normal((2, 7, ipa.cross_attention_dim(c))).astype(np.float32)
  unet = UNet2DConditionModel(dataclasses.replace(c, ip_adapter=True))
  params = jax.tree.map(jnp.asarray, tree.merge({"unet": pipe.params["unet"]}, trainable))

  @jax.jit
  def ours(params, clip_params, pixels, scale):
    feats = ipa.image_features(clip_config, projection.kind, clip_params, pixels)
    tokens = projection_model(projection).apply({"params": params["ip_adapter"]["image_proj"]}, feats)
    out = unet.apply({"params": params["unet"]}, latents, t, ctx,
                     ExtraConditioning(ip_tokens=tokens, ip_scale=scale))
    return feats, tokens, out

  with torch.no_grad(), jax.default_matmul_precision("highest"):
    got = jax.device_get(ours(params, clip_params, pixels, jnp.float32(scale)))
    out = encoder(torch.from_numpy(nchw(pixels)), output_hidden_states=True)
    feats = out.hidden_states[-2] if projection.kind == PLUS else out.image_embeds
    embeds = [feats[:, None]]                               # [B, 1 image, ...]
    tokens = ref.unet.encoder_hid_proj(embeds)[0][:, 0]
    run_ref = lambda: ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t),
                               encoder_hidden_states=torch.from_numpy(ctx),
                               added_cond_kwargs={"image_embeds": embeds}).sample.numpy()
    ref.set_ip_adapter_scale(scale)
    want = run_ref()
    ref.set_ip_adapter_scale(0.0)
    off = run_ref()
  moved = float(np.abs(want - off).max() / max(np.abs(off).max(), 1e-30))
  name = f"ip_adapter({projection.kind})."
  results = [compare(name + "image_features", got[0], feats.numpy()),
             compare(name + "image_proj tokens", got[1], tokens.numpy()),
             compare(name + f"unet (scale {scale})", got[2], out_nhwc(want))]
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
  with `MethodConditioning` over the IP-Adapter conditioning (it encodes the pixels itself)."""
  import dataclasses
  import math

  import torch
  from diffusers import DDIMScheduler

  from persona_jax.diffusion.sampling import generate, pipeline_scheduler

  from persona_jax.models.components import SDModels
  from persona_jax.methods import ip_adapter as ipa
  from persona_jax.methods.base import CLIP_PIXELS, Method, MethodConditioning
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.tokenizer import tokenize
  from persona_jax.verify import GUIDANCE, PROMPTS, compare, nchw
  ref.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(model_path,
                                                                      subfolder="scheduler"))
  ref.set_progress_bar_config(disable=True)
  b = pixels.shape[0]
  prompts, negative = list(PROMPTS)[:b], ["blurry"] * b
  f, c = pipe.vae_scale_factor, pipe.unet_config
  m = math.lcm(c.downsample_factor, max(1, 8 // f))
  latents = np.random.default_rng(seed + 1).standard_normal(
      (b, 4 * m, 3 * m, c.in_channels)).astype(np.float32)
  # diffusers applies the given embeddings (one set: [negative; positive], each [1, K images,
  # ...]) to every prompt of the batch: the first image conditions both prompts, on our side too.
  embeds = [torch.cat([zeros[:1], feats[:1]])[:, None]]              # [2, 1 image, ...]
  pixels = np.repeat(pixels[:1], b, axis=0)
  with torch.no_grad():
    want = ref(prompt=prompts, negative_prompt=negative, num_inference_steps=steps,
               guidance_scale=GUIDANCE, latents=torch.from_numpy(nchw(latents)),
               height=latents.shape[1] * f, width=latents.shape[2] * f,
               ip_adapter_image_embeds=embeds, output_type="latent").images.numpy()
  cond = ipa.IPAdapterConditioning(clip_config, projection, (), scale)
  models = SDModels(UNet2DConditionModel(dataclasses.replace(c, ip_adapter=True)),
                    pipe.text_encoder, pipe.vae)
  full = {**pipe.params, **params, "image_encoder": clip_params}     # params: the UNet with the file
  inputs = {"ids": tokenize(pipe.tokenizer, prompts),
            "negative_ids": tokenize(pipe.tokenizer, negative),
            CLIP_PIXELS: pixels, "ip_scale": np.full((b,), scale, np.float32)}
  with jax.default_matmul_precision("highest"):
    got = generate(full, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0, latents, models=models,
                   scheduler=pipeline_scheduler(pipe.scheduler_config), num_steps=steps,
                   latent_shape=latents.shape[1:], decode=False,
                   conditioning=MethodConditioning(Method(name=ipa.IP_ADAPTER,
                                                          latent_conditioning=cond)))
  return compare(f"{name}ddim {steps} steps, cfg {GUIDANCE}: latents", nchw(got), want)


def out_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def verify_ip_adapter(path, file, *, image_encoder=None, tolerance: float | None = None,
                      allow_pickle: bool = False, seed: int = 0, sampling_steps: int = 3,
                      print_fn=print) -> bool:
  """`persona-jax verify MODEL --ip-adapter FILE`: the image encoder (`--image-encoder`, else
  MODEL/image_encoder) with its preprocessing, then the file on both sides (and
  `sampling_steps` DDIM steps with guidance); prints one line per output in `verify`'s format
  and returns whether all pass."""
  from persona_jax.errors import ModelFileError
  from persona_jax.pipeline import load_pipeline
  from persona_jax.verify import (DEFAULT_TOLERANCE, _require_reference, compare_image_encoder,
                                  find_image_encoder)
  tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
  path = Path(path)
  encoder = find_image_encoder(path, image_encoder)
  if encoder is None:
    raise ModelFileError(f"{path} has no image_encoder/; pass --image-encoder DIR (the CLIP image "
                         "encoder the IP-Adapter was trained with)")
  _require_reference()
  pipe = load_pipeline(path, allow_pickle=allow_pickle)
  results = compare_image_encoder(encoder, allow_pickle=allow_pickle, seed=seed)
  results += compare_ip_adapter(pipe, path, file, encoder, allow_pickle=allow_pickle, seed=seed,
                                sampling_steps=sampling_steps)
  print_fn(f"verify {path} + IP-Adapter {file} + image encoder {encoder} (float32, highest "
           f"matmul precision, tolerance {tolerance:.0e} relative)")
  print_fn(f"{'output':38s} {'max abs err':>12s} {'max rel err':>12s}")
  compared, moved = results[:-1], results[-1]
  for r in compared:
    print_fn(f"{r.name:38s} {r.max_abs:12.3e} {r.max_rel:12.3e}  {'ok' if r.ok(tolerance) else 'FAIL'}")
  print_fn(f"{moved.name:38s} {'':12s} {moved.max_rel:12.3e}  "
           f"{'ok' if moved.max_rel > 0 else 'FAIL (not loaded)'}")
  passed = all(r.ok(tolerance) for r in compared) and moved.max_rel > 0
  print_fn("PASS" if passed else "FAIL: some outputs differ beyond the tolerance")
  return passed
