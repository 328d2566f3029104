"""FastComposer's toy-world examples: the `fastcomposer:tiny` config's data source
(`data.source = "persona_jax.world.fastcomposer_data:toy_source"`).

Each example is a rendered training scene captioned with the marker after the class word and
without the look (the subject's identity, which the image carries, as FFHQ captions do not
describe a face), its coverage as the mask; with two or more subjects per example every second
one holds two objects.
"""

from __future__ import annotations

import numpy as np

from persona_jax.data.fastcomposer import IMAGE_TOKEN, Example
from persona_jax.world import scenes


def toy_examples(n: int, resolution: int, seed: int = 0, pairs: bool = False) -> list[Example]:
  """`n` toy-world training scenes: render, caption with the marker after the class word,
  coverage as the mask. Captions never say the look (colours and pattern): it is the subject's
  identity, which the image carries, as FFHQ captions do not describe a face. With `pairs`, every
  second example holds two subjects (scene k's object on the left, scene k+1's on the right over
  the same background; "a photo of a ball <|image|> and a box <|image|> on BG", the left one's
  mask without the right one's cover)."""
  import dataclasses as dc

  out = []
  for i in range(n):
    scene = scenes.sample_scene(seed, "train", i)
    if pairs and i % 2:
      other = scenes.sample_scene(seed, "train", n + i)
      left = dc.replace(scene, size="small", position="left")
      right = dc.replace(other, size="small", position="right", background=scene.background)
      a, b = scenes.coverage(left, resolution), scenes.coverage(right, resolution)
      image = np.where((b >= 0.5)[..., None], scenes.render(right, resolution),
                       scenes.render(left, resolution))
      caption = (f"a photo of a {left.cls} {IMAGE_TOKEN} and a {right.cls} {IMAGE_TOKEN} "
                 f"{scenes.background_phrase(left.background)}")
      out.append(Example(image, caption, np.stack([a * (b < 0.5), b]).astype(np.float32)))
      continue
    caption = scenes.caption(scene, look=False).replace(f" {scene.cls}", f" {scene.cls} {IMAGE_TOKEN}", 1)
    out.append(Example(scenes.render(scene, resolution), caption,
                       scenes.coverage(scene, resolution)[None].astype(np.float32)))
  return out


def toy_source(request):
  """A data source (train/data_sources.py): `data.num_images` (default 16) toy examples of the
  run's seed at `data.resolution`, for method fastcomposer."""
  from persona_jax.methods.fastcomposer import examples_source, run_options
  d, config = request.config.data, request.config
  pairs = run_options(request).max_subjects >= 2
  return examples_source(request, toy_examples(d.num_images or 16, d.resolution, config.seed,
                                               pairs=pairs))
