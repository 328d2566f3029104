"""`persona-jax eval`: the toy-world efficacy benchmark (world/efficacy.py), or how well a toy
model follows prompts (world/prompt_following.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from persona_jax.cli import process_flags
from persona_jax.errors import ConfigError

NAME = "eval"
HELP = "the toy-world efficacy benchmark of a method: subject fidelity, prompt fidelity, drift"
FIELDS = ("method", "model", "subjects", "seeds", "references", "contexts", "steps", "lr",
          "batch_size", "class_images", "sample_steps", "guidance", "seed", "metric",
          "subject_class", "state")


def add_arguments(p) -> None:
  from persona_jax.cli.sample import add_knob_flags
  from persona_jax.world.efficacy import method_names
  p.add_argument("--method", choices=method_names(), help="the method to evaluate")
  p.add_argument("--prompt-following", type=int, default=None, metavar="N",
                 help="instead: how well the model follows N held-out full captions (class, "
                      "colour, pattern, background accuracy by the metric encoder)")
  p.add_argument("--domain", choices=("scenes", "identities"), default="scenes",
                 help="with --prompt-following: the world's scenes, or scenes of held-out "
                      "identities")
  p.add_argument("--out", required=True, type=Path, help="folder for eval.json, samples, runs")
  p.add_argument("--model", default=None, help="base model folder, or toy-xl (default: the "
                 "embedded SD 1.x base)")
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
  add_knob_flags(p)
  p.add_argument("--noprogress", action="store_true")
  process_flags.add_arguments(p)


def run(args) -> int:
  from persona_jax.cli.sample import knob_values
  from persona_jax.distributed import is_main
  from persona_jax.world.efficacy import TABLE_HEADER, EvalConfig, evaluate, table_row
  if args.prompt_following is not None:
    from persona_jax.world import metric_encoder
    from persona_jax.world.prompt_following import prompt_following
    metric = metric_encoder.load(args.metric) if args.metric else None
    result = prompt_following(args.model or "default", args.prompt_following,
                              args.seed if args.seed is not None else 1, metric=metric,
                              sample_steps=args.sample_steps or 25,
                              guidance=args.guidance if args.guidance is not None else 4.0,
                              progress=not args.noprogress, out=args.out, domain=args.domain)
    if is_main():
      print(json.dumps(result, indent=2))
    return 0
  if args.method is None:
    raise ConfigError("eval: give --method NAME (or --prompt-following N)")
  values = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
  cfg = EvalConfig(**values, inputs=tuple(sorted(knob_values(args).items())))
  summary = evaluate(cfg, args.out, progress=not args.noprogress)
  if not is_main():
    return 0
  print(TABLE_HEADER)
  print(table_row(summary))
  print(f"{args.out / 'eval.json'} (per-subject rows), samples in {args.out / 'samples'}",
        file=sys.stderr)
  return 0
