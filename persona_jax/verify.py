"""`persona-jax verify`: run a model folder in persona_jax and in diffusers/transformers PyTorch on
identical inputs and report the largest error per component. SDXL folders add the second text
encoder (hidden states, pooled, projected), the UNet's added conditioning and
StableDiffusionXLPipeline's sampling with micro-conditioning and zeroed negatives. With an image encoder (`--image-encoder
DIR`, or the model's `image_encoder/`), random images also go through both CLIP preprocessors
(ours and transformers' PIL `CLIPImageProcessorPil`) and both vision encoders.

Both sides run in float32 at the highest matmul precision. The relative error is
max|ours - reference| / max|reference| over the whole output. torch, diffusers and transformers'
PyTorch models come with the `verify` extra and are imported only here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import numpy as np

from persona_jax.errors import ModelFileError
from persona_jax.pipeline import Pipeline, load_pipeline
from persona_jax.tokenizer import tokenize

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
PROMPTS = ("a photo of a dog", "an astronaut riding a horse on the moon, highly detailed")


@dataclasses.dataclass(frozen=True)
class Comparison:
  name: str
  max_abs: float
  max_rel: float

  def ok(self, tolerance: float) -> bool:
    return bool(np.isfinite(self.max_rel)) and self.max_rel <= tolerance


def compare(name: str, ours, reference) -> Comparison:
  """Largest absolute and relative (max|a-b| / max|b|) error of `ours` against `reference`."""
  a = np.asarray(ours, dtype=np.float64)
  b = np.asarray(reference, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"{name}: shapes differ, ours {a.shape} vs reference {b.shape}")
  err = float(np.abs(a - b).max())
  return Comparison(name, err, err / max(float(np.abs(b).max()), 1e-30))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


SAMPLING_STEPS = 3
GUIDANCE = 7.5


def _require_reference() -> None:
  """Imports torch, diffusers and transformers (the `verify` extra), or exits saying how to
  install them; quiets transformers' advisories and turns off TF32."""
  import importlib
  try:
    torch, _, transformers = (importlib.import_module(m)
                              for m in ("torch", "diffusers", "transformers"))
  except ImportError as e:
    raise SystemExit(f"verify needs the reference implementations: pip install "
                     f"'persona-jax[verify]' -c constraints.txt ({e})") from None
  transformers.utils.logging.set_verbosity_error()     # no advisories about torchvision etc.
  torch.backends.cuda.matmul.allow_tf32 = False


@dataclasses.dataclass
class TorchComponents:
  """The folder's networks in diffusers/transformers PyTorch (text_2: SDXL's second encoder)."""
  unet: object
  vae: object
  text: object
  text_2: object = None


def _torch_components(path: Path, variant, allow_pickle, sdxl: bool = False) -> TorchComponents:
  _require_reference()
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTextModelWithProjection
  kw = dict(variant=variant, use_safetensors=None if allow_pickle else True, local_files_only=True)
  unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).eval().float()
  vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).eval().float()
  text = CLIPTextModel.from_pretrained(path / "text_encoder", **kw).eval().float()
  text_2 = (CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw).eval().float()
            if sdxl else None)
  return TorchComponents(unet, vae, text, text_2)


def _compare_text_encoder(name: str, ours, ref, ref_pooled) -> list[Comparison]:
  """Last hidden state, pooled output and penultimate layer (+ the projection, if any)."""
  out = [compare(f"{name}.last_hidden_state", ours.last_hidden_state, ref.last_hidden_state.numpy()),
         compare(f"{name}.pooled", ours.pooled, ref_pooled.numpy()),
         compare(f"{name}.hidden_states[-2]", ours.hidden_states[-2],
                 ref.hidden_states[-2].numpy())]
  if ours.text_embeds is not None:
    out.append(compare(f"{name}.text_embeds (projected)", ours.text_embeds,
                       ref.text_embeds.numpy()))
  return out


def compare_components(pipe: Pipeline, path: Path, *, variant=None, allow_pickle=False,
                       seed: int = 0, sampler: str | None = None) -> list[Comparison]:
  """Runs text encoder, UNet and VAE (encode and decode) on both sides; returns the errors."""
  import torch
  ref_models = _torch_components(path, variant, allow_pickle, pipe.is_sdxl)
  unet_t, vae_t = ref_models.unet, ref_models.vae
  rng = np.random.default_rng(seed)
  results = []
  b = len(PROMPTS)
  uc, vc = pipe.unet_config, pipe.vae_config
  f = uc.downsample_factor
  h, w = 4 * f, 3 * f                                          # non-square latents
  with torch.no_grad(), jax.default_matmul_precision("highest"):
    ids = tokenize(pipe.tokenizer, list(PROMPTS))
    ref = ref_models.text(torch.from_numpy(ids).long(), output_hidden_states=True)
    ours = jax.jit(pipe.text_encoder.apply)({"params": pipe.params["text_encoder"]}, ids)
    results += _compare_text_encoder("text_encoder", ours, ref, ref.pooler_output)
    context, added, added_ref = ref.last_hidden_state.numpy(), None, {}
    if pipe.is_sdxl:
      ids_2 = tokenize(pipe.tokenizer_2, list(PROMPTS))
      text_2 = ref_models.text_2
      ref_2 = text_2(torch.from_numpy(ids_2).long(), output_hidden_states=True)
      ours_2 = jax.jit(pipe.text_encoder_2.apply)({"params": pipe.params["text_encoder_2"]}, ids_2)
      results += _compare_text_encoder("text_encoder_2", ours_2, ref_2,
                                       text_2.text_model(torch.from_numpy(ids_2).long()).pooler_output)
      context = np.concatenate([ref.hidden_states[-2].numpy(), ref_2.hidden_states[-2].numpy()], -1)
      time_ids = np.array([[4 * f * 8, 3 * f * 8, 0, 0, 4 * f * 8, 3 * f * 8],
                           [1024, 768, 16, 32, 512, 512]][:b], np.float32)
      added = {"text_embeds": ref_2.text_embeds.numpy(), "time_ids": time_ids}
      added_ref = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}

    latents = rng.standard_normal((b, h, w, uc.in_channels)).astype(np.float32)
    t = np.linspace(1, 999, b).astype(np.int64)
    ref_eps = unet_t(torch.from_numpy(nchw(latents)), torch.from_numpy(t),
                     torch.from_numpy(context), **added_ref).sample.numpy()
    eps = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, latents, t, context,
                                   added_cond=added)
    results.append(compare("unet" + (" (added conditioning)" if added else ""), nchw(eps), ref_eps))

    vf = vc.downsample_factor
    images = rng.uniform(-1, 1, (b, 4 * vf, 3 * vf, vc.in_channels)).astype(np.float32)
    post = vae_t.encode(torch.from_numpy(nchw(images))).latent_dist
    vae = {"params": pipe.params["vae"]}
    moments = jax.jit(functools.partial(pipe.vae.apply, method="encode"))(vae, images)
    results.append(compare("vae.encode.mean", nchw(moments.mean), post.mean.numpy()))
    results.append(compare("vae.encode.logvar", nchw(moments.logvar), post.logvar.numpy()))
    z = rng.standard_normal((b, 4, 3, vc.latent_channels)).astype(np.float32)
    ref_img = vae_t.decode(torch.from_numpy(nchw(z))).sample.numpy()
    img = jax.jit(functools.partial(pipe.vae.apply, method="decode"))(vae, z)
    results.append(compare("vae.decode", nchw(img), ref_img))
    # diffusers' pipeline wants image sizes divisible by 8.
    m = math.lcm(f, max(1, 8 // vc.downsample_factor))
    latents = rng.standard_normal((b, 4 * m, 3 * m, uc.in_channels)).astype(np.float32)
    results.extend(compare_sampling(pipe, ref_models, path, latents, sampler))
  return results


def reference_scheduler(sampler: str, path: Path):
  """diffusers' scheduler of one of our samplers, `from_config` of the folder's config."""
  import diffusers
  classes = {"ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
             "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
             "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
             "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}
  name, overrides = classes[sampler]
  cls = getattr(diffusers, name)
  return cls.from_config(cls.load_config(path, subfolder="scheduler"), **overrides)


def compare_sampling(pipe, ref_models: TorchComponents, path, latents, sampler: str | None = None):
  """A few sampler steps with guidance against diffusers' pipeline, from identical initial
  latents, with `sampler` (default: the folder's; DDIM where we have not its class; Euler's
  deterministic twin for Euler ancestral, whose noise diffusers draws itself); diffusers'
  scheduler is that class `from_config` of the folder's. SD 1.x/2.x: negative prompts; SDXL: an
  negative prompt not given (zeros where the folder says force_zeros_for_empty_prompt) and
  micro-conditioning that is not the default."""
  import torch
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

  from persona_jax.diffusion.sampling import decode_latents, generate, pipeline_scheduler
  from persona_jax.text_to_image import SampleOptions, prompt_inputs, sampler_name

  sampler = sampler or sampler_name(pipe, SampleOptions())
  if sampler == "euler_ancestral":
    sampler = "euler"
  scheduler = reference_scheduler(sampler, path)
  b, h, w, _ = latents.shape
  f = pipe.vae_scale_factor
  parts = dict(vae=ref_models.vae, text_encoder=ref_models.text, tokenizer=pipe.tokenizer,
               unet=ref_models.unet, scheduler=scheduler)
  kw = dict(prompt=list(PROMPTS), num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE,
            latents=torch.from_numpy(nchw(latents)), height=h * f, width=w * f)
  if pipe.is_sdxl:
    ref = StableDiffusionXLPipeline(**parts, text_encoder_2=ref_models.text_2,
                                    tokenizer_2=pipe.tokenizer_2,
                                    force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)
    options = SampleOptions(original_size=(2 * h * f, 3 * w * f), crops_coords_top_left=(8, 0))
    kw.update(original_size=options.original_size,
              crops_coords_top_left=options.crops_coords_top_left)
    negative = [None] * b                # as diffusers' negative_prompt=None
  else:
    ref = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    options = SampleOptions()
    negative = ["blurry"] * b
    kw.update(negative_prompt=negative)
  ref.set_progress_bar_config(disable=True)
  want_latents = ref(**kw, output_type="latent").images.numpy()
  want_images = ref(**kw, output_type="np").images
  inputs = prompt_inputs(pipe, pipe.tokenizer, list(PROMPTS), negative, options, (h * f, w * f))
  final = generate(pipe.params, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0, latents,
                   models=pipe.models(),
                   scheduler=pipeline_scheduler(pipe.scheduler_config, pipe.is_sdxl),
                   num_steps=SAMPLING_STEPS, latent_shape=latents.shape[1:], sampler=sampler,
                   decode=False)
  # generate(decode=True) ends with exactly this decode; one sampling program compiles, not two.
  images = jax.jit(decode_latents, static_argnums=0)(pipe.vae, pipe.params, final)
  name = f"{sampler} {SAMPLING_STEPS} steps, cfg {GUIDANCE}"
  return [compare(f"{name}: latents", nchw(final), want_latents),
          compare(f"{name}: images", images, want_images)]


def _reference_image_processor(folder: Path, image_size: int):
  """transformers' PIL CLIP processor from the folder's preprocessor_config.json, else CLIP's
  defaults at the model's image size (as `load_image_processor`)."""
  try:
    from transformers import CLIPImageProcessorPil as Processor      # transformers 5
  except ImportError:                                                 # pragma: no cover
    from transformers import CLIPImageProcessor as Processor          # 4.x: the PIL one
  from persona_jax.data.clip_images import PROCESSOR_FILE
  if (folder / PROCESSOR_FILE).is_file():
    return Processor.from_pretrained(folder, local_files_only=True)
  return Processor(size={"shortest_edge": image_size},
                   crop_size={"height": image_size, "width": image_size})


def compare_image_encoder(folder, *, variant=None, allow_pickle=False,
                          seed: int = 0) -> list[Comparison]:
  """Random odd-sized images through our preprocessing + encoder and through transformers' PIL
  processor + CLIPVisionModel(WithProjection); returns the errors."""
  import torch
  from PIL import Image
  from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

  from persona_jax.data.clip_images import load_image_processor, preprocess
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.clip_vision import CLIPVisionModel as OurModel
  folder = Path(folder)
  config, params = load_image_encoder(folder, variant=variant, allow_pickle=allow_pickle)
  cls = CLIPVisionModelWithProjection if config.with_projection else CLIPVisionModel
  ref = cls.from_pretrained(folder, variant=variant, local_files_only=True,
                            use_safetensors=None if allow_pickle else True).eval().float()
  s = config.image_size
  rng = np.random.default_rng(seed)
  sizes = ((s * 4 // 3 + 1, s * 5 // 6 + 3), (s // 2 + 1, s + 7))        # (H, W): down and up
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  processor = load_image_processor(folder, image_size=s)
  pixels = preprocess(images, processor)
  ref_pixels = _reference_image_processor(folder, s)(images=images, return_tensors="pt").pixel_values
  results = [compare("image_encoder.preprocess", nchw(pixels), ref_pixels.numpy())]
  with torch.no_grad(), jax.default_matmul_precision("highest"):
    want = ref(ref_pixels, output_hidden_states=True)
    # CLIPVisionModelWithProjection returns no pooler_output: take it from its tower.
    pooled = (ref.vision_model(ref_pixels) if config.with_projection else want).pooler_output
    got = jax.jit(OurModel(config).apply)({"params": params}, pixels)
  name = "image_encoder."
  results += [compare(name + "last_hidden_state", got.last_hidden_state,
                      want.last_hidden_state.numpy()),
              compare(name + "hidden_states[-2]", got.hidden_states[-2],
                      want.hidden_states[-2].numpy()),
              compare(name + "pooler_output", got.pooler_output, pooled.numpy())]
  if config.with_projection:
    results.append(compare(name + "image_embeds", got.image_embeds, want.image_embeds.numpy()))
  return results


# ---------------------------------------------------------------------------------------------
# adapters: the same file loaded by diffusers and by persona_jax

ADAPTER_PROMPT = "a photo of {token} on a blue background"


def _adapter_inputs(pipe: Pipeline, seed: int):
  rng = np.random.default_rng(seed)
  f = pipe.unet_config.downsample_factor
  latents = rng.standard_normal((1, 4 * f, 3 * f, pipe.unet_config.in_channels)).astype(np.float32)
  return latents, np.array([500])


def compare_adapter(pipe: Pipeline, path: Path, load_both, *, seed: int = 0) -> list[Comparison]:
  """One adapter file loaded by diffusers (its own loader) and by persona_jax, then the text
  conditioning of a prompt that uses it and the UNet's output on it compared (SDXL: the
  concatenated context, the pooled embedding and the micro-conditioning, as
  StableDiffusionXLPipeline.encode_prompt and its UNet call).

  `load_both(ref, pipe, tmp) -> (pipe, Sampling, token or None)` (a method's verify hook) loads
  the file into diffusers' pipeline `ref` and returns ours (the pipeline, the params, tokenizers,
  text conditioning and prompt rewrite to sample it with, and the words that use it in the prompt
  as a user types them: diffusers' side expands multi-vector tokens with its maybe_convert_prompt,
  ours with the Sampling's `expand_prompt`; None: "a ball"); `tmp` is a scratch folder. A last
  line reports how much the adapter moved diffusers' UNet output: a loader that silently skipped
  the file shows 0 there."""
  import tempfile

  import torch
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

  from persona_jax.diffusion.conditioning import TextConditioning
  from persona_jax.text_to_image import SampleOptions, prompt_inputs
  sdxl = pipe.is_sdxl
  kind = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
  extra = {} if sdxl else {"safety_checker": None}
  ref = kind.from_pretrained(path, local_files_only=True, use_safetensors=True,
                             torch_dtype=torch.float32, **extra)
  latents, t = _adapter_inputs(pipe, seed)
  f = pipe.vae_scale_factor
  size = (latents.shape[1] * f, latents.shape[2] * f)
  time_ids = np.asarray([size + (0, 0) + size], np.float32)                     # [1, 6]

  def run_ref(token):
    prompt = ADAPTER_PROMPT.format(token=token)
    with torch.no_grad():
      if sdxl:
        ctx, _, pooled, _ = ref.encode_prompt(prompt, do_classifier_free_guidance=False)
        added = {"text_embeds": pooled, "time_ids": torch.from_numpy(time_ids)}
        eps = ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t), ctx,
                       added_cond_kwargs=added).sample
      else:                         # StableDiffusionPipeline.encode_prompt's text path
        prompt = ref.maybe_convert_prompt(prompt, ref.tokenizer)
        ids = ref.tokenizer([prompt], padding="max_length",
                            max_length=ref.tokenizer.model_max_length, return_tensors="pt").input_ids
        ctx = ref.text_encoder(ids)[0]
        eps = ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t), ctx).sample
    return ctx.numpy(), eps.numpy()

  base_ctx, base_eps = run_ref("a ball")
  with tempfile.TemporaryDirectory() as tmp:
    pipe, sampling, token = load_both(ref, pipe, tmp)
  token = token or "a ball"
  ctx_ref, eps_ref = run_ref(token)
  models = pipe.models()
  params = pipe.params if sampling.params is None else sampling.params
  conditioning = sampling.conditioning or TextConditioning()
  inputs = prompt_inputs(pipe, sampling.tokenizer or pipe.tokenizer,
                         [sampling.expand_prompt(ADAPTER_PROMPT.format(token=token))], [None],
                         SampleOptions(), size, sampling.tokenizer_2)
  inputs = {k: v for k, v in inputs.items() if not k.startswith("negative")}   # one half only

  def ours(p, inputs):
    state = conditioning.prepare(models, p, inputs)
    kwargs, _ = conditioning.at(models, p, state, latents, t, None)
    return state["context"], models.unet.apply({"params": p["unet"]}, latents, t, **kwargs)
  with jax.default_matmul_precision("highest"):
    ctx, eps = jax.jit(ours)(params, inputs)
  moved = float(np.abs(eps_ref - base_eps).max() / max(np.abs(base_eps).max(), 1e-12))
  return [compare("adapter: text conditioning", ctx, ctx_ref),
          compare("adapter: unet", nchw(eps), eps_ref),
          Comparison("adapter moved diffusers' unet by", moved, moved)]


def find_image_encoder(path: Path, image_encoder=None) -> Path | None:
  """The image encoder folder to verify: the one given, else `path/image_encoder` if present."""
  if image_encoder is not None:
    if not Path(image_encoder).is_dir():
      raise ModelFileError(f"{image_encoder}: image encoder folder not found")
    return Path(image_encoder)
  default = Path(path) / "image_encoder"
  return default if (default / "config.json").is_file() else None


def verify(path, *, tolerance: float = DEFAULT_TOLERANCE, variant: str | None = None,
           allow_pickle: bool = False, seed: int = 0, image_encoder=None, adapter=None,
           sampler: str | None = None, images=(), folder=None, print_fn=print) -> bool:
  """Loads `path` (and the image encoder, see `find_image_encoder`) on both sides, prints one
  line per output and returns whether all pass. With `adapter` = (a method's VerifySpec, the
  flag's value), only that method's files are compared (its `run`). `sampler`: the sampling
  comparison's (default: the folder's scheduler's). `images`: passed to an adapter hook that
  takes images (VerifySpec.images). `folder`: the PipelineSpec of a method that owns the folder
  (BLIP-Diffusion's): its loader, and its comparisons instead of the SD components'."""
  path = Path(path)
  load = load_pipeline if folder is None else folder.load
  pipe = load(path, variant=variant, allow_pickle=allow_pickle, attention="auto")
  encoder = None
  if folder is not None and adapter is None:
    _require_reference()
    results = folder.verify(pipe, path, seed=seed, sampler=sampler, variant=variant,
                            allow_pickle=allow_pickle)
    what = f" ({pipe.raw_configs['model_index'].get('_class_name')})"
  elif adapter is not None:
    hook, value = adapter
    _require_reference()
    extra = {"images": tuple(images)} if hook.images else {}
    results = hook.run(pipe, path, value, seed=seed, image_encoder=image_encoder,
                       allow_pickle=allow_pickle, **extra)
    what = f" + {hook.flag} {value}"
  else:
    encoder = find_image_encoder(path, image_encoder)
    results = compare_components(pipe, path, variant=variant, allow_pickle=allow_pickle, seed=seed,
                                 sampler=sampler)
    what = ""
  if encoder is not None:
    results += compare_image_encoder(encoder, variant=variant, allow_pickle=allow_pickle, seed=seed)
    what = f" + image encoder {encoder}"
  print_fn(f"verify {path}{what} (float32, highest matmul precision, tolerance {tolerance:.0e} "
           "relative)")
  print_fn(f"{'output':38s} {'max abs err':>12s} {'max rel err':>12s}")
  moved = [r for r in results if r.name.startswith("adapter moved")]
  compared = [r for r in results if r not in moved]
  for r in compared:
    print_fn(f"{r.name:38s} {r.max_abs:12.3e} {r.max_rel:12.3e}  {'ok' if r.ok(tolerance) else 'FAIL'}")
  for r in moved:
    print_fn(f"{r.name:38s} {'':12s} {r.max_rel:12.3e}  {'ok' if r.max_rel > 0 else 'FAIL (not loaded)'}")
  passed = all(r.ok(tolerance) for r in compared) and all(r.max_rel > 0 for r in moved)
  print_fn("PASS" if passed else "FAIL: some outputs differ beyond the tolerance")
  return passed
