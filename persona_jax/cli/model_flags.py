"""The flags that name the base model of a command (`sample`, `make-class-images`)."""

from __future__ import annotations

from pathlib import Path


def add_model_flags(p) -> None:
  p.add_argument("--model", default=None,
                 help="a diffusers folder or an original single-file .safetensors (default: the "
                      "embedded default model)")
  p.add_argument("--config", type=Path, default=None, metavar="DIR",
                 help="with a single-file --model (.safetensors): a diffusers folder of the same "
                      "family giving what the file does not say (head counts, scheduler)")
  p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                 help="with a single-file --model and no --config: the model's prediction type "
                      "(standard SD 1.x/2.x or SDXL base widths are then inferred from the "
                      "weights; SDXL: epsilon; default: none, so a single file needs this or "
                      "--config)")
  p.add_argument("--variant", default=None,
                 help="weight-file variant, e.g. fp16 (default: none: the plain weight files)")
  p.add_argument("--allow-pickle", action="store_true", help="read .bin/.ckpt files (trusted only)")


def load_model(args, model=None):
  """The pipeline the flags name (`model`: the folder to load, default --model's or the
  embedded default; a pipeline folder a method owns, e.g. BLIP-Diffusion's, by its loader)."""
  from persona_jax.default_model import resolve_model
  from persona_jax.methods.registry import load_model as load_any
  single_file = {k: v for k, v in (("config_dir", args.config),
                                   ("prediction_type", args.prediction_type)) if v is not None}
  return load_any(resolve_model(model if model is not None else args.model),
                  variant=args.variant, allow_pickle=args.allow_pickle, **single_file)
