"""The persona_jax side of the device benchmark (a worker process of `benchmark/device.py`).

`python -m persona_jax.benchmark.device_jax JOB` runs one job (a JSON object) and prints one JSON
record per measurement on stdout as soon as it is taken:
  sample      text_to_image (DDIM, classifier-free guidance) at each batch size: the first call
              (compilation + one run), then `reps` timed calls; seconds per call and per image
  lora        the lora method's train step (rank 4 on the attention projections) at `batch`
  dreambooth  the dreambooth method's step (full UNet, half the rows class rows, prior loss,
              clipping 1.0) at `batch`
Train steps are the real `train_step` (benchmark/jax_cases.py builds them), with `dtype`
bfloat16 as `mixed_precision="bf16"` trains: bf16 compute, float32 trainables, frozen weights in
bf16. Each reports its compile time (lowering + compilation), the step's FLOPs from XLA's cost
analysis, steps/s and the device's peak bytes in use (host peak RSS where the device keeps no
statistics, e.g. on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from persona_jax.benchmark.device import PROMPT, emit, host_peak_mb, xla_flops


def device_peak() -> tuple[float | None, str]:
  """(peak MB, "device") from the first device's allocator; on CPU (no statistics) the host
  process's peak RSS, "host_rss"."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device"
  return host_peak_mb(), "host_rss"


def run_sample(job: dict) -> None:
  """text_to_image at each batch size of the job, smallest first (so the cumulative peak after
  a batch size is its own)."""
  import jax.numpy as jnp

  from persona_jax.pipeline import load_pipeline
  from persona_jax.text_to_image import SampleOptions, text_to_image
  dtype = jnp.dtype(job["dtype"])
  start = time.perf_counter()
  pipe = load_pipeline(job["model"], dtype=dtype)
  load_s = time.perf_counter() - start
  for batch in job["batches"]:
    options = SampleOptions(steps=job["steps"], guidance=7.5, height=job["size"],
                            width=job["size"], batch_size=batch, scheduler="ddim")

    def call(seed):
      start = time.perf_counter()
      images = text_to_image(pipe, PROMPT, num_images=batch, progress=False,
                             options=dataclasses.replace(options, seed=seed))
      assert images.shape[0] == batch
      return time.perf_counter() - start
    first = call(0)
    times = [call(seed) for seed in range(1, job["reps"] + 1)]
    median = statistics.median(times)
    peak, peak_kind = device_peak()
    emit(dict(case=job["case"], batch=batch, first_call_s=first, times_s=times, seconds=median,
              per_image_s=median / batch, compile_s=max(first - median, 0.0), load_s=load_s,
              peak_mb=peak, peak_kind=peak_kind, **_about(job)))


def _unet(folder: Path, dtype, param_dtype):
  """(UNetConfig with compute dtype `dtype`, params in `param_dtype` on the device) of
  FOLDER/unet."""
  import jax

  from persona_jax.convert.diffusers import state_dict_to_params
  from persona_jax.convert.files import read_weights
  from persona_jax.models.components import abstract_params
  from persona_jax.models.configs import UNetConfig, read_json
  config = UNetConfig.from_dict(read_json(folder / "unet" / "config.json"))
  state, source = read_weights(folder / "unet", "diffusion_pytorch_model")
  params = state_dict_to_params(state, abstract_params("unet", config), source=source,
                                dtype=param_dtype)
  return dataclasses.replace(config, dtype=dtype), jax.device_put(params)


def train_parts(job: dict):
  """(jitted step, state, frozen, batch) of the job's train step on FOLDER's UNet."""
  import jax.numpy as jnp

  from persona_jax.benchmark.device_models import latent_size
  from persona_jax.benchmark.jax_cases import _adapter_parts, _jax_db_parts
  compute = jnp.dtype(job["dtype"])
  lora = job["case"] == "lora"     # its frozen base in the compute dtype, as the train loop keeps it
  config, params = _unet(Path(job["model"]), compute, compute if lora else jnp.float32)
  latent, batch = latent_size(job["model"], job["size"]), job["batch"]
  if lora:
    return _adapter_parts("lora_train", config, params, batch, latent, 77)
  case = "db_train_bf16" if compute == jnp.bfloat16 else "db_train"
  step, state, batches = _jax_db_parts(case, dataclasses.replace(config, dtype=jnp.float32),
                                       params, batch, latent, 77)
  return step, state, {}, batches[0]


def run_train(job: dict) -> None:
  import jax
  step, state, frozen, batch = train_parts(job)
  start = time.perf_counter()
  lowered = step.lower(state, frozen, batch)
  flops = xla_flops(lowered)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  compiled_flops = xla_flops(compiled)

  def call():
    nonlocal state
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start
  first = call()
  times = [call() for _ in range(job["iters"])]
  median = statistics.median(times)
  peak, peak_kind = device_peak()
  emit(dict(case=job["case"], batch=job["batch"], compile_s=compile_s, first_call_s=first,
            times_s=times, seconds=median, steps_per_s=1.0 / median, peak_mb=peak,
            peak_kind=peak_kind, flops=flops or compiled_flops,
            flops_source="lowered" if flops else "compiled" if compiled_flops else None,
            compiled_flops=compiled_flops, **_about(job)))


def _about(job: dict) -> dict:
  import jax
  return dict(framework="jax", model=job["model_name"], size=job["size"], dtype=job["dtype"],
              device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
              version=jax.__version__)


def main(job: dict) -> None:
  (run_sample if job["case"] in ("sample", "sdxl_sample") else run_train)(job)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
