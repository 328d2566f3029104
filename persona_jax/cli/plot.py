"""`persona-jax plot WORKDIR`: a run's curves from WORKDIR/metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

NAME = "plot"
HELP = "draw a run's loss curve (WORKDIR/metrics.jsonl -> loss.png)"


def add_arguments(p) -> None:
  p.add_argument("workdir", type=Path, help="a `persona-jax train` workdir")
  p.add_argument("--out", type=Path, default=None, help="default: WORKDIR/loss.png")
  p.add_argument("--keys", nargs="+", default=["loss"], help="metrics to draw (e.g. loss lr)")
  p.add_argument("--window", type=int, default=20, help="moving-average window, in log records")
  p.add_argument("--linear", action="store_true", help="a linear y axis (default: log)")


def run(args) -> int:
  from persona_jax.plots import loss_curve
  print(loss_curve(args.workdir, args.out, keys=tuple(args.keys), window=args.window,
                   log_y=not args.linear))
  return 0
