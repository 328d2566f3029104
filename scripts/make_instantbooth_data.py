"""Renders toy-world image-caption pairs with subject masks for InstantBooth (and IP-Adapter)
training. Captions do not say the look (colours and pattern) unless --look: the method must take
it from the image.

  python scripts/make_instantbooth_data.py runs/ib_data --images 2000 --class ball
  persona-jax train --config instantbooth:tiny --workdir runs/ib \\
      --config.data.instance_dir=runs/ib_data --config.data.caption_source=files --config.steps=3000
  python scripts/make_instantbooth_data.py runs/ip_data --images 4000 --class any --identifier ""
  persona-jax train --config ip_adapter:tiny --workdir runs/ip \\
      --config.data.instance_dir=runs/ip_data --config.data.caption_source=files --config.steps=3000
"""

import argparse
from pathlib import Path

from persona_jax.world.captioned_folder import write_captioned_folder


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder", type=Path)
  p.add_argument("--images", type=int, default=2000)
  p.add_argument("--class", dest="cls", default="ball", help="one class of the toy world; 'any': all")
  p.add_argument("--identifier", default="sks")
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--look", action="store_true", help="captions say the colours and pattern")
  args = p.parse_args()
  print(write_captioned_folder(args.folder, args.images, cls=None if args.cls == "any" else args.cls,
                               identifier=args.identifier, size=args.size, seed=args.seed, look=args.look))


if __name__ == "__main__":
  main()
