"""BLIP-Diffusion's toy-world examples (data/blip_diffusion.py's SubjectExample):

  stage 2 (`pretraining_examples`): training-split scenes (no held-out look). The subject input
    is the scene re-rendered on a random other background: the paper's matted subject on a random
    background image, here with the world's exact coverage, so a pixel the object covers fully
    is the target's, one it does not touch is the new background's, and edge pixels mix the two
    by coverage as an alpha composite of the true foreground does. The new background is never
    the target's nor one of the object's colours (`replacement_background`). The target is the
    scene on its own background; the caption "a {class}" then, as the world's captions drop them,
    the position (kept half the time) and the background (kept 80%): the text, not the input,
    says where the subject is.
  fine-tuning (`subject_examples`): a subject's reference scenes, each both input and target,
    captioned "a {class}" (LAVIS's subject_driven_t2i_dataset.py).

The category, the Q-Former's text, is the class word. Scene k of a seed is the same everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from persona_jax.data.blip_diffusion import SubjectExample, training_caption
from persona_jax.world import scenes

POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}


def replacement_background(scene: scenes.Scene, seed: int, index: int) -> str:
  """The random background of training scene `index`'s subject input: any of the world's
  backgrounds but the scene's own and the object's colours."""
  taken = {scene.background, scene.look.colour, scene.look.pattern_colour}
  options = [b for b in scenes.BACKGROUNDS if b not in taken]
  rng = np.random.default_rng([seed & 0xFFFFFFFF, index, 0xB11D])
  return options[int(rng.integers(len(options)))]


def pretraining_caption(scene: scenes.Scene, rng: np.random.Generator) -> str:
  """"a {class}", then the position (p 0.5) and the background (p 0.8)."""
  context = []
  if rng.random() < 0.5:
    context.append(POSITION_PHRASES[scene.position])
  if rng.random() < 0.8:
    context.append(scenes.background_phrase(scene.background))
  return training_caption(scene.cls, " ".join(context))


def pretraining_examples(n: int, resolution: int = 32, blip_size: int = 32, seed: int = 0,
                         start: int = 0) -> list[SubjectExample]:
  """Training scenes start .. start + n - 1 of `seed` as stage-2 examples (module docstring)."""
  out = []
  for k in range(start, start + n):
    scene = scenes.sample_scene(seed, "train", k)
    moved = dataclasses.replace(scene, background=replacement_background(scene, seed, k))
    rng = np.random.default_rng([seed & 0xFFFFFFFF, k, 0xCA97])
    out.append(SubjectExample(scenes.render(moved, blip_size), scenes.render(scene, resolution),
                              scene.cls, pretraining_caption(scene, rng)))
  return out


def subject_examples(subject: scenes.Subject, n: int, resolution: int = 32, blip_size: int = 32,
                     seed: int = 0) -> list[SubjectExample]:
  """A subject's `n` reference scenes as fine-tuning examples: input = target, "a {class}"."""
  return [SubjectExample(scenes.render(s, blip_size), scenes.render(s, resolution), subject.cls,
                         training_caption(subject.cls))
          for s in scenes.subject_scenes(subject, n, seed)]


def toy_pretraining_source(request):
  """A data source (train/data_sources.py) for blip_diffusion stage 2: `data.num_images`
  (default 64) training scenes of the run's seed at `data.resolution`, the subject input at the
  Q-Former's image size."""
  from persona_jax.methods.blip_diffusion_training import examples_source
  d = request.config.data
  size = request.pipe.qformer_config.vision_config.image_size
  return examples_source(request, pretraining_examples(d.num_images or 64, d.resolution, size,
                                                       request.config.seed))


def held_out_subject(cls: str) -> scenes.Subject:
  """The first held-out subject of class `cls` (the world's subjects() order)."""
  for subject in scenes.subjects():
    if subject.cls == cls:
      return subject
  from persona_jax.errors import ConfigError
  raise ConfigError(f"method.subject_class: '{cls}' is not a toy-world class "
                    f"({', '.join(scenes.CLASSES)})")


def toy_subject_source(request):
  """A data source for blip_diffusion fine-tuning: `data.num_images` (default 4) reference scenes
  of the first held-out subject of class `method.subject_class`."""
  from persona_jax.methods.blip_diffusion_training import examples_source, run_options
  d = request.config.data
  size = request.pipe.qformer_config.vision_config.image_size
  subject = held_out_subject(run_options(request).subject_class.strip())
  return examples_source(request, subject_examples(subject, d.num_images or 4, d.resolution, size,
                                                   request.config.seed))
