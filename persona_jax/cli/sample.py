"""`persona-jax sample`: text-to-image (DDIM, Euler, Euler ancestral, DPM-Solver++ 2M; SD 1.x/2.x
and SDXL), with a trained run (`--run WORKDIR`, any method: its
registry entry says how it samples) and adapter files (`--lora`, `--embedding`) that compose.

The per-method flags (`--e4t DIR`, `--instantbooth DIR`, `--ip-adapter FILE`, ...) are `--run`
restricted to one method, and each method's knobs (`--beta`, `--ip-scale`, ...) are flags too; all
come from the registry (methods/registry.py), so this module names no method.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from persona_jax.cli import process_flags
from persona_jax.cli.model_flags import add_model_flags, load_model
from persona_jax.cli.sampling_checks import check_against_model, check_flags
from persona_jax.errors import ConfigError, PersonaError

NAME = "sample"
HELP = ("text-to-image (SD 1.x/2.x, SDXL; with a trained run or adapter files): one PNG per image "
        "and a grid")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def add_knob_flags(p) -> None:
  """One flag per sampling knob of any method (`--beta`, `--ip-scale`, ...) and `--input`. A
  command's own flag of the same name wins (eval's --subject-class); the knob is then
  `--input NAME=VALUE` there."""
  import argparse

  from persona_jax.methods.registry import knobs
  for knob in knobs().values():
    try:
      p.add_argument(_flag(knob.name), type=knob.type, default=None, dest=f"knob_{knob.name}",
                     metavar=knob.name.upper(), help=knob.help)
    except argparse.ArgumentError:
      continue
  p.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                 help="a method's sampling knob by name (e.g. ip_scale=0.5); traced: other values "
                      "do not recompile")


def knob_values(args) -> dict:
  """{knob: value} of the knob flags and `--input` given."""
  from persona_jax.methods.registry import knobs
  known = knobs()
  out = {name: getattr(args, f"knob_{name}") for name in known
         if getattr(args, f"knob_{name}", None) is not None}
  for entry in getattr(args, "input", []):
    name, eq, text = entry.partition("=")
    if not eq or name not in known:
      raise ConfigError(f"--input {entry}: expected NAME=VALUE with NAME one of "
                        f"{', '.join(sorted(known))}")
    try:
      out[name] = known[name].type(text)
    except ValueError:
      raise ConfigError(f"--input {entry}: '{text}' is not a {known[name].type.__name__}") from None
  return out


# diffusion/samplers.py's SAMPLERS, spelled out so the CLI starts without importing JAX.
SCHEDULERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")


def add_scheduler_flags(p) -> None:
  p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                 help="the sampler, as diffusers' scheduler of that name computes it (default: "
                      "the one the model's scheduler_config.json names; DDIM for others, e.g. "
                      "PNDM)")


def add_step_flags(p) -> None:
  """--steps, --guidance and --scheduler (`sample`, `make-class-images`)."""
  p.add_argument("--steps", type=int, default=50, help="denoising steps")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale, at most 1: none (default 7.5; SDXL 5.0, "
                      "as diffusers)")
  add_scheduler_flags(p)


def add_size_flags(p) -> None:
  """--seed, --height, --width and --batch-size (`sample`, `make-class-images`)."""
  p.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
  for side in ("height", "width"):
    p.add_argument(f"--{side}", type=int, default=None,
                   help=f"image {side} in pixels, a multiple of the VAE's factor (default: the "
                        "model's, its UNet's sample_size x the VAE's factor)")
  p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch")


def add_sdxl_flags(p) -> None:
  """SDXL's micro-conditioning (diffusers' StableDiffusionXLPipeline arguments)."""
  pair = dict(type=int, nargs=2, default=None)
  p.add_argument("--original-size", metavar=("H", "W"), **pair,
                 help="SDXL: the original_size the model is told (default: the image size)")
  p.add_argument("--crops-coords-top-left", metavar=("TOP", "LEFT"), **pair,
                 help="SDXL: the crop the model is told (default 0 0)")
  p.add_argument("--target-size", metavar=("H", "W"), **pair,
                 help="SDXL: the target_size the model is told (default: the image size)")
  p.add_argument("--negative-original-size", metavar=("H", "W"), **pair,
                 help="SDXL: the negative half's original_size, given with --negative-target-size "
                      "(default: the positive half's)")
  p.add_argument("--negative-crops-coords-top-left", metavar=("TOP", "LEFT"), **pair,
                 help="SDXL: the negative half's crop (default 0 0)")
  p.add_argument("--negative-target-size", metavar=("H", "W"), **pair,
                 help="SDXL: the negative half's target_size, given with "
                      "--negative-original-size (default: the positive half's)")


def sample_options(args, pipe, **fields):
  """SampleOptions from the sampling flags (what they leave out: the pipeline's defaults)."""
  from persona_jax.text_to_image import SampleOptions
  sdxl = {name: tuple(getattr(args, name)) for name in (
      "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
      "negative_crops_coords_top_left", "negative_target_size")
      if getattr(args, name, None) is not None}
  if sdxl and not pipe.is_sdxl:
    raise ConfigError(f"--{sorted(sdxl)[0].replace('_', '-')} is SDXL's micro-conditioning; "
                      f"{pipe.path or 'this model'} is not an SDXL model")
  return SampleOptions(steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height,
                       width=args.width, batch_size=args.batch_size, scheduler=args.scheduler,
                       **sdxl, **fields)


def _method_flags():
  from persona_jax.methods.registry import METHODS
  return {s.name: s.sampling.flag for s in METHODS.values() if s.sampling.flag}


def add_arguments(p) -> None:
  add_model_flags(p)
  p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
  p.add_argument("--negative-prompt", default=None,
                 help="negative prompt (default: none: the empty prompt, or zeros where an SDXL "
                      "folder says force_zeros_for_empty_prompt)")
  add_step_flags(p)
  p.add_argument("--guidance-rescale", type=float, default=0.0,
                 help="rescale guided noise, 0 to 1 (Lin et al.; 0.7 for zero-terminal-SNR models)")
  p.add_argument("--eta", type=float, default=0.0,
                 help="DDIM eta, 0 to 1 (0 deterministic, 1 DDPM-like)")
  add_sdxl_flags(p)
  p.add_argument("--num-images", type=int, default=1, help="images per prompt (a row of the grid)")
  add_size_flags(p)
  p.add_argument("--clip-skip", type=int, default=None,
                 help="use an earlier text-encoder layer: 1 the penultimate, ... (default: none: "
                      "the last layer)")
  p.add_argument("--run", type=Path, default=None, metavar="PATH",
                 help="a `persona-jax train` workdir of any method (or its result file): samples "
                      "with what it learned, the way its method does (its base model unless "
                      "--model); see --image and the knobs")
  from persona_jax.methods.registry import METHODS
  for spec in METHODS.values():
    if spec.sampling.flag:
      p.add_argument(spec.sampling.flag, type=Path, default=None, metavar="PATH",
                     dest=f"run_{spec.name}", help=f"--run for {spec.name}: {spec.sampling.flag_help}")
  add_knob_flags(p)
  p.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                 help="a subject image of the run (repeatable; how many a method takes: its "
                      "flag's help)")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT[:BLOCKS]]",
                 help="merge a LoRA file: ours (lora.safetensors), diffusers/PEFT or "
                      "kohya/A1111 (repeat to add several; they sum). WEIGHT scales it (default 1); "
                      "BLOCKS are per-block weights as A1111's lbw: NAME=VALUE pairs (e.g. "
                      "IN01=0,MID=0.5,OUT03=0; blocks not named: 1; BASE is the text encoder) or "
                      "the 17 or 26 numbers of the sd-webui-lora-block-weight presets (SDXL: its "
                      "12 or 20), e.g. "
                      "a.safetensors:0.8:IN01=0,BASE=0")
  p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                 help="a textual-inversion embedding (diffusers learned_embeds.safetensors, an "
                      "A1111/ComfyUI .safetensors embedding, an SDXL clip_l/clip_g embedding, a "
                      "TI workdir); TOKEN names it in prompts (default: the name in the file, or "
                      "its file name). Repeatable")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  process_flags.add_arguments(p)


def chosen_run(args):
  """(method spec, result) of `--run` or a per-method flag, (spec, None) for a --model folder a
  method owns (BLIP-Diffusion's), or (None, None). The knobs and images given are checked against
  the method first (before a per-method flag's run is read)."""
  from persona_jax.methods.registry import METHODS, find_run, pipeline_owner
  flags = _method_flags()
  given = [(name, getattr(args, f"run_{name}")) for name in flags
           if getattr(args, f"run_{name}", None) is not None]
  names = [flags[n] for n, _ in given] + (["--run"] if args.run is not None else [])
  if len(names) > 1:
    raise PersonaError(" and ".join(names) + " do not combine (one run at a time)")
  values = knob_values(args)
  if given:
    check_inputs(METHODS[given[0][0]], flags[given[0][0]], values, args.image)
    return find_run(given[0][1], given[0][0])
  if args.run is not None:
    spec, result = find_run(args.run)
    check_inputs(spec, f"--run ({spec.name})", values, args.image)
    return spec, result
  owner = pipeline_owner(args.model) if args.model is not None else None
  if owner is not None:                # a method's own pipeline folder samples through it
    check_inputs(owner, f"--model ({owner.name})", values, args.image)
    return owner, None
  if values:
    name = sorted(values)[0]
    owners = [f"a {s.name} --model" if s.pipeline else f"a run of {s.sampling.flag or s.name}"
              for s in METHODS.values() if any(k.name == name for k in s.sampling.knobs)]
    raise PersonaError(f"{_flag(name)} goes with {' or '.join(owners)}")
  if args.image:
    takers = sorted(s.sampling.flag for s in METHODS.values()
                    if s.sampling.flag and s.sampling.images != "none")
    models = sorted(s.name for s in METHODS.values()
                    if s.pipeline and s.sampling.images != "none")
    also = f" or of a {' / '.join(models)} --model" if models else ""
    raise PersonaError(f"--image is a subject image of a run (--run or {', '.join(takers)}){also}")
  return None, None


def check_inputs(spec, what: str, values: dict, images) -> None:
  """The knobs given are the method's; the number of --image is one it takes."""
  own = {k.name for k in spec.sampling.knobs}
  foreign = sorted(set(values) - own)
  if foreign:
    raise PersonaError(f"{_flag(foreign[0])} is not a knob of {spec.name} (its knobs: "
                       f"{', '.join(_flag(k) for k in sorted(own)) or 'none'})")
  count, n = spec.sampling.images, len(images)
  if count == "none" and n:
    raise PersonaError(f"{what} takes no --image")
  if count in ("one", "some") and not n:
    raise PersonaError(f"{what} needs --image PATH" + (" (repeat for several images)"
                                                        if count == "some" else ""))
  if count == "one" and n > 1:
    raise PersonaError(f"{what} reads one --image")


def run(args) -> int:
  from persona_jax.images import grid, save_png
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  from persona_jax.methods.spec import SampleRequest
  from persona_jax.default_model import resolve_model
  from persona_jax.text_to_image import Sampling, identity_prompt, text_to_image
  check_flags(args)
  loras = [LoRASpec.parse(s) for s in args.lora]
  spec, result = chosen_run(args)
  model = args.model
  if model is None and spec is not None:
    model = spec.base_model(result)
  check_against_model(args, resolve_model(model), model or "the embedded default")
  pipe = load_model(args, model)
  options = sample_options(args, pipe, guidance_rescale=args.guidance_rescale, eta=args.eta,
                           clip_skip=args.clip_skip)
  start = time.perf_counter()
  params = with_loras(pipe.params, loras, pipe.unet_config) if loras else pipe.params
  added = None
  if args.embedding:
    from persona_jax.convert.embedding_formats import (read_embedding_spec, text_widths,
                                                       with_embeddings)
    embeddings = {}
    for text in args.embedding:
      embeddings.update(read_embedding_spec(text, width=text_widths(params), sdxl=pipe.is_sdxl))
    added = with_embeddings(pipe, embeddings, params)
    pipe, params = added.pipe, added.pipe.params
  sampling = Sampling(params, added.tokenizer if added else None,
                      expand_prompt=added.expand_prompt if added else identity_prompt,
                      tokenizer_2=added.tokenizer_2 if added else None)
  if spec is not None:
    sampling = spec.sample(SampleRequest(result, pipe, params, tuple(args.image),
                                         knob_values(args), args.allow_pickle))
    if added is not None:
      if sampling.tokenizer is not None:
        raise PersonaError(f"--embedding does not combine with a {spec.name} run (both add tokens)")
      sampling = _with_embedding_tokens(sampling, added)
  images = text_to_image(pipe, args.prompt, args.negative_prompt, args.num_images, options,
                         sampling=sampling)
  seconds = time.perf_counter() - start
  from persona_jax.distributed import is_main
  if not is_main():                   # every process sampled its share; the first one writes
    return 0
  out = Path(args.out)
  paths = [save_png(img, out / f"{args.seed:04d}_{i:04d}.png") for i, img in enumerate(images)]
  paths.append(save_png(grid(images, cols=args.num_images), out / "grid.png"))  # a prompt a row
  for p in paths:
    print(p)
  print(f"{len(images)} image(s) {images.shape[2]}x{images.shape[1]} from "
        f"{pipe.path or model or 'the embedded default'} in {seconds:.1f} s (including "
        "compilation)", file=sys.stderr)
  return 0


def _with_embedding_tokens(sampling, added):
  """A run's sampling with the embeddings' tokenizer and prompt rewrite (its own first)."""
  import dataclasses
  expand = sampling.expand_prompt
  return dataclasses.replace(sampling, tokenizer=added.tokenizer, tokenizer_2=added.tokenizer_2,
                             expand_prompt=lambda p: added.expand_prompt(expand(p)))
