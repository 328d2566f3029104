"""`persona-jax make-class-images`: class images for prior preservation (resumable)."""

from __future__ import annotations

import sys
from pathlib import Path

from persona_jax.cli.model_flags import add_model_flags, load_model
from persona_jax.cli.sample import add_sdxl_flags, add_size_flags, add_step_flags, sample_options
from persona_jax.cli.sampling_checks import check_against_model, check_flags
from persona_jax.cli import process_flags

NAME = "make-class-images"
HELP = "sample class images for prior preservation (resumable: tops up OUT)"


def add_arguments(p) -> None:
  add_model_flags(p)
  p.add_argument("--prompt", required=True, help='the class prompt, e.g. "a photo of a dog"')
  p.add_argument("--num", type=int, required=True, help="how many images OUT should hold")
  p.add_argument("--negative-prompt", default=None,
                 help="default: none (the empty prompt, or zeros where an SDXL folder says "
                      "force_zeros_for_empty_prompt)")
  add_step_flags(p)
  add_size_flags(p)
  add_sdxl_flags(p)
  p.add_argument("--out", required=True, type=Path, help="output folder")
  process_flags.add_arguments(p)


def run(args) -> int:
  from persona_jax.class_images import make_class_images
  from persona_jax.default_model import resolve_model
  from persona_jax.distributed import is_main
  check_flags(args)
  check_against_model(args, resolve_model(args.model), args.model or "the embedded default")
  pipe = load_model(args)
  options = sample_options(args, pipe)
  written = make_class_images(pipe, args.prompt, args.num, args.out, options=options,
                              negative_prompt=args.negative_prompt)
  if is_main():
    print(f"{args.out}: {len(written)} new class image(s), {args.num} wanted", file=sys.stderr)
  return 0
