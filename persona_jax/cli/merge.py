"""`persona-jax merge RUN_A RUN_B ... --out DIR`: Custom Diffusion runs combined in closed form."""

from __future__ import annotations

from pathlib import Path

from persona_jax.errors import PersonaError

NAME = "merge"
HELP = "combine Custom Diffusion runs in closed form (Kumari et al. 2023)"


def add_arguments(p) -> None:
  p.add_argument("runs", nargs="+", type=Path,
                 help="workdirs of custom_diffusion runs (freeze_model=crossattn_kv), or merged folders")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.add_argument("--model", default=None,
                 help="the base model (default: the one the runs were trained on)")
  p.add_argument("--reg-captions", type=Path, default=None,
                 help="regularization captions, one per line (default: 200 generic captions "
                      "shipped with persona_jax; the paper uses 200 LAION captions)")


def run(args) -> int:
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
