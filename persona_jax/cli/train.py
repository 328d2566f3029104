"""`persona-jax train --config NAME[:variant] --workdir DIR [--config.a.b=VALUE ...]`: train a
method (train/loop.py), resumably. `--print-config` prints the resolved config instead; `--help`
lists the shipped configs."""

from __future__ import annotations

import json
import sys

NAME = "train"
HELP = "train a method: --config NAME[:tiny] --workdir DIR [--config.a.b=v] (--help: the configs)"
USAGE = ("usage: persona-jax train --config NAME[:variant] --workdir DIR [--config.a.b=VALUE ...] "
         "[--noprogress] [--print-config] [--continue-with-changes] [--coordinator-address "
         "HOST:PORT --num-processes N --process-id I] [--heartbeat-timeout SECONDS]")
# Flags spelled with dashes, as the other commands spell them; absl defines them with '_'.
DASHED = ("print-config", "continue-with-changes", "coordinator-address", "num-processes",
          "process-id", "heartbeat-timeout")


def help_text() -> str:
  """The usage, the shipped configs (name, variants, first docstring line) and the flags."""
  from persona_jax.train.config import shipped_configs
  lines = [USAGE, "", "Configs (NAME or a path to a config file; every field can be overridden "
           "with --config.a.b=VALUE):"]
  for name, variants, summary in shipped_configs():
    label = name + (f" [:{'|:'.join(variants)}]" if variants else "")
    lines.append(f"  {label:38s} {summary}")
  lines += ["", "Flags:",
            "  --config NAME[:variant]   the experiment config (e.g. dreambooth:tiny)",
            "  --workdir DIR             the run folder (created; the same command resumes)",
            "  --noprogress              no progress bar",
            "  --print-config            print the resolved config (as WORKDIR/config.json "
            "holds it) and exit",
            "  --continue-with-changes   resume this workdir from its last checkpoint with a "
            "changed optim.lr, optim.schedule, optim.warmup_steps or steps (a run stopped on "
            "NaN or divergence); each change is logged and kept in WORKDIR/config_changes.jsonl",
            "  --coordinator-address HOST:PORT --num-processes N --process-id I",
            "                            several processes (a TPU pod slice, a multi-node GPU "
            "job), one per host on a shared workdir: all three or none (a cluster JAX detects, "
            "such as SLURM, Open MPI or Cloud TPU, configures itself)",
            "  --heartbeat-timeout SECONDS  seconds without a heartbeat before a lost process "
            "stops the others (default: JAX's, 100)"]
  return "\n".join(lines)


def main(argv) -> int:
  """Parses the absl/ml_collections flags and trains; returns the exit code."""
  from absl import flags
  from ml_collections import config_flags

  from persona_jax.train.config import config_path, run_config
  if "--help" in argv or "-h" in argv:
    print(help_text())
    return 0
  # ml_collections finds the --config.a.b overrides in `sys_argv`, spelled `--config=PATH`.
  args = []

  def undashed(a):
    name, eq, value = a.partition("=")
    return ("--" + name[2:].replace("-", "_") if name[2:] in DASHED else name) + eq + value
  for a in map(undashed, argv):
    if args and args[-1] == "--config":
      args[-1] = f"--config={config_path(a)}"
    elif a.startswith("--config="):
      args.append(f"--config={config_path(a.split('=', 1)[1])}")
    else:
      args.append(a)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config: configs/NAME.py[:variant] "
                                  "or NAME[:variant]", flag_values=fv, lock_config=True,
                                  sys_argv=["persona-jax train", *args])
  flags.DEFINE_string("workdir", None, "run folder (created; an existing run resumes)", flag_values=fv)
  flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
  flags.DEFINE_bool("print_config", False, "print the resolved config and exit", flag_values=fv)
  flags.DEFINE_bool("continue_with_changes", False, "resume with a changed lr/schedule/steps",
                    flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "how many processes", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout", None, "seconds before a lost process stops the rest",
                       flag_values=fv)
  try:
    fv(["persona-jax train", *args])
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    message = " ".join(str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", " ").split())
    if len(message) > 1 and message[0] == message[-1] == "'":
      message = message[1:-1]
    print(f"persona-jax train: error: unknown or invalid config key: {message}", file=sys.stderr)
    return 2
  if fv.config is None:
    print("persona-jax train: error: --config is required (--help lists the configs)",
          file=sys.stderr)
    return 2
  config = run_config(fv.config)
  if fv.print_config:
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return 0
  if fv.workdir is None:
    print("persona-jax train: error: --config and --workdir are required", file=sys.stderr)
    return 2
  from persona_jax.distributed import is_main, start
  start(fv.coordinator_address, fv.num_processes, fv.process_id, fv.heartbeat_timeout)
  from persona_jax.train.loop import train
  result = train(config, fv.workdir, progress=fv.progress,
                 continue_with_changes=fv.continue_with_changes)
  if is_main():
    for path in result["outputs"] + ([result["samples"]] if result["samples"] else []):
      print(path)
  return 0
