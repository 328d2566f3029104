"""`persona-jax bench`: speed and memory against diffusers PyTorch (persona_jax/benchmark/)."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "bench"
HELP = "speed and memory against diffusers PyTorch (separate processes)"


def add_arguments(p) -> None:
  from persona_jax.benchmark import CASES, DEFAULT_CASES, FRAMEWORKS, PRESETS
  from persona_jax.runtime import MALLOC_TUNABLE
  p.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                 help="reduced: SD 1.5 architecture at reduced width, 32x32 latents (CPU); "
                      "sd15: the real SD 1.5 UNet, 64x64 latents (GPU/TPU); sdxl: the SDXL UNet "
                      "architecture at reduced width, 32x32 latents, with pooled text and time ids "
                      "(CPU; the UNet-only cases; --memory-plan plans the real SDXL UNet); "
                      "sdxl_full: the real SDXL UNet, 128x128 latents (GPU/TPU)")
  p.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES),
                 help="default: %(default)s; the DreamBooth memory options: db_train_bf16 "
                      "db_train_remat db_train_accum2")
  p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
  p.add_argument("--reps", type=int, default=3, help="alternating repetitions per framework")
  p.add_argument("--iters", type=int, default=5, help="timed calls per repetition")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", default="", help="a note on what ran where, recorded in the report")
  p.add_argument("--no-malloc-tunable", action="store_true",
                 help=f"do not set GLIBC_TUNABLES={MALLOC_TUNABLE} for the workers")
  p.add_argument("--json", type=Path, default=None, help="also write the full results here")
  p.add_argument("--memory-plan", action="store_true",
                 help="only compile the DreamBooth step per memory option, and the LoRA and Custom "
                      "Diffusion steps, from shapes (no weights) and print XLA's buffer plans; "
                      "works for --preset sd15 and sdxl (the real SDXL UNet) on a laptop")
  p.add_argument("--memory-plan-batch", type=int, default=2,
                 help="rows per step for --memory-plan (instance + class)")
  p.add_argument("--memory-plan-remat", nargs="+", choices=("none", "blocks", "dots"), default=[],
                 help="plan every case under each of these UNet remat policies")
  p.add_argument("--memory-plan-target", default="cpu",
                 help="cpu (XLA:CPU), or tpu:TOPOLOGY, e.g. tpu:v5e:2x2: libtpu's compiler plans "
                      "for one TPU chip without a TPU (needs libtpu: pip install 'jax[tpu]')")


def run(args) -> int:
  from persona_jax.benchmark import ADAPTER_CASES, DB_VARIANTS, DEFAULT_CASES, PRESETS, bench
  from persona_jax.benchmark.jax_cases import memory_plan
  default = args.cases == list(DEFAULT_CASES)
  if args.memory_plan:
    plannable = DB_VARIANTS + ADAPTER_CASES
    cases = [c for c in args.cases if c in plannable] if not default else plannable
    result = memory_plan(args.preset, cases, batch_size=args.memory_plan_batch,
                         remat=tuple(args.memory_plan_remat), target=args.memory_plan_target)
  else:                          # the default cases the preset runs; others asked for are refused
    cases = [c for c in args.cases if c in PRESETS[args.preset].cases] if default else args.cases
    result = bench(preset=args.preset, cases=cases, frameworks=args.frameworks,
                   reps=args.reps, iters=args.iters, dtype=args.dtype, device_note=args.device,
                   malloc_tunable=not args.no_malloc_tunable)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
  return 0
