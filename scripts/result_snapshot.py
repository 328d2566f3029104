"""Fixed-seed tiny runs of every method, their result arrays and samples, to compare two versions.

  python scripts/result_snapshot.py run OUT [--methods NAME ...]     # train + sample, write OUT/*.npz
  python scripts/result_snapshot.py compare BEFORE AFTER              # exit 1 on any difference

Each method's `:tiny` config trains 3 steps (2 class images of 2 sampler steps where it takes
class images; a 2-step sample grid at the end) through `persona-jax train`, then samples one
image through `persona-jax sample` with the method's per-method flag (the interface both
versions share) and, where the version has it, through `sample --run WORKDIR` too. OUT/NAME.npz
holds every tensor of the run's result files (`result/<file>/<key>`), the train-time grid
(`grid`) and the samples (`sample`, `sample_run`). `compare` checks every array of BEFORE
against AFTER bit for bit and prints the largest difference of those that differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "persona_jax" / "assets" / "example_subject"
CLASS_IMAGES = ["--config.data.num_class_images=2", "--config.data.class_sample_steps=2"]
# name: (config, extra train flags, sample flags given the workdir, prompt)
METHODS = {
    "textual_inversion": ("textual_inversion:tiny", [],
                          lambda w: ["--embedding", str(w / "learned_embeds.safetensors")],
                          "a photo of a <my-toy>"),
    "dreambooth": ("dreambooth:tiny", CLASS_IMAGES, lambda w: ["--model", str(w / "model")],
                   "a photo of a sks ball"),
    "lora": ("lora:tiny", [], lambda w: ["--lora", str(w / "lora.safetensors")],
             "a photo of a sks ball"),
    "custom_diffusion": ("custom_diffusion:tiny", CLASS_IMAGES,
                         lambda w: ["--custom-diffusion", str(w)], "a photo of a <new1> ball"),
    "e4t_pretrain": ("e4t_pretrain:tiny", [],
                     lambda w: ["--e4t", str(w), "--image", str(EXAMPLE / "00.png")],
                     "a photo of a *s"),
    "e4t_tune": ("e4t_tune:tiny", [],
                 lambda w: ["--e4t", str(w), "--image", str(EXAMPLE / "00.png")],
                 "a photo of a *s"),
    "instantbooth": ("instantbooth:tiny", [],
                     lambda w: ["--instantbooth", str(w), "--image", str(EXAMPLE / "00.png"),
                                "--image", str(EXAMPLE / "01.png")],
                     "a photo of a sks ball"),
    "ip_adapter": ("ip_adapter:tiny", [],
                   lambda w: ["--ip-adapter", str(w / "ip_adapter.safetensors"), "--image",
                              str(EXAMPLE / "00.png")], "a photo of a ball on grass"),
    "fastcomposer": ("fastcomposer:tiny", [],
                     lambda w: ["--fastcomposer", str(w), "--image", str(EXAMPLE / "00.png")],
                     "a photo of a ball <|image|> on grass"),
}
IMAGE_FLAGS = ("--image",)


def _cli(argv: list[str]) -> None:
  from persona_jax.cli import main
  code = main(argv)
  if code:
    raise SystemExit(f"persona-jax {' '.join(argv)}: exit {code}")


def _png(path: Path) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(path).convert("RGB"))


def _result_arrays(workdir: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  out = {}
  skip = ("checkpoints", "class_images", "samples")
  for path in sorted(workdir.rglob("*.safetensors")):
    rel = path.relative_to(workdir)
    if rel.parts[0] in skip:
      continue
    for key, value in load_file(str(path)).items():
      out[f"result/{rel}/{key}"] = value
  return out


def run(out: Path, names: list[str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  root = Path(tempfile.mkdtemp(prefix="snapshot-"))
  for name in names:
    config, extra, sample_flags, prompt = METHODS[name]
    workdir = root / name
    _cli(["train", "--config", config, "--workdir", str(workdir), "--noprogress",
          "--config.steps=3", "--config.checkpoint_every=3", "--config.log_every=1",
          "--config.sample_steps=2", "--config.sample_images=1", *extra])
    arrays = _result_arrays(workdir)
    grids = sorted((workdir / "samples").glob("*.png"))
    if grids:
      arrays["grid"] = _png(grids[-1])
    common = ["--prompt", prompt, "--steps", "2", "--seed", "0", "--batch-size", "1"]
    _cli(["sample", *sample_flags(workdir), *common, "--out", str(root / f"{name}-sample")])
    arrays["sample"] = _png(root / f"{name}-sample" / "0000_0000.png")
    if _has_run_flag():
      images = [a for i, a in enumerate(sample_flags(workdir)) if i and
                sample_flags(workdir)[i - 1] in IMAGE_FLAGS]
      image_args = [x for p in images for x in ("--image", p)]
      _cli(["sample", "--run", str(workdir), *image_args, *common,
            "--out", str(root / f"{name}-run")])
      arrays["sample_run"] = _png(root / f"{name}-run" / "0000_0000.png")
    np.savez(out / f"{name}.npz", **arrays)
    print(f"{name}: {len(arrays)} arrays -> {out / (name + '.npz')}", flush=True)


def _has_run_flag() -> bool:
  from persona_jax.cli import build_parser
  sample = build_parser()._subparsers._group_actions[0].choices["sample"]
  return any("--run" in a.option_strings for a in sample._actions)


def compare(before: Path, after: Path) -> int:
  bad = 0
  for path in sorted(before.glob("*.npz")):
    other = after / path.name
    if not other.is_file():
      print(f"{path.stem}: missing in {after}")
      bad += 1
      continue
    a, b = np.load(path), np.load(other)
    keys = sorted(set(a.files) | set(b.files))
    for key in keys:
      if key not in a.files or key not in b.files:
        if key == "sample_run":            # only the newer version samples with --run
          continue
        print(f"{path.stem}: {key} only in {'after' if key in b.files else 'before'}")
        bad += 1
        continue
      x, y = a[key], b[key]
      if x.shape != y.shape or not np.array_equal(x, y):
        diff = (np.abs(x.astype(np.float64) - y.astype(np.float64)).max()
                if x.shape == y.shape else f"shapes {x.shape} vs {y.shape}")
        print(f"{path.stem}: {key} differs (max |diff| {diff})")
        bad += 1
    if "sample_run" in b.files and not np.array_equal(b["sample_run"], b["sample"]):
      print(f"{path.stem}: sample --run differs from the per-method flag's sample")
      bad += 1
    print(f"{path.stem}: {len(keys)} arrays compared")
  print("equal" if not bad else f"{bad} difference(s)")
  return 1 if bad else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("run")
  p.add_argument("out", type=Path)
  p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
  p = sub.add_parser("compare")
  p.add_argument("before", type=Path)
  p.add_argument("after", type=Path)
  args = parser.parse_args()
  os.environ.setdefault("PERSONA_JAX_NO_REEXEC", "1")
  if args.command == "run":
    run(args.out, args.methods)
    return 0
  return compare(args.before, args.after)


if __name__ == "__main__":
  sys.exit(main())
