"""The `persona-jax` console script: thin subcommands over library functions.

Each subcommand parses its flags and calls one function that tests call too. A `PersonaError`
(bad input) is printed as one line without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from persona_jax.errors import PersonaError


def _make_random_model(args) -> int:
  from persona_jax.pipeline import load_pipeline
  from persona_jax.random_model import make_random_model
  out = make_random_model(args.out, args.preset, args.seed, overwrite=args.overwrite)
  pipe = load_pipeline(out)
  print(describe(pipe))
  return 0


def describe(pipe) -> str:
  """A short report of a pipeline's components: class, size, key config values."""
  counts = pipe.num_params()
  u, t, v, s = pipe.unet_config, pipe.text_encoder_config, pipe.vae_config, pipe.scheduler_config
  lines = [
      f"model {pipe.path}",
      f"  unet          UNet2DConditionModel  {counts['unet']:>11,d} params  "
      f"blocks {list(u.block_out_channels)}, heads {list(u.heads_per_block)}, "
      f"cross_attention_dim {u.cross_attention_dims[0]}, "
      f"{'linear' if u.use_linear_projection else 'conv'} proj",
      f"  text_encoder  CLIPTextModel         {counts['text_encoder']:>11,d} params  "
      f"{t.num_hidden_layers} layers x {t.hidden_size}, {t.hidden_act}, vocab {t.vocab_size}",
      f"  vae           AutoencoderKL         {counts['vae']:>11,d} params  "
      f"blocks {list(v.block_out_channels)}, {v.latent_channels} latent channels, "
      f"downsample x{v.downsample_factor}, scaling_factor {v.scaling_factor}",
      f"  scheduler     {s.class_name:22s}  {s.beta_schedule}, {s.prediction_type}, "
      f"{s.num_train_timesteps} steps, spacing {s.timestep_spacing}",
      f"  tokenizer     CLIPTokenizer         {len(pipe.tokenizer):>11,d} tokens  "
      f"pad id {pipe.tokenizer.pad_token_id}",
  ]
  return "\n".join(lines)


def _verify(args) -> int:
  from persona_jax.verify import verify
  ok = verify(args.model, tolerance=args.tolerance, variant=args.variant,
              allow_pickle=args.allow_pickle, seed=args.seed)
  return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="persona-jax", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("make-random-model", help="write a small random-weight pipeline (diffusers layout)")
  p.add_argument("out", type=Path, help="output folder")
  p.add_argument("--preset", choices=("sd1", "sd2"), default="sd1",
                 help="sd1: conv projections, epsilon; sd2: linear projections, per-block heads, "
                      "v-prediction")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
  p.set_defaults(func=_make_random_model)

  p = sub.add_parser("verify", help="compare persona_jax with diffusers/transformers on a model folder")
  p.add_argument("model", type=Path, help="a diffusers folder (model_index.json, unet/, ...)")
  from persona_jax.verify import DEFAULT_TOLERANCE
  p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                 help="largest allowed relative error (default %(default)s)")
  p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
  p.add_argument("--allow-pickle", action="store_true",
                 help="read .bin/.ckpt pickle files (only files you trust)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=_verify)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(levelname).1s %(name)s: %(message)s")
  for noisy in ("jax", "absl", "orbax", "httpx", "urllib3"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from persona_jax.cache import enable_compilation_cache
  enable_compilation_cache()
  try:
    return args.func(args)
  except PersonaError as e:
    print(f"persona-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
