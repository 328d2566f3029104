"""The start-up flags of the computing commands (`train` spells them as absl flags): several
processes with `--coordinator-address HOST:PORT --num-processes N --process-id I`
(persona_jax/distributed.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags on a computing command (`sample`, `make-class-images`, `eval`)."""
  group = parser.add_argument_group(
      "several processes", "a TPU pod slice or a multi-node GPU job, one process per host on a "
      "shared workdir: give all three or none (a cluster JAX detects, such as SLURM, Open MPI "
      "or Cloud TPU, configures itself)")
  group.add_argument("--coordinator-address", metavar="HOST:PORT",
                     help="process 0's address, the same on every process (default: none)")
  group.add_argument("--num-processes", type=int, metavar="N",
                     help="how many processes run the command (default: none)")
  group.add_argument("--process-id", type=int, metavar="I",
                     help="this process's index, 0 .. N-1 (default: none)")
  group.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                     help="seconds without a heartbeat before a lost process stops the others "
                          "(default: JAX's, 100)")


def start(args) -> int:
  """Starts the processes' runtime from the flags (distributed.start); the process count."""
  from persona_jax.distributed import start as start_processes
  return start_processes(args.coordinator_address, args.num_processes, args.process_id,
                         args.heartbeat_timeout)
