"""`persona-jax verify SDXL_DIR --photomaker FILE [--image A.png ...]` (methods/photomaker.py): one
PhotoMaker file run by persona_jax and by the reference (persona_jax/photomaker_torch.py: the
official modules re-created in torch, loaded strictly from the file's `id_encoder.*` keys, with
the official pipeline's prompt expansion, over diffusers' StableDiffusionXLPipeline of the folder
with the file's `lora_weights` loaded by `load_lora_weights`), compared on:
  the ID images' CLIP pixels (with --image; else random pixels, two images), the expanded token
  ids and class_tokens_mask of both tokenizers (exact), the text-only prompt's context and pooled
  embedding, the fused prompt embeddings and their pooled embedding (v2 with random face
  embeddings), the LoRA-merged UNet on the fused prompt, and DDIM steps with guidance through the
  official loop's switch at start_merge_step. A last line reports how much the LoRA moved
  diffusers' UNet (a loader that skipped the keys shows 0 there).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.convert import photomaker_files as pmf
from persona_jax.methods.photomaker_conditioning import (ID_EMBEDS, ID_PIXELS, PHOTOMAKER, START,
                                                         PhotoMakerConditioning)

VERIFY_PROMPT = "a photo of a man {} on a blue background"
RANDOM_IMAGES = 2
EMBEDDING_SCALE = 10.0       # random face embeddings' size (raw ArcFace norms are about 20 to 30)


def _reference_pixels(images, image_size: int) -> np.ndarray:
  """transformers' PIL CLIP processor at the tower's size (CLIPImageProcessor's defaults at 224),
  channels-last [N, S, S, 3]."""
  from PIL import Image
  try:
    from transformers import CLIPImageProcessorPil as Processor      # transformers 5
  except ImportError:                                                 # pragma: no cover
    from transformers import CLIPImageProcessor as Processor
  processor = Processor(size={"shortest_edge": image_size},
                        crop_size={"height": image_size, "width": image_size})
  pil = [Image.open(p).convert("RGB") for p in images]
  return processor(pil, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)


def verify_file(pipe, model_path, file, *, images=(), image_encoder=None,
                allow_pickle: bool = False, seed: int = 0, trigger_word: str = "img",
                start_merge_steps=(0, 10), sampling_steps: int = 3):
  """[Comparison] of `file` on both sides (module docstring); `pipe` is persona_jax's pipeline of
  the SDXL folder `model_path`. `start_merge_steps`: the sampling comparison's values (0: one
  text-only step, then fused; 10, the default: text-only for all 3 steps); one compilation."""
  import torch
  from diffusers import StableDiffusionXLPipeline

  from persona_jax import photomaker_torch as official
  from persona_jax.convert.lora_formats import read_lora_file
  from persona_jax.methods.lora_compose import apply_loras
  from persona_jax.methods.photomaker_inputs import check_base, id_pixels, trigger_tokenizers
  from persona_jax.models import block_names
  from persona_jax.text_to_image import SampleOptions, prompt_inputs
  from persona_jax.verify import Comparison, compare, nchw
  file = Path(file)
  if not pipe.is_sdxl:
    check_base(pipe, None, file)
  state = pmf.read_official(file, allow_pickle)
  config, id_params = pmf.id_encoder_params(state, str(file), **pmf.recorded_head_dims(file))
  check_base(pipe, config, file)
  lora = pmf.lora_state(state)
  encoder = official.official_id_encoder(pmf.id_encoder_state(state, str(file)), config)
  ref = StableDiffusionXLPipeline.from_pretrained(model_path, local_files_only=True,
                                                  dtype=torch.float32)
  ref.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(seed)
  s, results = config.vision.image_size, []
  if images:
    pixels = id_pixels(config, images)[0]
    results.append(compare("photomaker: ID image pixels", pixels, _reference_pixels(images, s)))
  else:
    pixels = rng.standard_normal((RANDOM_IMAGES, s, s, 3)).astype(np.float32)
  n = len(pixels)
  embeds = (EMBEDDING_SCALE * rng.standard_normal((n, config.id_embeddings_dim))).astype(
      np.float32) if config.version == "v2" else None

  # the reference: the official expansion, ID encoder, text-only prompt, LoRA in diffusers
  prompt = VERIFY_PROMPT.format(trigger_word)
  copies = n * config.tokens_per_image
  ref_tok, ref_trigger = official.add_trigger_word(ref.tokenizer, trigger_word)
  ref_tok_2, _ = official.add_trigger_word(ref.tokenizer_2, trigger_word)
  ctx_ref, pooled_ref, mask_ref, ids_ref = official.encode_prompt_with_trigger_word(
      [ref_tok, ref_tok_2], [ref.text_encoder, ref.text_encoder_2], prompt, ref_trigger, copies)
  plain = official.text_only_prompt(ref_tok, prompt, trigger_word)
  with torch.no_grad():
    id_args = [torch.from_numpy(nchw(pixels).copy())[None], ctx_ref, mask_ref]
    if embeds is not None:
      id_args.append(torch.from_numpy(embeds)[None])
    fused_ref = encoder(*id_args)
    plain_ref, _, plain_pooled_ref, _ = ref.encode_prompt(plain, do_classifier_free_guidance=False)
  if lora:
    ref.load_lora_weights({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in lora.items()},
                          adapter_name="photomaker")

  # ours
  tok, tok_2, trigger_id = trigger_tokenizers(pipe, trigger_word)
  cond = PhotoMakerConditioning(config, trigger_id, (tok.pad_token_id, tok_2.pad_token_id), n)
  params = pipe.params
  if lora:
    blocks = len(block_names.all_blocks(pipe.unet_config))
    params = apply_loras(params, [read_lora_file(file, pipe.params, tensors=lora)],
                         np.ones((1, blocks), np.float32), pipe.unet_config)
  params = {**params, PHOTOMAKER: id_params}
  f, c = pipe.vae_scale_factor, pipe.unet_config
  latents = rng.standard_normal((1, 4 * c.downsample_factor, 3 * c.downsample_factor,
                                 c.in_channels)).astype(np.float32)
  size = (latents.shape[1] * f, latents.shape[2] * f)
  feed = {ID_PIXELS: pixels[None], **({ID_EMBEDS: embeds[None]} if embeds is not None else {})}
  inputs = {**prompt_inputs(pipe, tok, [prompt], [None], SampleOptions(), size, tok_2), **feed}
  one_half = {k: v for k, v in inputs.items() if not k.startswith("negative")}
  t = np.array([500])
  models = pipe.models()

  def ours(p, inputs):
    ids, ids_2, mask = cond.expanded(inputs)
    st = cond.prepare(models, p, inputs)
    kwargs, _ = cond.at(models, p, {**st, "start": jnp.int32(-1)}, latents, t, 0)   # fused
    eps = models.unet.apply({"params": p["unet"]}, latents, t, **kwargs)
    return ids, ids_2, mask, st["context"], st["pooled"], st["fused"], st["fused_pooled"], eps
  with jax.default_matmul_precision("highest"):
    got = jax.device_get(jax.jit(ours)(params, one_half))
  time_ids = torch.from_numpy(np.asarray(inputs["time_ids"]))
  with torch.no_grad():
    run_ref = lambda: ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t), fused_ref,
                               added_cond_kwargs={"text_embeds": pooled_ref,
                                                  "time_ids": time_ids}).sample.numpy()
    eps_ref = run_ref()
    if lora:
      ref.disable_lora()
      eps_off = run_ref()
      ref.enable_lora()
  name = f"photomaker {config.version}: "
  results += [
      compare(name + "expanded ids", got[0], ids_ref[0].numpy()),
      compare(name + "expanded ids_2", got[1], ids_ref[1].numpy()),
      compare(name + "class_tokens_mask", got[2], mask_ref.numpy()),
      compare(name + "text-only context", got[3], plain_ref.numpy()),
      compare(name + "text-only pooled", got[4], plain_pooled_ref.numpy()),
      compare(name + "fused prompt embeddings", got[5], fused_ref.numpy()),
      compare(name + "fused pooled", got[6], pooled_ref.numpy()),
      compare(name + "unet, LoRA merged", nchw(got[7]), eps_ref)]
  for start in start_merge_steps if sampling_steps else ():
    results.append(_compare_sampling(pipe, ref, model_path, params, cond, inputs, latents,
                                     sampling_steps, start, {
                                         "negative": torch.zeros_like(plain_ref),
                                         "negative_pooled": torch.zeros_like(plain_pooled_ref),
                                         "text_only": plain_ref, "text_only_pooled": plain_pooled_ref,
                                         "fused": fused_ref, "pooled": pooled_ref,
                                         "time_ids": time_ids}, name))
  if lora:
    moved = float(np.abs(eps_ref - eps_off).max() / max(np.abs(eps_off).max(), 1e-30))
    results.append(Comparison("adapter moved diffusers' UNet output", moved, moved))
  return results


def _compare_sampling(pipe, ref, model_path, params, cond, inputs, latents, steps: int,
                      start: int, ref_kwargs, name):
  """`steps` DDIM steps with guidance (7.5), the negative half zeros (force_zeros_for_empty_prompt)
  and the switch after `start_merge_step` = start: the official loop on diffusers' UNet (LoRA
  loaded) against our sampler with the PhotoMaker conditioning."""
  import torch

  from persona_jax import photomaker_torch as official
  from persona_jax.diffusion.sampling import generate, pipeline_scheduler
  from persona_jax.verify import GUIDANCE, compare, nchw, reference_scheduler
  want = official.denoise(ref.unet, reference_scheduler("ddim", Path(model_path)),
                          torch.from_numpy(nchw(latents).copy()), steps, GUIDANCE, start,
                          **ref_kwargs).numpy()
  feed = {**inputs, START: np.asarray([start], np.int32)}
  with jax.default_matmul_precision("highest"):
    got = generate(params, feed, 0, np.arange(1), GUIDANCE, 0.0, 0.0, latents,
                   models=pipe.models(), scheduler=pipeline_scheduler(pipe.scheduler_config, True),
                   num_steps=steps, latent_shape=latents.shape[1:], decode=False, conditioning=cond)
  return compare(f"{name}ddim {steps} steps, start_merge_step {start}", nchw(got), want)
