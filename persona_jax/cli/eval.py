"""`persona-jax eval`: the toy-world efficacy benchmark (world/efficacy.py; `--domain
identities`: the identity benchmark, world/identity_efficacy.py), or how well a toy model follows
prompts (world/prompt_following.py)."""

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
          "subject_class", "state", "domain")


def add_arguments(p) -> None:
  from persona_jax.cli.sample import add_knob_flags
  from persona_jax.world.efficacy import method_names
  p.add_argument("--method", choices=method_names(),
                 help="the method to evaluate (or --prompt-following instead)")
  p.add_argument("--prompt-following", type=int, default=None, metavar="N",
                 help="instead: how well the model follows N held-out full captions (class, "
                      "colour, pattern, background accuracy by the metric encoder)")
  p.add_argument("--domain", choices=("scenes", "identities"), default="scenes",
                 help="the world's scenes, or held-out identities (with --method: the identity "
                      "benchmark, judged by face analysis; with --prompt-following: scenes of "
                      "held-out identities)")
  p.add_argument("--judge", default=None, help="--domain identities: the face analysis that "
                 "judges identity (an insightface pack folder, or toy: the default)")
  p.add_argument("--vs-base", type=Path, default=None, metavar="EVAL_JSON",
                 help="the base row's eval.json (or its --out folder), run with the same "
                      "--subjects: the row gets the paired difference of the similarity")
  p.add_argument("--out", required=True, type=Path, help="folder for eval.json, samples, runs")
  p.add_argument("--model", default=None, help="base model folder, or toy-xl (default: the "
                 "embedded SD 1.x base)")
  p.add_argument("--subjects", type=int, default=None, help="held-out subjects (default 2)")
  p.add_argument("--seeds", type=int, default=None, help="images per prompt (default 4)")
  p.add_argument("--references", type=int, default=None, help="reference images per subject (default 4)")
  p.add_argument("--contexts", type=int, default=None, help="new backgrounds per subject (default 2)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: per method)")
  p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
  p.add_argument("--batch-size", type=int, default=None, help="training batch (default 4)")
  p.add_argument("--class-images", type=int, default=None, help="prior images per class (default 16)")
  p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default 25)")
  p.add_argument("--guidance", type=float, default=None,
                 help="guidance scale of the samples (default 4)")
  p.add_argument("--seed", type=int, default=None,
                 help="training and sampling seed (default 0; --prompt-following: 1)")
  p.add_argument("--metric", default=None, help="metric encoder folder (default: the shipped one)")
  p.add_argument("--subject-class", default=None, help="held-out subjects of this class only "
                 "(e4t's shipped state knows balls: --subject-class ball)")
  p.add_argument("--state", default=None, help="e4t: the pre-trained state (an e4t_pretrain "
                 "workdir; default: the shipped one); blip_diffusion_finetune: the stage-2 run it "
                 "tunes from; instantbooth, ip_adapter, fastcomposer, photomaker, blip_diffusion: "
                 "the run trained once on the world; knob values may say {references}: the "
                 "subject's reference folder, {cls}: its class (e.g. --face-embedding "
                 "'{references}/face_embeddings.npy' with --domain identities)")
  add_knob_flags(p)
  p.add_argument("--noprogress", action="store_true")
  process_flags.add_arguments(p)


def check_combination(args) -> None:
  """Refuses flags that do not go together, in one line."""
  if args.prompt_following is not None:
    for flag, value in (("--method", args.method), ("--vs-base", args.vs_base),
                        ("--judge", args.judge), ("--state", args.state)):
      if value is not None:
        raise ConfigError(f"{flag} is for the efficacy benchmark, not --prompt-following; "
                          "leave one of them out")
    return
  if args.method is None:
    raise ConfigError("give --method NAME (or --prompt-following N)")
  if args.judge is not None and args.domain != "identities":
    raise ConfigError("--judge judges identities: add --domain identities or leave it out")


# What a paired comparison holds equal: the base row and this one sample the same prompts alike.
PAIRED_FIELDS = ("domain", "model", "references", "contexts", "seeds", "sample_steps", "guidance",
                 "seed", "subject_class")


def check_same_setting(cfg, base: dict, path) -> None:
  """Refuses a --vs-base run whose setting differs from this one's (a one-line error)."""
  import dataclasses
  theirs = {"domain": "scenes", **base.get("config", {})}
  ours = dataclasses.asdict(cfg)
  for field in PAIRED_FIELDS:
    if field in theirs and theirs[field] != ours[field]:
      raise ConfigError(f"--vs-base {path}: it ran with {field} {theirs[field]!r}, this run "
                        f"{ours[field]!r}; a paired comparison needs the same setting")


def run(args) -> int:
  from persona_jax.cli.sample import knob_values
  from persona_jax.distributed import is_main
  from persona_jax.world.efficacy import EvalConfig, read_summary
  check_combination(args)
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
  values = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
  cfg = EvalConfig(**values, inputs=tuple(sorted(knob_values(args).items())))
  base = read_summary(args.vs_base) if args.vs_base else None      # before the work: a bad path
  if base is not None:
    check_same_setting(cfg, base, args.vs_base)
  summary = _evaluate(cfg, args)
  if not is_main():
    return 0
  print(_table(cfg.domain, summary, base))
  print(f"{args.out / 'eval.json'} (per-subject rows), samples in {args.out / 'samples'}",
        file=sys.stderr)
  return 0


def _evaluate(cfg, args) -> dict:
  progress = not args.noprogress
  if cfg.domain == "identities":
    from persona_jax.world import identity_efficacy
    judge = identity_efficacy.load_judge(args.judge or identity_efficacy.JUDGE)
    return identity_efficacy.evaluate(cfg, args.out, judge=judge, progress=progress)
  from persona_jax.world.efficacy import evaluate
  return evaluate(cfg, args.out, progress=progress)


def _table(domain: str, summary: dict, base: dict | None) -> str:
  """The markdown header and row (scenes with --vs-base: the paired difference on a line below)."""
  if domain == "identities":
    from persona_jax.world.identity_efficacy import TABLE_HEADER, table_row
    return f"{TABLE_HEADER}\n{table_row(summary, base)}"
  from persona_jax.world.efficacy import TABLE_HEADER, paired_difference, table_row
  text = f"{TABLE_HEADER}\n{table_row(summary)}"
  if base is not None:
    mean, se, n = paired_difference(summary, base, "subject_similarity")
    text += f"\nsubject similarity vs base (paired, {n} subjects): {mean:+.3f} +- {se:.3f}"
  return text
