"""The diffusers PyTorch side of the device benchmark (a worker process of `benchmark/device.py`).

`python -m persona_jax.benchmark.device_torch JOB` runs one job and prints one JSON record per
measurement, as `device_jax` does, on the same model folder:
  sample      DiffusionPipeline (StableDiffusion(XL)Pipeline) in float16 on CUDA (float32 on
              CPU), SDPA attention (diffusers' AttnProcessor2_0), the folder's DDIM scheduler,
              guidance 7.5: one warm-up call, then `reps` timed calls
  lora        train_dreambooth_lora.py's step under --mixed_precision bf16: the frozen UNet in
              bf16, peft LoRA (rank 4, alpha 4, gaussian init) on to_q/to_k/to_v/to_out.0,
              autocast (accelerate wraps the forward so), clipping 1.0, AdamW
  dreambooth  train_dreambooth.py's step with prior preservation under --mixed_precision bf16:
              the UNet in float32, autocast bf16 (benchmark/torch_cases.py's db_train_bf16)
Peak memory is torch.cuda.max_memory_allocated since the case's model was loaded (host peak
RSS on CPU).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from persona_jax.benchmark.device import PROMPT, emit, host_peak_mb


def _device():
  """"cuda", or "cpu" with one thread (the dry run: its figures check the path, and several
  threads on a busy machine spin for seconds per call)."""
  import torch
  from diffusers.utils import logging as diffusers_logging
  diffusers_logging.disable_progress_bar()           # loading bars: nothing to measure
  if torch.cuda.is_available():
    return "cuda"
  torch.set_num_threads(1)
  return "cpu"


def _fresh_peak() -> None:
  import gc

  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak() -> tuple[float | None, str]:
  import torch
  if torch.cuda.is_available():
    return torch.cuda.max_memory_allocated() / 2**20, "device"
  return host_peak_mb(), "host_rss"


def _sync():
  import torch
  return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def run_sample(job: dict) -> None:
  import torch
  from diffusers import DiffusionPipeline
  from diffusers.models.attention_processor import AttnProcessor2_0
  device = _device()
  dtype = torch.float16 if device == "cuda" else torch.float32
  _fresh_peak()
  start = time.perf_counter()
  pipe = DiffusionPipeline.from_pretrained(job["model"], dtype=dtype).to(device)
  load_s = time.perf_counter() - start
  pipe.unet.set_attn_processor(AttnProcessor2_0())          # SDPA (diffusers' default on torch 2)
  pipe.set_progress_bar_config(disable=True)
  sync = _sync()
  for batch in job["batches"]:
    def call(seed):
      start = time.perf_counter()
      images = pipe(PROMPT, num_images_per_prompt=batch, num_inference_steps=job["steps"],
                    guidance_scale=7.5, height=job["size"], width=job["size"],
                    generator=torch.Generator(device).manual_seed(seed), output_type="np").images
      sync()
      assert images.shape[0] == batch
      return time.perf_counter() - start
    first = call(0)
    times = [call(seed) for seed in range(1, job["reps"] + 1)]
    median = statistics.median(times)
    peak, peak_kind = _peak()
    emit(dict(case=job["case"], batch=batch, first_call_s=first, times_s=times, seconds=median,
              per_image_s=median / batch, load_s=load_s, peak_mb=peak, peak_kind=peak_kind,
              **_about(job, "float16" if dtype == torch.float16 else "float32")))


def run_train(job: dict) -> None:
  import contextlib

  import torch
  from diffusers import UNet2DConditionModel

  from persona_jax.benchmark import Preset, _inputs
  from persona_jax.benchmark.device_models import latent_size
  from persona_jax.benchmark.torch_cases import _torch_db_step, _torch_lora_step
  device = _device()
  bf16 = job["dtype"] == "bfloat16"
  _fresh_peak()
  folder = Path(job["model"]) / "unet"
  unet = UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32).to(device)
  preset = Preset(unet=json.loads((folder / "config.json").read_text()), latent=latent_size(job["model"], job["size"]))
  x, t, ctx, noise = (torch.from_numpy(a).to(device)
                      for a in _inputs(preset, job["batch"], channels_last=False))
  sync = _sync()
  if job["case"] == "lora":
    autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16
                else contextlib.nullcontext)
    run = _torch_lora_step(unet.to(torch.bfloat16 if bf16 else torch.float32), x, noise, t, ctx,
                           None, sync, autocast=autocast)
  else:
    run = _torch_db_step("db_train_bf16" if bf16 else "db_train", unet, x, noise, t, ctx, None,
                         sync)

  def call():
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
  first = call()
  times = [call() for _ in range(job["iters"])]
  median = statistics.median(times)
  peak, peak_kind = _peak()
  emit(dict(case=job["case"], batch=job["batch"], first_call_s=first, times_s=times,
            seconds=median, steps_per_s=1.0 / median, peak_mb=peak, peak_kind=peak_kind,
            **_about(job, "bf16 autocast" if bf16 else "float32")))


def _about(job: dict, precision: str) -> dict:
  import torch
  name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  return dict(framework="torch", model=job["model_name"], size=job["size"], dtype=precision,
              device=name, platform="gpu" if torch.cuda.is_available() else "cpu",
              version=torch.__version__)


def main(job: dict) -> None:
  (run_sample if job["case"] in ("sample", "sdxl_sample") else run_train)(job)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
