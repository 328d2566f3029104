"""`persona-jax verify`: run a model folder in persona_jax and in diffusers/transformers PyTorch on
identical inputs and report the largest error per component. With an image encoder (`--image-encoder
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


def _torch_components(path: Path, variant, allow_pickle):
  _require_reference()
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel
  kw = dict(variant=variant, use_safetensors=None if allow_pickle else True, local_files_only=True)
  unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).eval().float()
  vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).eval().float()
  text = CLIPTextModel.from_pretrained(path / "text_encoder", **kw).eval().float()
  return unet, vae, text


def compare_components(pipe: Pipeline, path: Path, *, variant=None, allow_pickle=False,
                       seed: int = 0) -> list[Comparison]:
  """Runs text encoder, UNet and VAE (encode and decode) on both sides; returns the errors."""
  import torch
  unet_t, vae_t, text_t = _torch_components(path, variant, allow_pickle)
  rng = np.random.default_rng(seed)
  results = []
  b = len(PROMPTS)
  uc, vc = pipe.unet_config, pipe.vae_config
  f = uc.downsample_factor
  h, w = 4 * f, 3 * f                                          # non-square latents
  with torch.no_grad(), jax.default_matmul_precision("highest"):
    ids = tokenize(pipe.tokenizer, list(PROMPTS))
    ref = text_t(torch.from_numpy(ids).long(), output_hidden_states=True)
    ours = jax.jit(pipe.text_encoder.apply)({"params": pipe.params["text_encoder"]}, ids)
    results.append(compare("text_encoder.last_hidden_state", ours.last_hidden_state,
                           ref.last_hidden_state.numpy()))
    results.append(compare("text_encoder.pooled", ours.pooled, ref.pooler_output.numpy()))
    results.append(compare("text_encoder.hidden_states[-2]", ours.hidden_states[-2],
                           ref.hidden_states[-2].numpy()))
    context = ref.last_hidden_state.numpy()

    latents = rng.standard_normal((b, h, w, uc.in_channels)).astype(np.float32)
    t = np.linspace(1, 999, b).astype(np.int64)
    ref_eps = unet_t(torch.from_numpy(nchw(latents)), torch.from_numpy(t),
                     torch.from_numpy(context)).sample.numpy()
    eps = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, latents, t, context)
    results.append(compare("unet", nchw(eps), ref_eps))

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
    results.extend(_compare_sampling(pipe, unet_t, vae_t, text_t, path, latents))
  return results


def _compare_sampling(pipe, unet_t, vae_t, text_t, path, latents):
  """A few DDIM steps with guidance and negative prompts against diffusers' pipeline, from
  identical initial latents; diffusers' scheduler is `DDIMScheduler.from_config` of the folder's."""
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline

  from persona_jax.diffusion.sampling import generate, pipeline_scheduler

  from persona_jax.models.components import SDModels
  scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(path, subfolder="scheduler"))
  ref = StableDiffusionPipeline(vae=vae_t, text_encoder=text_t, tokenizer=pipe.tokenizer,
                                unet=unet_t, scheduler=scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
  ref.set_progress_bar_config(disable=True)
  b, h, w, _ = latents.shape
  f = pipe.vae_scale_factor
  negative = ["blurry"] * b
  kw = dict(prompt=list(PROMPTS), negative_prompt=negative, num_inference_steps=SAMPLING_STEPS,
            guidance_scale=GUIDANCE, latents=torch.from_numpy(nchw(latents)), height=h * f,
            width=w * f)
  want_latents = ref(**kw, output_type="latent").images.numpy()
  want_images = ref(**kw, output_type="np").images
  inputs = {"ids": tokenize(pipe.tokenizer, list(PROMPTS)),
            "negative_ids": tokenize(pipe.tokenizer, negative)}
  run = functools.partial(generate, pipe.params, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0,
                          latents, models=SDModels(pipe.unet, pipe.text_encoder, pipe.vae),
                          scheduler=pipeline_scheduler(pipe.scheduler_config),
                          num_steps=SAMPLING_STEPS,
                          latent_shape=latents.shape[1:])
  name = f"ddim {SAMPLING_STEPS} steps, cfg {GUIDANCE}"
  return [compare(f"{name}: latents", nchw(run(decode=False)), want_latents),
          compare(f"{name}: images", run(), want_images)]


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
  encoder's output on a prompt that uses it and the UNet's output on that context compared.

  `load_both(ref, pipe, tmp) -> (pipe, Sampling, token or None)` (a method's verify hook) loads
  the file into diffusers' pipeline `ref` and returns ours (the pipeline, the params, tokenizer
  and text conditioning to sample it with, and the words that use it in the prompt; None: "a
  ball"); `tmp` is a scratch folder. A last line reports how much the adapter moved diffusers'
  UNet output: a loader that silently skipped the file shows 0 there."""
  import tempfile

  import torch
  from diffusers import StableDiffusionPipeline

  from persona_jax.data.batch import IDS
  from persona_jax.diffusion.conditioning import TextConditioning
  from persona_jax.models.components import SDModels
  ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True,
                                                use_safetensors=True, torch_dtype=torch.float32)
  latents, t = _adapter_inputs(pipe, seed)

  def run_ref(token):
    ids = ref.tokenizer([ADAPTER_PROMPT.format(token=token)], padding="max_length",
                        max_length=ref.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
      ctx = ref.text_encoder(ids)[0]
      eps = ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t), ctx).sample
    return ctx.numpy(), eps.numpy()

  base_ctx, base_eps = run_ref("a ball")
  with tempfile.TemporaryDirectory() as tmp:
    pipe, sampling, token = load_both(ref, pipe, tmp)
  token = token or "a ball"
  ctx_ref, eps_ref = run_ref(token)
  models = SDModels(pipe.unet, pipe.text_encoder, pipe.vae)
  params = pipe.params if sampling.params is None else sampling.params
  tokenizer = sampling.tokenizer or pipe.tokenizer
  conditioning = sampling.conditioning or TextConditioning()
  with jax.default_matmul_precision("highest"):
    ids = tokenize(tokenizer, [ADAPTER_PROMPT.format(token=token)])
    ctx = jax.jit(lambda p, i: conditioning.prepare(models, p, {IDS: i})["context"])(params, ids)
    eps = jax.jit(pipe.unet.apply)({"params": params["unet"]}, latents, t, ctx)
  moved = float(np.abs(eps_ref - base_eps).max() / max(np.abs(base_eps).max(), 1e-12))
  return [compare("adapter: text_encoder.last_hidden_state", ctx, ctx_ref),
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
           print_fn=print) -> bool:
  """Loads `path` (and the image encoder, see `find_image_encoder`) on both sides, prints one
  line per output and returns whether all pass. With `adapter` = (a method's VerifySpec, the
  flag's value), only that method's files are compared (its `run`)."""
  path = Path(path)
  pipe = load_pipeline(path, variant=variant, allow_pickle=allow_pickle, attention="auto")
  encoder = None
  if adapter is not None:
    _require_reference()
    hook, value = adapter
    results = hook.run(pipe, path, value, seed=seed, image_encoder=image_encoder,
                       allow_pickle=allow_pickle)
    what = f" + {hook.flag} {value}"
  else:
    encoder = find_image_encoder(path, image_encoder)
    results = compare_components(pipe, path, variant=variant, allow_pickle=allow_pickle, seed=seed)
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
