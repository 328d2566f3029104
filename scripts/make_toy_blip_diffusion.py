"""Writes the toy BLIP-Diffusion base (persona_jax/world/toy_blip_diffusion.py): the toy SD 1.x
base's UNet, VAE, scheduler, tokenizer and text encoder (as the context text encoder) with a
fresh 4-layer Q-Former whose vision tower is the toy CLIP image encoder, in the released layout.

  python scripts/make_toy_blip_diffusion.py runs/toy-blip-diffusion [--base MODEL] [--seed 0]
"""

import argparse
import sys
from pathlib import Path

from persona_jax.errors import PersonaError
from persona_jax.world.toy_blip_diffusion import write_toy_blip_diffusion


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder", type=Path, help="the new BLIP-Diffusion folder")
  p.add_argument("--base", type=Path, default=None,
                 help="a toy SD 1.x folder with image_encoder/ (default: the embedded toy base)")
  p.add_argument("--seed", type=int, default=0, help="the fresh Q-Former's initialization")
  p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
  args = p.parse_args()
  try:
    print(write_toy_blip_diffusion(args.folder, base=args.base, seed=args.seed,
                                   overwrite=args.overwrite))
  except PersonaError as e:
    sys.exit(f"make_toy_blip_diffusion: {e}")


if __name__ == "__main__":
  main()
