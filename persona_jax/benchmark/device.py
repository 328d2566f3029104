"""The prepared accelerator benchmark (`scripts/device_bench.sh`): persona_jax against diffusers
PyTorch on one GPU, in one command that ends inside a time budget.

`python -m persona_jax.benchmark.device [--dry-run] [--out DIR] [--budget S] [--cases ...]`
writes a random-weight pipeline of SD 1.5's real shapes (benchmark/device_models.py; kept in
TMP/device_bench_models, so a second call on the same machine reuses it), then runs one worker
process per framework and case, in this order (PyTorch first in each pair: it is quick
and predictable, persona_jax's compilation is not):
  sample      DDIM-50 with classifier-free guidance at 512x512, batches 1 and 8: seconds per
              image after compilation (the first call's extra time is reported as compile time)
  lora        a LoRA train step at batch 4 (steps/s, peak memory)
  dreambooth  a DreamBooth (full UNet) train step at batch 4, 2 instance + 2 class rows
  sdxl        (if the budget still has `SDXL_MIN_S` left) SDXL base shapes at 1024x1024,
              batch 1: writes that model too, then samples as `sample` does
persona_jax runs bf16 (mixed precision for training), PyTorch float16 pipelines and bf16
autocast training (benchmark/device_torch.py). A job starts only with its minimum time left;
each runs with the rest of the budget as its timeout; what did not fit is a `skipped` record.

MFU: the FLOPs XLA's cost analysis counts (sampling: the text encoders, `steps` CFG UNet calls and
the VAE decoder, lowered from shapes here on the CPU, batch 1 scaled by the batch: no op mixes
examples; training: the step's lowered program) over the measured time and the device's peak dense
bf16 rate (PEAK_TFLOPS by device name, or --peak-tflops). The PyTorch column divides the same
FLOPs by PyTorch's time.

Output (each record appended as soon as it is measured, the table rewritten after each):
  OUT/device_bench.jsonl  {"kind": "meta" | "setup" | "flops" | "result" | "skipped", ...}
  OUT/device_bench.md     the table
`--dry-run`: the same path on CPU with make-random-model's tiny sd1 model, 32x32 images, 2 steps,
batches 1 and 2, float32 on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "a photo of a corgi wearing sunglasses on the beach"
CASES = ("sample", "lora", "dreambooth", "sdxl")
RESULTS_FILE, TABLE_FILE = "device_bench.jsonl", "device_bench.md"
# Peak dense bf16 tensor rates (TFLOP/s) by a substring of the device's name, most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


@dataclasses.dataclass(frozen=True)
class Scale:
  """The shapes and counts of a run."""
  model: str                 # device_models.MODELS
  size: int                  # image height = width
  steps: int                 # sampling steps
  sample_batches: tuple[int, ...]
  train_batch: int
  iters: int                 # timed train steps
  reps: int                  # timed sampling calls per batch size
  dtype: str                 # persona_jax's compute dtype
  budget_s: float
  min_s: dict                # {job name: seconds it needs left to start}
  sdxl_model: str = "sdxl"
  sdxl_size: int = 1024
  keep_models: bool = True   # models stay in TMP/device_bench_models for a next call to reuse


SCALES = {
    "gpu": Scale("sd15", 512, 50, (1, 8), 4, 5, 2, "bfloat16", 280.0,
                 {"sample/torch": 20, "sample/jax": 60, "lora/torch": 15, "lora/jax": 45,
                  "dreambooth/torch": 15, "dreambooth/jax": 45, "sdxl": 180}),
    "dry_run": Scale("tiny", 32, 2, (1, 2), 2, 2, 1, "float32", 300.0, {}, "tiny_sdxl", 32,
                     keep_models=False),
}


def emit(record: dict) -> None:
  """A worker's measurement, on its own stdout line, flushed at once."""
  print(json.dumps(record), flush=True)


def host_peak_mb() -> float | None:
  """This process image's peak RSS (Linux's VmHWM), None where unknown. Not `ru_maxrss`: Linux
  keeps that across exec, so a worker's would be at least the driver's RSS when it spawned it."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def peak_flops(device: str, override_tflops: float | None = None) -> float | None:
  """The device's peak dense bf16 FLOP/s (None: unknown, e.g. a CPU)."""
  if override_tflops:
    return override_tflops * 1e12
  return next((t * 1e12 for name, t in PEAK_TFLOPS if name.lower() in device.lower()), None)


def xla_flops(stage) -> float | None:
  """FLOPs XLA's cost analysis counts in a lowered or compiled program (None where unavailable).
  A loop body counts once."""
  try:
    cost = stage.cost_analysis()
  except Exception:             # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def sampling_flops(model: str, size: int, steps: int) -> float | None:
  """FLOPs of one image of text-to-image with guidance (prompt + negative through the text
  encoders, `steps` UNet calls on both halves, the VAE decoder), from XLA's cost analysis of the
  programs lowered from shapes (no weights). Runs on this process's JAX (the CPU)."""
  import jax
  import jax.numpy as jnp

  from persona_jax.benchmark.device_models import model_configs
  from persona_jax.convert.diffusers_folder import Pipeline, components_of, parse_configs
  from persona_jax.diffusion.conditioning import TextConditioning
  from persona_jax.models.components import abstract_params
  from persona_jax.text_to_image import SampleOptions, prompt_inputs
  from persona_jax.tokenizer import shipped_tokenizer_dir
  raw = model_configs(model)
  configs = parse_configs(raw)
  params = {c.name: abstract_params(c.name, configs[f"{c.name}_config"]) for c in components_of(raw)}
  tokenizer = shipped_tokenizer_dir()
  pipe = Pipeline(**configs, params=params, tokenizer_dir=tokenizer, raw_configs=raw,
                  tokenizer_2_dir=tokenizer if "text_encoder_2" in raw else None)
  models = pipe.models()
  inputs = prompt_inputs(pipe, pipe.tokenizer, [PROMPT], [None], SampleOptions(), (size, size))
  conditioning = TextConditioning()
  state = jax.eval_shape(lambda p, i: conditioning.prepare(models, p, i), params, inputs)
  f = pipe.vae_scale_factor
  x = jax.ShapeDtypeStruct((2, size // f, size // f, configs["unet_config"].in_channels),
                           jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)

  def unet_call(p, state, x, t):
    uncond = conditioning.negative(models, p, state)
    cond, _ = conditioning.at(models, p, state, x[:1], t[:1], 0)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    return models.unet.apply({"params": p["unet"]}, x, t, **both)

  def decode(p, x):
    return models.vae.apply({"params": p["vae"]}, x[:1], method="decode")
  parts = [jax.jit(lambda p, i: conditioning.prepare(models, p, i)).lower(params, inputs),
           jax.jit(unet_call).lower(params, state, x, t), jax.jit(decode).lower(params, x)]
  flops = [xla_flops(p) for p in parts]
  if None in flops:
    return None
  return flops[0] + steps * flops[1] + flops[2]


class Report:
  """The records of a run: appended to OUT/device_bench.jsonl as they come, the markdown table
  rewritten after each (write to a temporary name, then rename)."""

  def __init__(self, out: Path, peak_tflops: float | None):
    self.out, self.peak_tflops = out, peak_tflops
    self.records: list[dict] = []
    self.lock = threading.Lock()
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text("")

  def add(self, record: dict) -> None:
    with self.lock:
      record = self._with_mfu(record)
      self.records.append(record)
      with open(self.out / RESULTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
      tmp = self.out / f".{TABLE_FILE}.tmp"
      tmp.write_text(self.table() + "\n")
      tmp.replace(self.out / TABLE_FILE)

  def _with_mfu(self, record: dict) -> dict:
    """A result with its FLOPs and MFU where already known (a PyTorch train step's count comes
    with persona_jax's record of the same step, which may come later: `summary`)."""
    if record.get("kind") != "result":
      return record
    flops = self.flops(record)
    return dict(record, flops=flops, mfu=self.mfu(dict(record, flops=flops)))

  def flops(self, record: dict) -> float | None:
    """FLOPs of one timed call: the worker's count (persona_jax's train steps), sampling's per
    image count times the batch, else persona_jax's count of the same case and batch."""
    if record.get("flops"):
      return record["flops"]
    if "per_image_s" in record:
      per_image = next((r["per_image_flops"] for r in self.records if r.get("kind") == "flops"
                        and r["model"] == record["model"] and r["size"] == record["size"]), None)
      return per_image * record["batch"] if per_image else None
    return next((r["flops"] for r in self.records if r.get("kind") == "result"
                 and r["framework"] == "jax" and r["case"] == record["case"]
                 and r["batch"] == record["batch"] and r.get("flops")), None)

  def mfu(self, record: dict) -> float | None:
    """FLOPs / time / the device's peak rate (None where either is unknown)."""
    flops = self.flops(record)
    peak = peak_flops(record.get("device", ""), self.peak_tflops)
    return flops / record["seconds"] / peak if flops and peak else None

  def summary(self) -> list[dict]:
    """Every result with the FLOPs and MFU known at the end of the run."""
    return [dict(r, flops=self.flops(r), mfu=self.mfu(r)) for r in self.records
            if r.get("kind") == "result"]

  def table(self) -> str:
    """The markdown summary: one row per case and batch, both frameworks side by side."""
    meta = next((r for r in self.records if r.get("kind") == "meta"), {})
    results = self.summary()
    devices = sorted({f"{r['framework']}: {r['device']} ({r['dtype']}, {r['version']})"
                      for r in results})
    lines = [f"Device benchmark {meta.get('date', '')} ({meta.get('scale', '')}; "
             f"{'; '.join(devices) or 'no results yet'})", "",
             "| case | model | batch | persona_jax | diffusers PyTorch | speedup (torch/jax) | "
             "compile jax | first call torch | peak memory jax / torch | MFU jax / torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for r in results:
      rows.setdefault((r["case"], r["model"], r["batch"]), {})[r["framework"]] = r
    for (case, model, batch), row in rows.items():
      j, t = row.get("jax"), row.get("torch")
      speed = f"{t['seconds'] / j['seconds']:.2f}x" if j and t else "-"
      mem = " / ".join(f"{r['peak_mb'] / 1024:.1f} GiB" + ("" if r["peak_kind"] == "device"
                                                            else " (RSS)")
                       if r and r.get("peak_mb") else "-" for r in (j, t))
      mfu = " / ".join(f"{100 * r['mfu']:.1f}%" if r and r.get("mfu") else "-" for r in (j, t))
      lines.append(f"| {case} | {model} | {batch} | {_speed(j)} | {_speed(t)} | {speed} | "
                   f"{_secs(j, 'compile_s')} | {_secs(t, 'first_call_s')} | {mem} | {mfu} |")
    for r in self.records:
      if r.get("kind") == "skipped":
        lines.append(f"| {r['case']} | {r.get('model', '')} | - | not measured: {r['reason']} "
                     f"({r['framework']}) | | | | | | |")
    setup = [f"{r['what']} {r['seconds']:.1f} s" for r in self.records if r.get("kind") == "setup"]
    if setup:
      lines += ["", "Setup: " + ", ".join(setup) + "."]
    return "\n".join(lines)


def _speed(r: dict | None) -> str:
  if r is None:
    return "-"
  if "per_image_s" in r:
    return f"{r['per_image_s']:.3f} s/image"
  return f"{r['steps_per_s']:.2f} steps/s"


def _secs(r: dict | None, key: str) -> str:
  return f"{r[key]:.1f} s" if r and r.get(key) is not None else "-"


@dataclasses.dataclass
class Job:
  name: str                  # "<case>/<framework>", the key of Scale.min_s
  framework: str
  spec: dict


def jobs(scale: Scale, cases, models: dict) -> list[Job]:
  """The worker jobs of the chosen cases, in running order."""
  out = []
  for case in cases:
    if case == "sdxl":
      continue               # its model is written when the budget allows (run())
    for fw in ("torch", "jax"):
      spec = dict(case=case, model=str(models[scale.model]), model_name=scale.model,
                  size=scale.size, dtype=scale.dtype)
      if case == "sample":
        spec.update(batches=list(scale.sample_batches), steps=scale.steps, reps=scale.reps)
      else:
        spec.update(batch=scale.train_batch, iters=scale.iters)
      out.append(Job(f"{case}/{fw}", fw, spec))
  return out


def run_worker(job: Job, report: Report, env: dict, timeout: float) -> str:
  """Runs a worker, storing each record it prints as it arrives (its log passes through to
  stderr). Returns "ok", "timeout" or "failed (exit N): <its last log line>"."""
  module = f"persona_jax.benchmark.device_{job.framework}"
  proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(job.spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  last = [""]

  def read_records():
    for line in proc.stdout:
      line = line.strip()
      if line.startswith("{"):
        report.add(dict(json.loads(line), kind="result"))
      elif line:
        print(line, file=sys.stderr, flush=True)

  def read_log():
    for line in proc.stderr:
      print(line, end="", file=sys.stderr, flush=True)
      last[0] = line.strip() or last[0]
  readers = [threading.Thread(target=read_records), threading.Thread(target=read_log)]
  for reader in readers:
    reader.start()
  try:
    code = proc.wait(timeout=max(timeout, 1.0))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    code = None
  for reader in readers:
    reader.join()
  if code == 0:
    return "ok"
  return "timeout" if code is None else f"failed (exit {code}): {last[0][-300:]}"


def run(scale: Scale, out: Path, cases=CASES, budget_s: float | None = None,
        peak_tflops: float | None = None, work: Path | None = None) -> Report:
  """Runs the benchmark (see the module docstring); returns its report."""
  start = time.monotonic()
  deadline = start + (budget_s if budget_s is not None else scale.budget_s)
  env = dict(os.environ, PYTHONUNBUFFERED="1", PERSONA_JAX_NO_REEXEC="1",
             TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"    # compile times are cold ones
  _driver_on_cpu()
  report = Report(out, peak_tflops)
  report.add(dict(kind="meta", scale=scale.model if scale.model != "tiny" else "dry run",
                  date=time.strftime("%Y-%m-%d %H:%M"), budget_s=deadline - start,
                  cases=list(cases), python=sys.version.split()[0], versions=_versions(),
                  scale_fields=dataclasses.asdict(scale)))
  own_work = work is None and not scale.keep_models
  if work is None:
    work = (Path(tempfile.gettempdir()) / "device_bench_models" if scale.keep_models
            else Path(tempfile.mkdtemp(prefix="device_bench_")))
  models = {}

  def setup_model(name, size):
    from persona_jax.benchmark.device_models import write_model
    t0 = time.monotonic()
    folder = work / name
    reused = (folder / "model_index.json").is_file()     # written whole or not at all
    models[name] = folder if reused else write_model(name, folder)
    report.add(dict(kind="setup", what=f"{'reuse' if reused else 'write'} {name}",
                    seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    try:
      flops, error = sampling_flops(name, size, scale.steps), None
    except Exception as e:          # no MFU for sampling then, the timings still count
      flops, error = None, f"{type(e).__name__}: {e}"
    report.add(dict(kind="flops", model=name, size=size, steps=scale.steps,
                    per_image_flops=flops, error=error, seconds=time.monotonic() - t0))

  def skip(case, framework, reason, model=scale.model):
    report.add(dict(kind="skipped", case=case, framework=framework, model=model, reason=reason))

  if any(c != "sdxl" for c in cases):
    setup_model(scale.model, scale.size)
  for job in jobs(scale, cases, models):
    left = deadline - time.monotonic()
    if left < scale.min_s.get(job.name, 0):
      skip(job.spec["case"], job.framework, f"budget ({left:.0f} s left)")
      continue
    status = run_worker(job, report, env, left)
    if status != "ok":
      skip(job.spec["case"], job.framework, status)
  if "sdxl" in cases:
    left = deadline - time.monotonic()
    name = scale.sdxl_model
    if left < scale.min_s.get("sdxl", 0):
      skip("sdxl_sample", "both", f"budget ({left:.0f} s left)", name)
    else:
      setup_model(name, scale.sdxl_size)
      for fw in ("torch", "jax"):
        left = deadline - time.monotonic()
        spec = dict(case="sdxl_sample", model=str(models[name]), model_name=name,
                    size=scale.sdxl_size, dtype=scale.dtype, batches=[1], steps=scale.steps,
                    reps=1)
        status = run_worker(Job("sdxl", fw, spec), report, env, left)
        if status != "ok":
          skip("sdxl_sample", fw, status, name)
  report.add(dict(kind="summary", results=report.summary()))
  report.add(dict(kind="end", seconds=time.monotonic() - start))
  if own_work:
    shutil.rmtree(work, ignore_errors=True)
  return report


def _versions() -> dict:
  """The installed versions of the packages the run uses (as the workers will import them)."""
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "diffusers",
               "transformers", "peft", "safetensors"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _driver_on_cpu() -> None:
  """This process lowers programs for FLOP counts only: JAX stays on the CPU here, leaving the
  accelerator to the workers (whose environment is copied before this)."""
  import jax
  jax.config.update("jax_platforms", "cpu")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="device_bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="the same path on CPU with a tiny model (seconds)")
  parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/device_bench"),
                      help="output folder (default: $OUT, else out/device_bench)")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds for the whole run (default: 280 on GPU, 300 dry run)")
  parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak dense bf16 TFLOP/s for MFU (default: by name)")
  args = parser.parse_args(argv)
  scale = SCALES["dry_run" if args.dry_run else "gpu"]
  report = run(scale, args.out, tuple(args.cases), args.budget, args.peak_tflops)
  print(report.table())
  bad = [r for r in report.records if r.get("kind") == "result"
         and not all(math.isfinite(r[k]) for k in ("seconds",))]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
