"""The sampling flags of `sample` and `make-class-images`, checked before any model loads.

`check_flags` refuses values no model can take (zero steps, a negative batch size, eta outside
[0, 1], ...); `check_against_model` checks the image size and the step count against the model's
config files only (`vae/config.json`, `scheduler/scheduler_config.json`), never its weights. Each
refusal is one line naming the flag.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from persona_jax.errors import ConfigError

SINGLE_FILE_VAE_FACTOR = 8    # every original SD 1.x/2.x/SDXL single file's VAE
SEED_LIMIT = 2 ** 63


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _check(args, name: str, ok, rule: str) -> None:
  """Refuses `args.NAME` when given (not None) and `ok(value)` is false."""
  value = getattr(args, name, None)
  if value is None:
    return
  values = value if isinstance(value, (list, tuple)) else (value,)
  if not all(isinstance(v, int) or math.isfinite(v) for v in values) or not ok(value):
    shown = " ".join(str(v) for v in values)
    raise ConfigError(f"{_flag(name)} {shown}: {rule}")


def check_flags(args) -> None:
  """The flags' own ranges, before anything is read (ConfigError naming the first bad flag)."""
  _check(args, "steps", lambda v: v >= 1, "the number of denoising steps must be at least 1")
  _check(args, "num_images", lambda v: v >= 1, "images per prompt must be at least 1")
  _check(args, "num", lambda v: v >= 0, "how many class images OUT should hold: 0 or more")
  _check(args, "batch_size", lambda v: v >= 1, "images per batch must be at least 1")
  _check(args, "guidance", lambda v: v >= 0,
         "the guidance scale must be 0 or more (at most 1: no guidance)")
  _check(args, "guidance_rescale", lambda v: 0 <= v <= 1, "must be between 0 and 1")
  _check(args, "eta", lambda v: 0 <= v <= 1,
         "DDIM's eta must be between 0 (deterministic) and 1 (DDPM-like)")
  _check(args, "clip_skip", lambda v: v >= 0,
         "the number of last text-encoder layers to skip must be 0 or more")
  _check(args, "seed", lambda v: 0 <= v < SEED_LIMIT, "the seed must be between 0 and 2**63 - 1")
  for name in ("height", "width"):
    _check(args, name, lambda v: v >= 1, "the image size must be a positive number of pixels")
  for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
    _check(args, name, lambda v: min(v) >= 1, "H W must be positive numbers of pixels")
  for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
    _check(args, name, lambda v: min(v) >= 0, "TOP LEFT must be 0 or more")


def _read_json(path: Path) -> dict | None:
  """The file's JSON object, or None when it is missing or unreadable (the loader reports it)."""
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return raw if isinstance(raw, dict) else None


def check_against_model(args, model, shown: str) -> None:
  """--height/--width a multiple of the VAE's factor and --steps at most the training
  timesteps, read from `model`'s config files (a single file: from --config DIR, else SD's 8).
  `shown`: the model as the messages name it."""
  model = Path(model)
  if not model.exists():                 # the loader says so, in its own words
    return
  folder = model if model.is_dir() else getattr(args, "config", None)
  factor, timesteps = SINGLE_FILE_VAE_FACTOR, None
  if folder is not None:
    vae = _read_json(Path(folder) / "vae" / "config.json")
    if vae is not None and isinstance(vae.get("block_out_channels"), list):
      factor = 2 ** (len(vae["block_out_channels"]) - 1)   # VAEConfig.downsample_factor
    scheduler = _read_json(Path(folder) / "scheduler" / "scheduler_config.json")
    if scheduler is not None:
      timesteps = scheduler.get("num_train_timesteps", 1000)
  for name in ("height", "width"):
    _check(args, name, lambda v: v % factor == 0,
           f"must be a positive multiple of {factor} (the VAE's downsampling factor of {shown})")
  if isinstance(timesteps, int):
    _check(args, "steps", lambda v: v <= timesteps,
           f"at most {timesteps}, the training timesteps of {shown}")
