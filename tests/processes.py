"""Multi-process runs in the tests: N `persona-jax` processes on 127.0.0.1 (a free port), each
with its own CPU devices (JAX_NUM_CPU_DEVICES), as a pod's hosts run one command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int, audit: Path | None = None) -> dict:
  """The child's environment: `devices` CPU devices, the tests' compilation cache, no re-exec."""
  import jax
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PERSONA_JAX_NO_REEXEC="1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             PYTHONPATH=str(ROOT))
  env.pop("PERSONA_JAX_AUDIT", None)
  if audit is not None:
    env["PERSONA_JAX_AUDIT"] = str(audit)
  return env


def start(args, processes: int, devices: int, logs: Path, audit: bool = False,
          extra=()) -> list[subprocess.Popen]:
  """Starts `persona-jax ARGS` as `processes` processes of one run (one alone: no flags);
  process i logs to LOGS/process_i.log (and, with `audit`, records what it creates in
  LOGS/audit_i.txt, tests/process_main.py)."""
  logs.mkdir(parents=True, exist_ok=True)
  port = free_port()
  children = []
  for i in range(processes):
    flags = ([] if processes == 1 else
             ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes),
              "--process-id", str(i), *extra])
    out = open(logs / f"process_{i}.log", "w")
    children.append(subprocess.Popen(
        [sys.executable, "-m", "tests.process_main", *args, *flags], cwd=ROOT,
        env=env_for(devices, logs / f"audit_{i}.txt" if audit else None), stdout=out,
        stderr=subprocess.STDOUT))
    out.close()
  return children


def wait(children, logs: Path, timeout: float = 300) -> list[int]:
  """Waits for every process (killing all at `timeout`); asserts they all exit 0, showing the
  tail of each log otherwise."""
  deadline = time.monotonic() + timeout
  codes = []
  for child in children:
    try:
      codes.append(child.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for c in children:
        c.kill()
      codes.append("timeout")
  if any(c != 0 for c in codes):
    tails = "\n".join(f"--- process {i} (exit {c}):\n" + tail(logs / f"process_{i}.log")
                      for i, c in enumerate(codes))
    raise AssertionError(f"exit codes {codes}\n{tails}")
  return codes


def run(args, processes: int, devices: int, logs: Path, **kwargs) -> None:
  """`start` then `wait`."""
  timeout = kwargs.pop("timeout", 300)
  wait(start(args, processes, devices, logs, **kwargs), logs, timeout)


def tail(path: Path, chars: int = 3000) -> str:
  text = path.read_text(errors="replace") if path.is_file() else "(no log)"
  return text[-chars:]


def created(logs: Path, process: int, under: Path) -> list[str]:
  """What process `process` created under `under` (its audit file), checkpoints left out
  (orbax writes those on every process)."""
  path = logs / f"audit_{process}.txt"
  lines = path.read_text().splitlines() if path.is_file() else []
  root = str(Path(under).resolve())
  return sorted({line.split(" ", 1)[1] for line in lines
                 if line.split(" ", 1)[1].startswith(root)
                 and "/checkpoints" not in line.split(" ", 1)[1]})
