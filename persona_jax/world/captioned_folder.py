"""A folder of toy-world image-caption pairs with subject masks, the training data of
tuning-free methods that learn a class from pairs (InstantBooth): for scene k of the training
split (class `cls` only, when given), NAME.png, NAME.txt (its caption with the identifier before
the class word, optional parts dropped at random; the look, i.e. colours and pattern, only with
`look`: a tuning-free method must take it from the image, as a real subject's identity is in
its pictures and not its caption) and NAME.mask.png (`scenes.coverage`, white =
object; data/sources.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from persona_jax.world import scenes


def write_captioned_folder(folder, n: int, *, cls: str | None = "ball", identifier: str = "sks",
                           size: int = 32, seed: int = 0, look: bool = False) -> Path:
  """Writes `n` scenes (NAME = 00000, 00001, ...) into `folder`; returns it."""
  if cls is not None and cls not in scenes.CLASSES:
    raise ValueError(f"cls: '{cls}' is not a class of the toy world ({', '.join(scenes.CLASSES)})")
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  k = written = 0
  while written < n:
    scene = scenes.sample_scene(seed, "train", k)
    k += 1
    if cls is not None and scene.cls != cls:
      continue
    name = f"{written:05d}"
    Image.fromarray(scenes.render(scene, size)).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(scenes.caption(scene, rng, identifier=identifier,
                                                             look=look) + "\n")
    mask = (scenes.coverage(scene, size) * 255).round().astype(np.uint8)
    Image.fromarray(mask).save(folder / f"{name}.mask.png")
    written += 1
  return folder
