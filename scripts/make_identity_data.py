"""Renders the toy world's training identities for the identity benchmark's tuning-free rows
(BENCHMARKS.md, "Identities"): K identities x M scenes.

  python scripts/make_identity_data.py runs/id_data --identities 1000 --scenes 4
    a flat folder NAME.png + NAME.txt, captions that say class, colour, pattern and background
    but never the mark or proportions ("a photo of a red ball on grass"): IP-Adapter's data
    (`--config.data.instance_dir=runs/id_data --config.data.caption_source=files`);
  python scripts/make_identity_data.py runs/pm_data --identities 1000 --scenes 4 --folders
    one folder per identity with the trigger word after the class word ("a photo of a red ball
    img on grass"): PhotoMaker's folder data (`photomaker:tiny` renders the same in memory).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from persona_jax.world import identities
from persona_jax.world.photomaker_data import write_identity_folders


def write_flat(folder: Path, num_identities: int, scenes: int, size: int, seed: int) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  for k in range(num_identities):
    who = identities.identity(k)
    for m in range(scenes):
      scene = identities.identity_scene(seed, "train", m, who=who)
      name = f"{k:04d}_{m:02d}"
      Image.fromarray(identities.render(scene, size)).save(folder / f"{name}.png")
      caption = identities.caption(scene, np.random.default_rng((seed, k, m)))
      (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
  return folder


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder", type=Path)
  p.add_argument("--identities", type=int, default=1000)
  p.add_argument("--scenes", type=int, default=4)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--folders", action="store_true", help="one folder per identity (PhotoMaker)")
  args = p.parse_args()
  if args.folders:
    print(write_identity_folders(args.folder, args.identities, args.scenes, args.size, args.seed))
  else:
    print(write_flat(args.folder, args.identities, args.scenes, args.size, args.seed))


if __name__ == "__main__":
  main()
