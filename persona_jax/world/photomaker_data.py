"""PhotoMaker's toy-world identity data (data/photomaker.py's layout): K training identities
(world/identities.py) x M scenes each, captioned with the trigger word right after the class word
("a photo of a large red ball img on grass"); the `photomaker:tiny` config's data source
(`data.source = "persona_jax.world.photomaker_data:toy_source"`) and a folder writer. For v2 each
image's face embedding is the toy identity encoder's (ArcFace's stand-in) on the scene's true
keypoints: the world's faces are always found, as in photos chosen for clear faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persona_jax.data.photomaker import Person
from persona_jax.world import identities


def with_trigger(caption: str, cls: str, word: str) -> str:
  """The caption with `word` inserted after its first class word."""
  words = caption.split()
  at = words.index(cls) + 1
  return " ".join(words[:at] + [word] + words[at:])


def toy_people(num_identities: int, scenes_per_identity: int, resolution: int = 32,
               seed: int = 0, word: str = "img", faces: bool = False) -> list[Person]:
  """Identities 0 .. K-1 of the training split, M rendered scenes each (`faces`: with each
  image's face embedding [512], for v2)."""
  people = []
  for k in range(num_identities):
    who = identities.identity(k)
    images, captions, embeddings = [], [], []
    for m in range(scenes_per_identity):
      scene = identities.identity_scene(seed, "train", m, who=who)
      images.append(identities.render(scene, resolution))
      rng = np.random.default_rng((seed, k, m))
      captions.append(with_trigger(identities.caption(scene, rng), who.cls, word))
      if faces:
        embeddings.append(face_embedding(scene, images[-1], resolution))
    people.append(Person(f"identity_{k:04d}", images, captions, [f"toy identity {k}"] * len(images),
                         embeddings if faces else None))
  return people


def face_embedding(scene, image, resolution: int) -> np.ndarray:
  """float32 [512]: the toy identity encoder's raw embedding of the scene's identity, aligned by
  its true keypoints."""
  from persona_jax.face.recognition import shipped_toy_recognizer
  from persona_jax.world.toy_identity_encoder import face_keypoints
  return shipped_toy_recognizer().embed_faces(image, face_keypoints(scene, resolution)[:1])[0]


def write_identity_folders(folder, num_identities: int, scenes_per_identity: int,
                           resolution: int = 32, seed: int = 0, word: str = "img") -> Path:
  """`toy_people` as folder/<identity>/NNN.png + NNN.txt (data.instance_dir of a photomaker run)."""
  from PIL import Image
  folder = Path(folder)
  for person in toy_people(num_identities, scenes_per_identity, resolution, seed, word):
    out = folder / person.name
    out.mkdir(parents=True, exist_ok=True)
    for n, (image, caption) in enumerate(zip(person.images, person.captions)):
      Image.fromarray(image).save(out / f"{n:03d}.png")
      (out / f"{n:03d}.txt").write_text(caption + "\n", encoding="utf-8")
  return folder


def toy_source(request):
  """A data source (train/data_sources.py) for method photomaker: `data.num_images` (default 8)
  identities x 4 scenes at `data.resolution`, of the run's seed."""
  from persona_jax.methods.photomaker import examples_source, run_options
  d = request.config.data
  options = run_options(request)
  return examples_source(request, toy_people(d.num_images or 8, 4, d.resolution,
                                             request.config.seed, options.trigger_word,
                                             faces=options.version == "v2"))
