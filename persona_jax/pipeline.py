"""A Stable Diffusion pipeline as data (`Pipeline`: component configs, params, tokenizer), loaded
from a diffusers folder or an original single-file checkpoint, and saved as a diffusers folder.

This module sits above both loaders: `convert/diffusers_folder.py` (the folder layout, its reader
and writer) and `convert/single_file.py` (LDM single files); `load_pipeline` picks one by path.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from persona_jax.convert.diffusers_folder import Pipeline, read_folder, write_folder
from persona_jax.errors import ConfigError

__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "SINGLE_FILE_SUFFIXES"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def load_pipeline(path, *, dtype=jnp.float32, variant: str | None = None,
                  allow_pickle: bool = False, attention: str = "auto", config_dir=None,
                  prediction_type: str | None = None) -> Pipeline:
  """Loads a diffusers-format SD 1.x/2.x or SDXL folder, or an original single-file checkpoint.

  Args:
    path: the folder holding `model_index.json`, or a single `.safetensors` (`.ckpt`) file:
      then `convert.single_file.load_single_file(path, config_dir=, prediction_type=, ...)`.
    dtype: dtype of params and computation (float32 on CPU; bfloat16 on accelerators).
    variant: weight-file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    allow_pickle: read `.bin`/`.ckpt` files (with torch) when no safetensors exist. Only for
      files you trust: unpickling can run code.
    attention: the attention kernel (auto|einsum|xla|cudnn|blocked|splash).
    config_dir, prediction_type: for single files only (see `load_single_file`).
  Raises:
    ModelFileError naming the file (and key) that is missing, malformed or inconsistent.
  """
  root = Path(path)
  if root.suffix in SINGLE_FILE_SUFFIXES and not root.is_dir():
    if variant is not None:
      raise ConfigError(f"{root}: variant '{variant}' is for diffusers folders, not single files")
    from persona_jax.convert.single_file import load_single_file
    return load_single_file(root, config_dir=config_dir, prediction_type=prediction_type,
                            dtype=dtype, allow_pickle=allow_pickle, attention=attention)
  if config_dir is not None or prediction_type is not None:
    raise ConfigError(f"{root}: config_dir and prediction_type are for single-file checkpoints "
                      "(a .safetensors file); a diffusers folder has its own configs")
  return read_folder(root, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                     attention=attention)


def save_pipeline(pipe: Pipeline, path, *, overwrite: bool = False, dtype=None,
                  variant: str | None = None) -> Path:
  """Writes `pipe` as a diffusers folder, atomically (a temporary folder, then rename).

  Args:
    path: the output folder. An existing non-empty folder is an error unless `overwrite`.
    dtype: the dtype of the written tensors (default: the params' own), e.g. np.float16.
    variant: write `*.{variant}.safetensors` names (diffusers' `variant=`).
  """
  return write_folder(pipe, path, overwrite=overwrite, dtype=dtype, variant=variant)
