"""`persona-jax make-toy-model --workdir DIR [--xl]`: pre-train the toy-world base
(world/toy_model.py) or, with --xl, the toy SDXL base grown from it (world/toy_xl.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "make-toy-model"
HELP = "pre-train the toy-world base model from scratch (resumable; hours on CPU)"


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated integers, e.g. 2,2,1")


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, type=Path,
                 help="stages go to WORKDIR/{world,vae,init,unet}; the same command resumes")
  p.add_argument("--images", type=int, default=20000, help="rendered training scenes")
  p.add_argument("--vae-steps", type=int, default=3000)
  p.add_argument("--unet-steps", type=int, default=None, help="default: configs/toy_pretrain.py's")
  p.add_argument("--batch-size", type=int, default=None, help="default: configs/toy_pretrain.py's")
  p.add_argument("--stop-after-init", action="store_true",
                 help="only the scene folder, the VAE and the initial pipeline")
  p.add_argument("--start-from", type=Path, default=None, metavar="MODEL",
                 help="continue pre-training from a toy pipeline folder (an earlier sitting's "
                      "snapshot, or persona_jax/assets/toy_base) instead of a fresh VAE and UNet")
  p.add_argument("--grow-layers", type=_int_list, default=None, metavar="N,N,N",
                 help="with --start-from: deepen the UNet to these layers per block first "
                      "(new layers start as the identity, so it computes the same function)")
  p.add_argument("--lr", type=float, default=None, help="default: configs/toy_pretrain.py's")
  p.add_argument("--xl", action="store_true",
                 help="the toy SDXL base (toy-xl): grown from the SD 1.x base (--start-from, "
                      "default the shipped one) and pre-trained on the world with its identity "
                      "scenes; --images defaults to 40000, --unet-steps to 4500")


def run(args) -> int:
  if args.xl:
    return _run_xl(args)
  from persona_jax.world.toy_model import VAETraining, build_base, pretrain
  vae = VAETraining(steps=args.vae_steps)
  if args.stop_after_init:
    print(build_base(args.workdir, num_images=args.images, vae=vae, start_from=args.start_from,
                     grow_layers=args.grow_layers))
    return 0
  result = pretrain(args.workdir, num_images=args.images, vae=vae, unet_steps=args.unet_steps,
                    batch_size=args.batch_size, start_from=args.start_from,
                    grow_layers=args.grow_layers, lr=args.lr)
  for path in result["outputs"] + ([result["samples"]] if result["samples"] else []):
    print(path)
  return 0


def _run_xl(args) -> int:
  import dataclasses

  from persona_jax.errors import ConfigError
  from persona_jax.world import toy_xl
  if args.grow_layers is not None:
    raise ConfigError("--grow-layers deepens the SD 1.x base; it does not apply with --xl")
  images = args.images if args.images != 20000 else 40000
  if args.stop_after_init:
    print(toy_xl.build_xl_base(args.workdir, num_images=images, start_from=args.start_from))
    return 0
  given = {k: v for k, v in (("steps", args.unet_steps), ("batch_size", args.batch_size),
                              ("lr", args.lr)) if v is not None}
  print(toy_xl.pretrain_xl(args.workdir, dataclasses.replace(toy_xl.XLTraining(), **given),
                           num_images=images, start_from=args.start_from))
  return 0
