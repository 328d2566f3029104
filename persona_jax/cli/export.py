"""`persona-jax export WORKDIR --format FORMAT --out DIR`: a run's result for other tools."""

from __future__ import annotations

from pathlib import Path

NAME = "export"
HELP = "write a run's result for diffusers, kohya, AUTOMATIC1111, ComfyUI"


def add_arguments(p) -> None:
  from persona_jax.export import ALL_FORMATS, export_options
  p.add_argument("workdir", type=Path, help="a `persona-jax train` workdir")
  p.add_argument("--format", required=True, choices=ALL_FORMATS,
                 help="which fit depends on the method (a wrong one lists those that do)")
  p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
  for option in export_options().values():
    p.add_argument("--" + option.name.replace("_", "-"), type=option.type, default=None,
                   dest=f"option_{option.name}", metavar=option.name.upper(), help=option.help)


def run(args) -> int:
  from persona_jax.export import export, export_options
  options = {name: getattr(args, f"option_{name}") for name in export_options()
             if getattr(args, f"option_{name}") is not None}
  for path in export(args.workdir, args.format, args.out, options):
    print(path)
  return 0
