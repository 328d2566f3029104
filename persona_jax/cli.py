"""The `persona-jax` console script: thin subcommands over library functions.

Each subcommand parses its flags and calls one function that tests call too. A `PersonaError`
(bad input) is printed as one line without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persona_jax.errors import ConfigError, PersonaError
from persona_jax.runtime import reexec_with_malloc_tunable, setup_logging


def _make_random_model(args) -> int:
  from persona_jax.pipeline import load_pipeline
  from persona_jax.random_model import make_random_model
  out = make_random_model(args.out, args.preset, args.seed, overwrite=args.overwrite)
  pipe = load_pipeline(out)
  print(describe(pipe))
  return 0


def describe(pipe) -> str:
  """A short report of a pipeline's components: class, size, key config values."""
  counts = pipe.num_params()
  u, t, v, s = pipe.unet_config, pipe.text_encoder_config, pipe.vae_config, pipe.scheduler_config
  lines = [
      f"model {pipe.path}",
      f"  unet          UNet2DConditionModel  {counts['unet']:>11,d} params  "
      f"blocks {list(u.block_out_channels)}, heads {list(u.heads_per_block)}, "
      f"cross_attention_dim {u.cross_attention_dims[0]}, "
      f"{'linear' if u.use_linear_projection else 'conv'} proj",
      f"  text_encoder  CLIPTextModel         {counts['text_encoder']:>11,d} params  "
      f"{t.num_hidden_layers} layers x {t.hidden_size}, {t.hidden_act}, vocab {t.vocab_size}",
      f"  vae           AutoencoderKL         {counts['vae']:>11,d} params  "
      f"blocks {list(v.block_out_channels)}, {v.latent_channels} latent channels, "
      f"downsample x{v.downsample_factor}, scaling_factor {v.scaling_factor}",
      f"  scheduler     {s.class_name:22s}  {s.beta_schedule}, {s.prediction_type}, "
      f"{s.num_train_timesteps} steps, spacing {s.timestep_spacing}",
      f"  tokenizer     CLIPTokenizer         {len(pipe.tokenizer):>11,d} tokens  "
      f"pad id {pipe.tokenizer.pad_token_id}",
  ]
  return "\n".join(lines)


def _sample(args) -> int:
  import time

  from persona_jax.default_model import resolve_model
  from persona_jax.images import grid, save_png
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  from persona_jax.pipeline import load_pipeline
  from persona_jax.text_to_image import SampleOptions, sampling_kwargs, text_to_image
  loras = [LoRASpec.parse(s) for s in args.lora]
  image_method, result = _image_method(args)
  model = resolve_model(args.model)
  pipe = load_pipeline(model, variant=args.variant, allow_pickle=args.allow_pickle,
                       **_single_file_options(args))
  options = SampleOptions(steps=args.steps, guidance=args.guidance,
                          guidance_rescale=args.guidance_rescale, eta=args.eta, seed=args.seed,
                          height=args.height, width=args.width, batch_size=args.batch_size,
                          clip_skip=args.clip_skip)
  start = time.perf_counter()
  tokenizer = conditioning = expand = None
  if args.embedding:
    if args.custom_diffusion is not None:
      raise PersonaError("--embedding does not combine with --custom-diffusion (both add tokens)")
    from persona_jax.convert.embedding_formats import read_embedding_spec, with_embeddings
    embeddings = {}
    for spec in args.embedding:
      embeddings.update(read_embedding_spec(spec, width=pipe.text_encoder_config.hidden_size))
    added = with_embeddings(pipe, embeddings)
    pipe, tokenizer, expand = added.pipe, added.tokenizer, added.expand_prompt
  params = with_loras(pipe.params, loras, pipe.unet_config) if loras else None
  if args.custom_diffusion is not None:
    from persona_jax.methods import custom_diffusion as cd
    if args.clip_skip is not None:
      raise PersonaError("--clip-skip does not combine with --custom-diffusion")
    params, tokenizer, conditioning = cd.for_sampling(cd.load_result(args.custom_diffusion), pipe,
                                                      params)
  sampling = dict(params=params, tokenizer=tokenizer, conditioning=conditioning,
                  expand_prompt=expand)
  prompts = args.prompt
  if image_method is not None:        # alone (_image_method refused the other flags)
    sampling = sampling_kwargs(_image_method_sampling(image_method, result, pipe, args))
    if image_method == "fastcomposer":
      from persona_jax.methods import fastcomposer
      prompts = fastcomposer.sampling_prompts(prompts, args.image or [])
  images = text_to_image(pipe, prompts, args.negative_prompt, args.num_images, options, **sampling)
  seconds = time.perf_counter() - start
  out = Path(args.out)
  paths = [save_png(img, out / f"{args.seed:04d}_{i:04d}.png") for i, img in enumerate(images)]
  paths.append(save_png(grid(images), out / "grid.png"))
  for p in paths:
    print(p)
  print(f"{len(images)} image(s) {images.shape[2]}x{images.shape[1]} from {model} in {seconds:.1f} s "
        "(including compilation)", file=sys.stderr)
  return 0


def _image_method_sampling(name: str, result, pipe, args):
  """The `for_sampling` result of an image-conditioned method's flags (methods' ForSampling)."""
  if name == "e4t":
    from persona_jax.methods import e4t
    return e4t.for_sampling(result, pipe, args.image[0])
  if name == "instantbooth":
    from persona_jax.methods import instantbooth
    return instantbooth.for_sampling(result, pipe, args.image, args.beta, args.alpha,
                                     prompts=args.prompt)
  if name == "ip_adapter":
    from persona_jax.methods import ip_adapter
    return ip_adapter.load_for_sampling(
        args.ip_adapter, pipe, args.image, image_encoder=args.image_encoder,
        scale=1.0 if args.ip_scale is None else args.ip_scale, allow_pickle=args.allow_pickle)
  from persona_jax.methods import fastcomposer
  return fastcomposer.for_sampling(result, pipe, args.image or [], args.start_merge_step)


# The image-conditioned sampling flags: (flag, its knobs (attribute names), how many --image it
# takes: "one", "some" (at least one) or "any").
IMAGE_METHODS = {
    "e4t": ("--e4t", (), "one"),
    "instantbooth": ("--instantbooth", ("beta", "alpha"), "some"),
    "ip_adapter": ("--ip-adapter", ("ip_scale", "image_encoder"), "some"),
    "fastcomposer": ("--fastcomposer", ("start_merge_step",), "any"),
}


def _image_method(args):
  """Checks the image-conditioned flags of `sample` and returns (method name, its result or None
  for IP-Adapter files) or (None, None); the base model defaults to the one the result records."""
  chosen = [name for name in IMAGE_METHODS if getattr(args, name) is not None]
  for name, (flag, knobs, _) in IMAGE_METHODS.items():
    given = [k for k in knobs if getattr(args, k) is not None]
    if given and name not in chosen:
      raise PersonaError(f"{' and '.join('--' + k.replace('_', '-') for k in given)} go with {flag}")
  if len(chosen) > 1:
    raise PersonaError(" and ".join(IMAGE_METHODS[n][0] for n in chosen) + " do not combine")
  if not chosen:
    if args.image:
      raise PersonaError("--image is the subject image of "
                         + ", ".join(flag for flag, _, _ in IMAGE_METHODS.values()))
    return None, None
  name = chosen[0]
  flag, _, images = IMAGE_METHODS[name]
  if images != "any" and not args.image:
    raise PersonaError(f"{flag} needs --image PATH" + (" (repeat for several images)" if images == "some" else ""))
  if images == "one" and len(args.image) > 1:
    raise PersonaError(f"{flag} reads one --image")
  if args.embedding or args.lora or args.custom_diffusion is not None or args.clip_skip is not None:
    raise PersonaError(f"{flag} does not combine with --embedding, --lora, --custom-diffusion or "
                       "--clip-skip")
  import importlib
  module = importlib.import_module(f"persona_jax.methods.{name}")
  if name == "ip_adapter":
    result, meta = None, module.file_metadata(args.ip_adapter)
  else:
    result = module.load_result(getattr(args, name))
    meta = result.meta
  if args.model is None:
    args.model = meta.get("base_model") or None
  return name, result


def _single_file_options(args) -> dict:
  """load_pipeline's options for an original single-file checkpoint (only those given)."""
  return {k: v for k, v in (("config_dir", args.config), ("prediction_type", args.prediction_type))
          if v is not None}


def _add_single_file_flags(p) -> None:
  p.add_argument("--config", type=Path, default=None, metavar="DIR",
                 help="with a single-file --model (.safetensors): a diffusers folder of the same "
                      "family giving what the file does not say (head counts, scheduler)")
  p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                 help="with a single-file --model and no --config: the model's prediction type "
                      "(standard SD 1.x/2.x widths are then inferred from the weights)")


def _import_fastcomposer(args) -> int:
  from persona_jax.default_model import resolve_model
  from persona_jax.methods.fastcomposer_official import import_official
  path = import_official(args.checkpoint, resolve_model(args.model), args.image_encoder, args.out,
                         allow_pickle=args.allow_pickle)
  print(path)
  return 0


def _make_class_images(args) -> int:
  from persona_jax.class_images import make_class_images
  from persona_jax.default_model import resolve_model
  from persona_jax.pipeline import load_pipeline
  from persona_jax.text_to_image import SampleOptions
  model = resolve_model(args.model)
  pipe = load_pipeline(model, variant=args.variant, allow_pickle=args.allow_pickle,
                       **_single_file_options(args))
  options = SampleOptions(steps=args.steps, guidance=args.guidance, seed=args.seed,
                          height=args.height, width=args.width, batch_size=args.batch_size)
  written = make_class_images(pipe, args.prompt, args.num, args.out, options=options,
                              negative_prompt=args.negative_prompt)
  print(f"{args.out}: {len(written)} new class image(s), {args.num} wanted", file=sys.stderr)
  return 0


def _merge(args) -> int:
  from persona_jax.methods.custom_diffusion_merge import merge_runs
  captions = None
  if args.reg_captions is not None:
    if not args.reg_captions.is_file():
      raise PersonaError(f"{args.reg_captions}: no such captions file (one caption per line)")
    captions = [l.strip() for l in args.reg_captions.read_text().splitlines() if l.strip()]
  summary = merge_runs(args.runs, args.out, model=args.model, reg_captions=captions)
  for c in summary["concepts"]:
    print(f"  {c['token']:<10} {c['prompt']!r}  from {c['source']}")
  print(f"{summary['layers']} key/value matrices merged; largest relative constraint error "
        f"{summary['max_constraint_error']:.1e}")
  print(summary["path"])
  return 0


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated integers, e.g. 2,2,1")


def _make_toy_model(args) -> int:
  from persona_jax.world.toy_model import VAETraining, build_base, pretrain
  vae = VAETraining(steps=args.vae_steps)
  if args.stop_after_init:
    print(build_base(args.workdir, num_images=args.images, vae=vae, start_from=args.start_from,
                     grow_layers=args.grow_layers))
    return 0
  result = pretrain(args.workdir, num_images=args.images, vae=vae, unet_steps=args.unet_steps,
                    batch_size=args.batch_size, start_from=args.start_from,
                    grow_layers=args.grow_layers, lr=args.lr)
  for path in result["outputs"] + ([result["samples"]] if result["samples"] else []):
    print(path)
  return 0


def _plot(args) -> int:
  from persona_jax.plots import loss_curve
  print(loss_curve(args.workdir, args.out, keys=tuple(args.keys), window=args.window,
                   log_y=not args.linear))
  return 0


def _export(args) -> int:
  from persona_jax.export import export
  for path in export(args.workdir, args.format, args.out, base_single_file=args.base_single_file,
                     timestep=args.timestep):
    print(path)
  return 0


def _eval(args) -> int:
  import json

  from persona_jax.world.efficacy import TABLE_HEADER, EvalConfig, evaluate, table_row
  if args.prompt_following is not None:
    from persona_jax.world import metric_encoder
    from persona_jax.world.prompt_following import prompt_following
    metric = metric_encoder.load(args.metric) if args.metric else None
    result = prompt_following(args.model or "default", args.prompt_following,
                              args.seed if args.seed is not None else 1, metric=metric,
                              sample_steps=args.sample_steps or 25,
                              guidance=args.guidance if args.guidance is not None else 4.0,
                              progress=not args.noprogress, out=args.out)
    print(json.dumps(result, indent=2))
    return 0
  if args.method is None:
    raise ConfigError("eval: give --method NAME (or --prompt-following N)")
  fields = ("method", "model", "subjects", "seeds", "references", "contexts", "steps", "lr",
            "batch_size", "class_images", "sample_steps", "guidance", "seed", "metric",
            "subject_class", "state", "ip_scale", "beta", "alpha")
  cfg = EvalConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
  summary = evaluate(cfg, args.out, progress=not args.noprogress)
  print(TABLE_HEADER)
  print(table_row(summary))
  print(f"{args.out / 'eval.json'} (per-subject rows), samples in {args.out / 'samples'}",
        file=sys.stderr)
  return 0


def _verify(args) -> int:
  from persona_jax.verify import verify
  if args.ip_adapter is not None:
    if args.lora or args.embedding or args.custom_diffusion is not None:
      raise PersonaError("verify compares one adapter at a time")
    from persona_jax.verify_ip_adapter import verify_ip_adapter
    ok = verify_ip_adapter(args.model, args.ip_adapter, image_encoder=args.image_encoder,
                           tolerance=args.tolerance, allow_pickle=args.allow_pickle, seed=args.seed)
    return 0 if ok else 1
  ok = verify(args.model, tolerance=args.tolerance, variant=args.variant,
              allow_pickle=args.allow_pickle, seed=args.seed, image_encoder=args.image_encoder,
              lora=args.lora, embedding=args.embedding, custom_diffusion=args.custom_diffusion)
  return 0 if ok else 1


def _bench(args) -> int:
  import json

  from persona_jax.benchmark import DEFAULT_CASES

  from persona_jax.benchmark import ADAPTER_CASES, DB_VARIANTS, bench, memory_plan
  if args.memory_plan:
    plannable = DB_VARIANTS + ADAPTER_CASES
    cases = ([c for c in args.cases if c in plannable] if args.cases != list(DEFAULT_CASES)
             else plannable)
    result = memory_plan(args.preset, cases, batch_size=args.memory_plan_batch)
    if args.json:
      args.json.parent.mkdir(parents=True, exist_ok=True)
      args.json.write_text(json.dumps(result, indent=2))
    return 0
  result = bench(preset=args.preset, cases=args.cases, frameworks=args.frameworks,
                 reps=args.reps, iters=args.iters, dtype=args.dtype, device_note=args.device,
                 malloc_tunable=not args.no_malloc_tunable)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="persona-jax", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  sub.add_parser("train", help="train a method: --config NAME[:tiny] --workdir DIR [--config.a.b=v]",
                 add_help=False)

  p = sub.add_parser("make-random-model", help="write a small random-weight pipeline (diffusers layout)")
  p.add_argument("out", type=Path, help="output folder")
  p.add_argument("--preset", choices=("sd1", "sd2"), default="sd1",
                 help="sd1: conv projections, epsilon; sd2: linear projections, per-block heads, "
                      "v-prediction")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
  p.set_defaults(func=_make_random_model)

  p = sub.add_parser("sample", help="text-to-image with DDIM: one PNG per image and a grid")
  p.add_argument("--model", default=None,
                 help="a diffusers folder or an original single-file .safetensors (default: the "
                      "embedded default model)")
  _add_single_file_flags(p)
  p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
  p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
  p.add_argument("--guidance-rescale", type=float, default=0.0,
                 help="rescale guided noise (Lin et al.; 0.7 for zero-terminal-SNR models)")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
  p.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch")
  p.add_argument("--clip-skip", type=int, default=None, help="use an earlier text-encoder layer")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT[:BLOCKS]]",
                 help="merge a LoRA file: ours (lora.safetensors), diffusers/PEFT or "
                      "kohya/A1111 (repeat to add several; they sum). WEIGHT scales it (default 1); BLOCKS are per-block weights as "
                      "A1111's lbw: NAME=VALUE pairs (e.g. IN01=0,MID=0.5,OUT03=0; blocks not "
                      "named: 1; BASE is the text encoder) or the 17 or 26 numbers of the "
                      "sd-webui-lora-block-weight presets, e.g. a.safetensors:0.8:IN01=0,BASE=0")
  p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                 help="a textual-inversion embedding (diffusers learned_embeds.safetensors, an "
                      "A1111/ComfyUI .safetensors embedding, a TI workdir); TOKEN names it in "
                      "prompts (default: the name in the file, or its file name). Repeatable")
  p.add_argument("--custom-diffusion", type=Path, default=None, metavar="DIR",
                 help="a custom_diffusion run's workdir or a merged folder: its K/V weights and "
                      "modifier tokens (use them in the prompt, e.g. 'photo of a <new1> cat')")
  p.add_argument("--e4t", type=Path, default=None, metavar="DIR",
                 help="an e4t run's workdir: its encoder, weight offsets (and tuned UNet); the "
                      "placeholder's embedding is predicted from --image at every step (e.g. "
                      "--prompt 'a painting of *s'; default --model: the run's base)")
  p.add_argument("--instantbooth", type=Path, default=None, metavar="DIR",
                 help="an instantbooth run's workdir: its concept and patch encoders and adapters "
                      "read the subject from --image (repeat for several: the concept token is "
                      "their average); put the identifier before the class noun, e.g. --prompt "
                      "'a photo of sks ball on the beach'. A mask NAME.mask.png beside an image "
                      "masks it to the subject")
  p.add_argument("--beta", type=float, default=None,
                 help="instantbooth: the adapters' weight (default: the run's, 0.3)")
  p.add_argument("--alpha", type=float, default=None,
                 help="instantbooth: the concept token's scale (default: the run's, 0.4)")
  p.add_argument("--fastcomposer", type=Path, default=None, metavar="DIR",
                 help="a fastcomposer run's workdir: mark each subject's noun with <|image|> "
                      "and give one --image per marker, in order, e.g. --prompt 'a ball <|image|> "
                      "next to a box <|image|> on grass' --image ball.png --image box.png; "
                      "without --image the prompt is sampled as plain text (markers removed)")
  p.add_argument("--start-merge-step", type=int, default=None,
                 help="fastcomposer: the steps before it use the plain prompt (default: the run's)")
  p.add_argument("--ip-adapter", type=Path, default=None, metavar="FILE",
                 help="an IP-Adapter file (official layout: ip-adapter_sd15.safetensors, a "
                      "pickled .bin with --allow-pickle, or an ip_adapter run's result): the "
                      "image prompt is --image (repeat for several: their tokens are concatenated)")
  p.add_argument("--ip-scale", type=float, default=None,
                 help="ip-adapter: the image branch's weight (default 1; 0.5 to let the text lead)")
  p.add_argument("--image-encoder", type=Path, default=None, metavar="DIR",
                 help="ip-adapter: the CLIP image encoder folder (default: the one our result "
                      "records, else MODEL/image_encoder)")
  p.add_argument("--image", type=Path, action="append", default=None, metavar="PATH",
                 help="the subject image for --e4t (one), --instantbooth or --fastcomposer "
                      "(repeatable), the image prompt of --ip-adapter")
  p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
  p.add_argument("--allow-pickle", action="store_true", help="read .bin/.ckpt files (trusted only)")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.set_defaults(func=_sample)

  p = sub.add_parser("import-fastcomposer",
                     help="the official FastComposer release (pytorch_model.bin) as a result "
                          "`sample --fastcomposer OUT` reads")
  p.add_argument("checkpoint", type=Path, help="the release's pytorch_model.bin (or .safetensors)")
  p.add_argument("--model", required=True,
                 help="the base model it was trained from (a Stable Diffusion 1.5 diffusers folder)")
  p.add_argument("--image-encoder", required=True, type=Path, metavar="DIR",
                 help="the CLIP image encoder it was trained from: a CLIPVisionModelWithProjection "
                      "folder of openai/clip-vit-large-patch14")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.add_argument("--allow-pickle", action="store_true", help="read a .bin file (trusted only)")
  p.set_defaults(func=_import_fastcomposer)

  p = sub.add_parser("make-class-images",
                     help="sample class images for prior preservation (resumable: tops up OUT)")
  p.add_argument("--model", default=None,
                 help="a diffusers folder or an original single-file .safetensors (default: the "
                      "embedded default model)")
  _add_single_file_flags(p)
  p.add_argument("--prompt", required=True, help='the class prompt, e.g. "a photo of a dog"')
  p.add_argument("--num", type=int, required=True, help="how many images OUT should hold")
  p.add_argument("--negative-prompt", default="")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch")
  p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
  p.add_argument("--allow-pickle", action="store_true", help="read .bin/.ckpt files (trusted only)")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.set_defaults(func=_make_class_images)

  from persona_jax.benchmark import CASES, DEFAULT_CASES, FRAMEWORKS, PRESETS
  p = sub.add_parser("bench", help="speed and memory against diffusers PyTorch (separate processes)")
  p.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                 help="reduced: SD 1.5 architecture at reduced width, 32x32 latents (CPU); "
                      "sd15: the real SD 1.5 UNet, 64x64 latents (GPU/TPU)")
  p.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES),
                 help="default: %(default)s; the DreamBooth memory options: db_train_bf16 "
                      "db_train_remat db_train_accum2")
  p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
  p.add_argument("--reps", type=int, default=3, help="alternating repetitions per framework")
  p.add_argument("--iters", type=int, default=5, help="timed calls per repetition")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", default="", help="a note on what ran where, recorded in the report")
  p.add_argument("--no-malloc-tunable", action="store_true",
                 help="do not set GLIBC_TUNABLES (the malloc tunable) for the workers")
  p.add_argument("--json", type=Path, default=None, help="also write the full results here")
  p.add_argument("--memory-plan", action="store_true",
                 help="only compile the DreamBooth step per memory option, and the LoRA and Custom "
                      "Diffusion steps, from shapes (no weights) and print XLA's buffer plans; "
                      "works for --preset sd15 on a laptop")
  p.add_argument("--memory-plan-batch", type=int, default=2,
                 help="rows per step for --memory-plan (instance + class)")
  p.set_defaults(func=_bench)

  p = sub.add_parser("merge", help="combine Custom Diffusion runs in closed form (Kumari et al. 2023)")
  p.add_argument("runs", nargs="+", type=Path,
                 help="workdirs of custom_diffusion runs (freeze_model=crossattn_kv), or merged folders")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.add_argument("--model", default=None,
                 help="the base model (default: the one the runs were trained on)")
  p.add_argument("--reg-captions", type=Path, default=None,
                 help="regularization captions, one per line (default: 200 generic captions "
                      "shipped with persona_jax; the paper uses 200 LAION captions)")
  p.set_defaults(func=_merge)

  p = sub.add_parser("make-toy-model",
                     help="pre-train the toy-world base model from scratch (resumable; hours on CPU)")
  p.add_argument("--workdir", required=True, type=Path,
                 help="stages go to WORKDIR/{world,vae,init,unet}; the same command resumes")
  p.add_argument("--images", type=int, default=20000, help="rendered training scenes")
  p.add_argument("--vae-steps", type=int, default=3000)
  p.add_argument("--unet-steps", type=int, default=None, help="default: configs/toy_pretrain.py's")
  p.add_argument("--batch-size", type=int, default=None, help="default: configs/toy_pretrain.py's")
  p.add_argument("--stop-after-init", action="store_true",
                 help="only the scene folder, the VAE and the initial pipeline")
  p.add_argument("--start-from", type=Path, default=None, metavar="MODEL",
                 help="continue pre-training from a toy pipeline folder (an earlier sitting's "
                      "snapshot, or persona_jax/assets/toy_base) instead of a fresh VAE and UNet")
  p.add_argument("--grow-layers", type=_int_list, default=None, metavar="N,N,N",
                 help="with --start-from: deepen the UNet to these layers per block first "
                      "(new layers start as the identity, so it computes the same function)")
  p.add_argument("--lr", type=float, default=None, help="default: configs/toy_pretrain.py's")
  p.set_defaults(func=_make_toy_model)

  p = sub.add_parser("plot", help="draw a run's loss curve (WORKDIR/metrics.jsonl -> loss.png)")
  p.add_argument("workdir", type=Path, help="a `persona-jax train` workdir")
  p.add_argument("--out", type=Path, default=None, help="default: WORKDIR/loss.png")
  p.add_argument("--keys", nargs="+", default=["loss"], help="metrics to draw (e.g. loss lr)")
  p.add_argument("--window", type=int, default=20, help="moving-average window, in log records")
  p.add_argument("--linear", action="store_true", help="a linear y axis (default: log)")
  p.set_defaults(func=_plot)

  p = sub.add_parser("export", help="write a run's result for diffusers, kohya, AUTOMATIC1111, "
                     "ComfyUI")
  from persona_jax.export import ALL_FORMATS
  p.add_argument("workdir", type=Path, help="a `persona-jax train` workdir")
  p.add_argument("--format", required=True, choices=ALL_FORMATS,
                 help="diffusers | kohya | a1111 (which fit depends on the method)")
  p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
  p.add_argument("--base-single-file", type=Path, default=None, metavar="FILE",
                 help="single-file export of an SD 2.x run: the base's own single file (its "
                      "extra text-encoder layer is carried over; default: the run's base if it "
                      "is a single file)")
  p.add_argument("--timestep", type=int, default=None,
                 help="e4t: the timestep of the exported embedding (default 500)")
  p.set_defaults(func=_export)

  p = sub.add_parser("eval", help="the toy-world efficacy benchmark of a method: subject fidelity, "
                     "prompt fidelity, drift")
  from persona_jax.world.efficacy import METHODS
  p.add_argument("--method", choices=METHODS, help="the method to evaluate")
  p.add_argument("--prompt-following", type=int, default=None, metavar="N",
                 help="instead: how well the model follows N held-out full captions (class, "
                      "colour, pattern, background accuracy by the metric encoder)")
  p.add_argument("--out", required=True, type=Path, help="folder for eval.json, samples, runs")
  p.add_argument("--model", default=None, help="base model folder (default: the embedded default)")
  p.add_argument("--subjects", type=int, default=None, help="held-out subjects (default 2)")
  p.add_argument("--seeds", type=int, default=None, help="images per prompt (default 4)")
  p.add_argument("--references", type=int, default=None, help="reference images per subject (4)")
  p.add_argument("--contexts", type=int, default=None, help="new backgrounds per subject (2)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: per method)")
  p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--class-images", type=int, default=None, help="prior images per class (16)")
  p.add_argument("--sample-steps", type=int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--metric", default=None, help="metric encoder folder (default: the shipped one)")
  p.add_argument("--subject-class", default=None, help="held-out subjects of this class only "
                 "(e4t's shipped state knows balls: --subject-class ball)")
  p.add_argument("--state", default=None, help="e4t: the pre-trained state (an e4t_pretrain "
                 "workdir; default: the shipped one); instantbooth, ip_adapter, fastcomposer: "
                 "the run trained once on the world")
  p.add_argument("--ip-scale", type=float, default=None, help="ip_adapter: the image scale (1.0)")
  p.add_argument("--beta", type=float, default=None,
                 help="instantbooth: the adapters' weight (default: the run's, 0.3)")
  p.add_argument("--alpha", type=float, default=None,
                 help="instantbooth: the concept token's scale (default: the run's, 0.4)")
  p.add_argument("--noprogress", action="store_true")
  p.set_defaults(func=_eval)

  p = sub.add_parser("verify", help="compare persona_jax with diffusers/transformers on a model folder")
  p.add_argument("model", type=Path, help="a diffusers folder (model_index.json, unet/, ...)")
  from persona_jax.verify import DEFAULT_TOLERANCE
  p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                 help="largest allowed relative error (default %(default)s)")
  p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
  p.add_argument("--allow-pickle", action="store_true",
                 help="read .bin/.ckpt pickle files (only files you trust)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lora", default=None, metavar="FILE",
                 help="compare one LoRA file (ours, diffusers/PEFT, kohya) loaded by diffusers "
                      "and by persona_jax")
  p.add_argument("--embedding", default=None, metavar="FILE[:TOKEN]",
                 help="compare one textual-inversion embedding (diffusers, A1111)")
  p.add_argument("--custom-diffusion", type=Path, default=None, metavar="DIR",
                 help="compare a Custom Diffusion result (run folder or merged folder)")
  p.add_argument("--image-encoder", type=Path, default=None, metavar="DIR",
                 help="also compare a CLIP image encoder folder (CLIPVisionModel[WithProjection], "
                      "preprocessing included; default: MODEL/image_encoder when it exists)")
  p.add_argument("--ip-adapter", type=Path, default=None, metavar="FILE",
                 help="compare one IP-Adapter file (official layout) loaded by diffusers' "
                      "load_ip_adapter and by persona_jax, with the --image-encoder")
  p.set_defaults(func=_verify)
  return parser


def _train(argv) -> int:
  """`persona-jax train --config NAME[:variant] --workdir DIR [--config.a.b=value ...]`."""
  from absl import flags
  from ml_collections import config_flags

  from persona_jax.train.config import config_path, run_config
  from persona_jax.train.loop import train
  # ml_collections finds the --config.a.b overrides in `sys_argv`, spelled `--config=PATH`.
  args = []
  for a in argv:
    if args and args[-1] == "--config":
      args[-1] = f"--config={config_path(a)}"
    elif a.startswith("--config="):
      args.append(f"--config={config_path(a.split('=', 1)[1])}")
    else:
      args.append(a)
  argv = args
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config: configs/NAME.py[:variant] "
                                  "or NAME[:variant]", flag_values=fv, lock_config=True,
                                  sys_argv=["persona-jax train", *argv])
  flags.DEFINE_string("workdir", None, "run folder (created; an existing run resumes)", flag_values=fv)
  flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
  if "--help" in argv or "-h" in argv:
    print("usage: persona-jax train --config NAME[:variant] --workdir DIR [--config.a.b=VALUE ...] "
          "[--noprogress]\n(NAME: a file of configs/, e.g. dreambooth:tiny; every field of the "
          "config can be overridden)")
    print(fv.module_help(__name__).strip())
    return 0
  try:
    fv(["persona-jax train", *argv])
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    message = " ".join(str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", " ").split())
    if len(message) > 1 and message[0] == message[-1] == "'":
      message = message[1:-1]
    print(f"persona-jax train: error: unknown or invalid config key: {message}", file=sys.stderr)
    return 2
  if fv.config is None or fv.workdir is None:
    print("persona-jax train: error: --config and --workdir are required", file=sys.stderr)
    return 2
  result = train(run_config(fv.config), fv.workdir, progress=fv.progress)
  for path in result["outputs"] + ([result["samples"]] if result["samples"] else []):
    print(path)
  return 0


def main(argv=None) -> int:
  if argv is None:
    reexec_with_malloc_tunable()
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "train":
    setup_logging(verbose=False)
    try:
      return _train(argv[1:])
    except PersonaError as e:
      print(f"persona-jax train: error: {e}", file=sys.stderr)
      return 2
  args = build_parser().parse_args(argv)
  setup_logging(args.verbose)
  try:
    return args.func(args)
  except PersonaError as e:
    print(f"persona-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
