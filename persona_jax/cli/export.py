"""`persona-jax export WORKDIR --format FORMAT --out DIR`: a run's result for other tools."""

from __future__ import annotations

from pathlib import Path

NAME = "export"
HELP = "write a run's result for diffusers, kohya, AUTOMATIC1111, ComfyUI"


def add_arguments(p) -> None:
  from persona_jax.export import ALL_FORMATS
  p.add_argument("workdir", type=Path, help="a `persona-jax train` workdir")
  p.add_argument("--format", required=True, choices=ALL_FORMATS,
                 help="which fit depends on the method (a wrong one lists those that do)")
  p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
  p.add_argument("--base-single-file", type=Path, default=None, metavar="FILE",
                 help="single-file export of an SD 2.x run: the base's own single file (its "
                      "extra text-encoder layer is carried over; default: the run's base if it "
                      "is a single file)")
  p.add_argument("--timestep", type=int, default=None,
                 help="e4t: the timestep of the exported embedding (default 500)")


def run(args) -> int:
  from persona_jax.export import export
  for path in export(args.workdir, args.format, args.out, base_single_file=args.base_single_file,
                     timestep=args.timestep):
    print(path)
  return 0
