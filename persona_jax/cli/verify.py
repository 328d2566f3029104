"""`persona-jax verify MODEL_DIR`: persona_jax against diffusers/transformers on a model folder
(a folder a method owns, e.g. BLIP-Diffusion's, by that method's comparisons), or one method's
files (`--lora`, `--embedding`, `--custom-diffusion`, `--ip-adapter`: the flags
of the methods' verify hooks)."""

from __future__ import annotations

from pathlib import Path

from persona_jax.cli.sample import SCHEDULERS
from persona_jax.errors import PersonaError

NAME = "verify"
HELP = "compare persona_jax with diffusers/transformers on a model folder"


def _hooks():
  from persona_jax.methods.registry import METHODS
  return [s.verify for s in METHODS.values() if s.verify is not None]


def _dest(flag: str) -> str:
  return "adapter_" + flag.lstrip("-").replace("-", "_")


def add_arguments(p) -> None:
  from persona_jax.verify import DEFAULT_TOLERANCE
  p.add_argument("model", help="a diffusers folder (model_index.json, unet/, ...), a single "
                 "file, or an embedded model: default, toy-xl")
  p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                 help="largest allowed relative error (default %(default)s)")
  p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
  p.add_argument("--allow-pickle", action="store_true",
                 help="read .bin/.ckpt pickle files (only files you trust)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scheduler", default=None, choices=SCHEDULERS,
                 help="the sampler of the sampling comparison (default: the folder's scheduler's; "
                      "Euler ancestral compares as Euler, its noise being diffusers' own)")
  p.add_argument("--image-encoder", type=Path, default=None, metavar="DIR",
                 help="also compare a CLIP image encoder folder (CLIPVisionModel[WithProjection], "
                      "preprocessing included; default: MODEL/image_encoder when it exists)")
  p.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                 help="an image an adapter's comparison uses (repeatable; e.g. --photomaker's "
                      "ID images)")
  for hook in _hooks():
    p.add_argument(hook.flag, default=None, metavar=hook.metavar, dest=_dest(hook.flag),
                   help=hook.help)


def run(args) -> int:
  from persona_jax.default_model import resolve_model
  from persona_jax.methods.registry import pipeline_owner
  from persona_jax.verify import verify
  given = [(hook, getattr(args, _dest(hook.flag))) for hook in _hooks()
           if getattr(args, _dest(hook.flag)) is not None]
  if len(given) > 1:
    raise PersonaError("verify compares one adapter at a time (" +
                       ", ".join(hook.flag for hook, _ in given) + ")")
  if args.image and not (given and given[0][0].images):
    takers = [hook.flag for hook in _hooks() if hook.images]
    raise PersonaError(f"--image goes with {' or '.join(takers)}")
  model = resolve_model(args.model)
  owner = pipeline_owner(model)
  if owner is not None and owner.pipeline.verify is None:
    raise PersonaError(f"{model}: verify cannot compare a {owner.name} folder yet")
  ok = verify(model, tolerance=args.tolerance, variant=args.variant,
              allow_pickle=args.allow_pickle, seed=args.seed, image_encoder=args.image_encoder,
              adapter=given[0] if given else None, sampler=args.scheduler,
              images=tuple(args.image), folder=owner.pipeline if owner else None)
  return 0 if ok else 1
