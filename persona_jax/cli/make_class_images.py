"""`persona-jax make-class-images`: class images for prior preservation (resumable)."""

from __future__ import annotations

import sys
from pathlib import Path

from persona_jax.cli.model_flags import add_model_flags, load_model
from persona_jax.cli.sample import add_scheduler_flags, add_sdxl_flags, sample_options
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
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale (default 7.5; SDXL 5.0, as diffusers)")
  add_scheduler_flags(p)
  p.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch")
  add_sdxl_flags(p)
  p.add_argument("--out", required=True, type=Path, help="output folder")
  process_flags.add_arguments(p)


def run(args) -> int:
  from persona_jax.class_images import make_class_images
  from persona_jax.distributed import is_main
  pipe = load_model(args)
  options = sample_options(args, pipe)
  written = make_class_images(pipe, args.prompt, args.num, args.out, options=options,
                              negative_prompt=args.negative_prompt)
  if is_main():
    print(f"{args.out}: {len(written)} new class image(s), {args.num} wanted", file=sys.stderr)
  return 0
