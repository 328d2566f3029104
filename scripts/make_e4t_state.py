"""Makes the small pre-trained E4T state shipped as package data (persona_jax/assets/e4t_tiny/),
which `persona-jax train --config e4t_tune:tiny` starts from.

  python scripts/make_e4t_state.py [--workdir runs/e4t_state] [--images 1024] [--steps 3000]

One command: renders a domain folder of toy-world balls (pre-training looks only: the evaluation
subjects' held-out looks are never shown), runs `e4t_pretrain:tiny` on it with the embedded
default model (its image_encoder/) for --steps, and copies the run's WORKDIR/run/e4t.safetensors
(the format every e4t_pretrain workdir's result has) to --out. The run is resumable: the same
command continues it.
"""

import argparse
import logging
import shutil
from pathlib import Path

from PIL import Image

from persona_jax.train.config import load_config
from persona_jax.train.config import run_config
from persona_jax.train.loop import train
from persona_jax.world import scenes

ROOT = Path(__file__).resolve().parents[1]


def render_domain(folder: Path, n: int, cls: str = "ball", size: int = 32, seed: int = 0) -> Path:
  """`n` scenes of class `cls` from the world's training split as PNGs (kept if already there)."""
  folder.mkdir(parents=True, exist_ok=True)
  if len(list(folder.glob("*.png"))) >= n:
    return folder
  k = written = 0
  while written < n:
    scene = scenes.sample_scene(seed, "train", k)
    k += 1
    if scene.cls != cls:
      continue
    Image.fromarray(scenes.render(scene, size)).save(folder / f"{written:05d}.png")
    written += 1
  return folder


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", type=Path, default=Path("runs/e4t_state"))
  p.add_argument("--out", type=Path, default=ROOT / "persona_jax" / "assets" / "e4t_tiny")
  p.add_argument("--model", default="default", help="base model (default: the embedded default)")
  p.add_argument("--images", type=int, default=1024, help="rendered balls in the domain folder")
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=2e-4)
  args = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
  domain = render_domain(args.workdir / "domain", args.images)
  c = load_config("e4t_pretrain:tiny")
  c.model = args.model
  c.data.instance_dir = str(domain)
  c.steps, c.batch_size, c.optim.lr = args.steps, args.batch_size, args.lr
  c.checkpoint_every, c.log_every = 250, 50
  result = train(run_config(c), args.workdir / "run")
  source = args.workdir / "run" / "e4t.safetensors"
  args.out.mkdir(parents=True, exist_ok=True)
  tmp = args.out / ".e4t.safetensors.tmp"
  shutil.copyfile(source, tmp)
  tmp.replace(args.out / "e4t.safetensors")
  print(args.out / "e4t.safetensors")
  if result["samples"]:
    print(result["samples"])


if __name__ == "__main__":
  main()
