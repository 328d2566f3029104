"""`persona-jax make-random-model OUT`: a small random-weight pipeline (diffusers layout)."""

from __future__ import annotations

from pathlib import Path

NAME = "make-random-model"
HELP = "write a small random-weight pipeline (diffusers layout)"


def add_arguments(p) -> None:
  p.add_argument("out", type=Path, help="output folder")
  from persona_jax.methods.registry import random_presets
  extra = random_presets()
  p.add_argument("--preset", choices=("sd1", "sd2", "sdxl", *extra), default="sd1",
                 help="sd1: conv projections, epsilon; sd2: linear projections, per-block heads, "
                      "v-prediction; sdxl: SDXL's layout (two text encoders, added "
                      "conditioning, Euler)" + "".join(f"; {name}: {s.name}'s own pipeline folder"
                                                       for name, s in extra.items()))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true", help="replace an existing folder")


def run(args) -> int:
  from persona_jax.methods.registry import load_model, random_presets
  from persona_jax.random_model import make_random_model
  owner = random_presets().get(args.preset)
  if owner is not None:
    out = owner.pipeline.make_random(args.out, seed=args.seed, overwrite=args.overwrite)
  else:
    out = make_random_model(args.out, args.preset, args.seed, overwrite=args.overwrite)
  print(describe(load_model(out)))
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
  for name in sorted(set(counts) - {"unet", "text_encoder", "text_encoder_2", "vae"}):
    lines.append(f"  {name:13s} {'':22s}{counts[name]:>11,d} params")
  if pipe.is_sdxl:
    t2 = pipe.text_encoder_2_config
    lines[3:3] = [
        f"  text_encoder_2 CLIPTextModelWithProjection {counts['text_encoder_2']:>6,d} params  "
        f"{t2.num_hidden_layers} layers x {t2.hidden_size}, {t2.hidden_act}, projection "
        f"{t2.projection_dim}",
    ]
    lines.append(f"  tokenizer_2   CLIPTokenizer         {len(pipe.tokenizer_2):>11,d} tokens  "
                 f"pad id {pipe.tokenizer_2.pad_token_id}")
    lines.append(f"  SDXL          added conditioning {u.addition_embed_type}, "
                 f"force_zeros_for_empty_prompt {pipe.force_zeros_for_empty_prompt}")
  return "\n".join(lines)
