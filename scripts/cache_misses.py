"""Runs a `persona-jax` command twice, each in a fresh process on one fresh user cache folder
(PERSONA_JAX_CACHE: JAX's persistent compilation cache and the embedded models), and lists the
programs the second run compiled instead of loading them from the persistent cache.

  python scripts/cache_misses.py [--second ARGS] -- sample --prompt "a dog" --steps 10 --out {out}

`{out}` in the arguments becomes a folder per run (train's --workdir must be new each time);
`--second` gives the second run's arguments after `--` instead (e.g. another prompt or seed:
the programs must still be the same). JAX says which programs missed when
JAX_EXPLAIN_CACHE_MISSES is set (compiler.py's "PERSISTENT COMPILATION CACHE MISS for 'NAME'"
lines, also written for programs it will not cache: those with host callbacks or compiled faster
than jax_persistent_cache_min_compile_time_secs). Prints each run's wall time, when its first
sampling step was done (the progress bar's first tick, if it has one) and the second run's misses;
the runs' logs are kept beside the cache (`--keep DIR`: DIR/run1.log, DIR/run2.log). To see why a
program missed, set JAX_DUMP_IR_TO=DIR/ir_{n} (`{n}`: out1, out2) and diff the two dumps.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'")
TICK = re.compile(r"\| *[1-9][0-9]*/[0-9]+ \[")       # tqdm's "| 1/10 [" after the first step
NOT_WRITTEN = re.compile(r"Not writing persistent cache entry for '([^']+)' because (.*)")


def run_once(argv: list[str], cache: Path, out: Path, explain: bool = True
             ) -> tuple[float, float, float | None, list[str], dict, str]:
  """(seconds, CPU seconds, seconds to the first progress tick or None, missed program names,
  {name: why not written}, stderr) of one fresh process."""
  env = dict(os.environ, PERSONA_JAX_CACHE=str(cache))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if explain:
    env["JAX_EXPLAIN_CACHE_MISSES"] = "1"
  if "JAX_DUMP_IR_TO" in env:
    env["JAX_DUMP_IR_TO"] = env["JAX_DUMP_IR_TO"].replace("{n}", out.name)
  argv = [a.replace("{out}", str(out)) for a in argv]
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "persona_jax", *argv], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  chunks, first_tick = [], None
  while chunk := os.read(proc.stderr.fileno(), 65536):
    chunks.append(chunk)
    if first_tick is None and TICK.search(chunk.decode(errors="replace")):
      first_tick = time.perf_counter() - start
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = code = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  stderr = b"".join(chunks).decode(errors="replace")
  if code:
    sys.exit(f"persona-jax {shlex.join(argv)} failed ({code}):\n{stderr[-4000:]}")
  why = {m.group(1): m.group(2) for m in NOT_WRITTEN.finditer(stderr)}
  return seconds, usage.ru_utime + usage.ru_stime, first_tick, MISS.findall(stderr), why, stderr


def main() -> int:
  split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--second", default=None, help="the second run's arguments (one shell string)")
  p.add_argument("--keep", type=Path, default=None, help="use this cache/output folder (kept)")
  p.add_argument("--no-explain", action="store_true",
                 help="time the runs without JAX's miss explanations (lists no misses)")
  args = p.parse_args(sys.argv[1:split])
  first = sys.argv[split + 1:]
  second = shlex.split(args.second) if args.second else first
  root = args.keep or Path(tempfile.mkdtemp(prefix="cache_misses_"))
  cache = root / "cache"
  for n, argv in enumerate((first, second), 1):
    seconds, cpu, first_tick, misses, why, log = run_once(argv, cache, root / f"out{n}",
                                                     explain=not args.no_explain)
    (root / f"run{n}.log").write_text(log)
    counts = collections.Counter(misses)
    tick = f", first step done at {first_tick:.1f} s" if first_tick is not None else ""
    compiled = "" if args.no_explain else f", {len(misses)} programs compiled"
    print(f"run {n}: {seconds:.1f} s ({cpu:.1f} s CPU){tick}{compiled}", flush=True)
    if n == 2:
      for name, k in counts.most_common():
        print(f"  {k} x {name}" + (f"  ({why[name]})" if name in why else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
