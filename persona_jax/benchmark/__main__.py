"""A bench worker: `python -m persona_jax.benchmark FRAMEWORK CASE UNET_DIR PRESET ITERS DTYPE`
runs one case in this process (first call, then ITERS timed calls) and prints its JSON record."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

from persona_jax.benchmark import PRESETS
from persona_jax.benchmark.device import host_peak_mb
from persona_jax.runtime import release_freed_memory


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (Linux), so the steps' peak excludes compilation."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def worker(framework: str, case: str, unet_dir: Path, preset: str, iters: int, dtype: str) -> dict:
  """Runs one case in this process: first call (compile), then `iters` timed calls."""
  p = PRESETS[preset]
  if framework == "jax":
    from persona_jax.benchmark.jax_cases import jax_case as build
  else:
    from persona_jax.benchmark.torch_cases import torch_case as build
  run = build(case, unet_dir, p, dtype)
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  first_peak = host_peak_mb()
  release_freed_memory()              # as the train loop does after a compile (runtime.py)
  steady_from = _reset_peak_rss()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  last = host_peak_mb()               # since the reset, or (no reset) since exec
  steady = last if steady_from else None
  peak = (max(first_peak, last) if first_peak is not None
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  result = dict(framework=framework, case=case, first_call_s=first, times_s=times,
                median_s=statistics.median(times), peak_rss_mb=peak, steady_peak_rss_mb=steady)
  if getattr(run, "xla_memory", None):
    result["xla_memory_mb"] = run.xla_memory
  if framework == "jax":
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      result["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  else:
    import torch
    if torch.cuda.is_available():
      result["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return result


if __name__ == "__main__":
  fw, case, unet_dir, preset, iters, dtype = sys.argv[1:7]
  print(json.dumps(worker(fw, case, Path(unet_dir), preset, int(iters), dtype)))
