"""PhotoMaker's training data: identity folders, each example a target image of one person and
up to N other images of the same person as its ID images (methods/photomaker.py).

  data.instance_dir/<identity>/NAME.png (.jpg, .jpeg, .webp)
                              /NAME.txt  optional caption; else `data.prompt`
A caption holds the trigger word exactly once, right after the class word ("a photo of a man img
in the snow"); an identity folder needs at least two images (a target and one ID image).

Each example (grain RandomMap, one draw per example): a target image of one identity (flipped
with `data.random_flip`), n ID images drawn without replacement from the identity's OTHER images,
n uniform in 1 .. min(N, images - 1). Keys: pixels [R, R, 3] (the target in [-1, 1]), ids / ids_2
(the caption), time_ids [6], photomaker_pixels [N, S, S, 3] (the ID images through CLIP's image
processor, zeros after the first n) and photomaker_num_images (n).

v2 (people with `embeddings`: `embed_faces`): ID images are drawn only among the person's images
with a face (the target may be any; at least two per person have one), and photomaker_id_embeds [N, D] holds their raw face
embeddings (zeros after the first n), as the official v2 pipeline pairs each ID image with its
face's embedding.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import grain
import numpy as np

from persona_jax.data import images as img_ops
from persona_jax.data.batch import PIXELS, TIME_IDS
from persona_jax.data.clip_images import preprocess_image
from persona_jax.data.images import DataError
from persona_jax.data.pipeline import micro_conditioning
from persona_jax.methods.photomaker_conditioning import ID_COUNT, ID_EMBEDS, ID_PIXELS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class Person:
  """One identity's images (uint8 [R, R, 3], center-cropped squares) and captions."""
  name: str
  images: list
  captions: list
  files: list                     # where each caption came from (for errors)
  embeddings: list | None = None  # v2: float32 [D] raw face embedding per image, None: no face


def read_folders(root, resolution: int, prompt: str = "") -> list[Person]:
  """The identities of `root` (module docstring), by folder name; images by file name."""
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"data.instance_dir: {root} is not a folder of identity folders")
  people = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
      raise DataError(f"{folder}: {len(files)} image(s); an identity needs at least two (a target "
                      "and an ID image of the same person)")
    images, captions, sources = [], [], []
    for f in files:
      image = img_ops.load_image(f)
      images.append(img_ops.center_crop(img_ops.resize_shorter_side(image, resolution), resolution))
      text = f.with_suffix(".txt")
      if text.is_file():
        captions.append(" ".join(text.read_text(encoding="utf-8").split()))
        sources.append(str(text))
      elif prompt:
        captions.append(prompt)
        sources.append("data.prompt")
      else:
        raise DataError(f"{f}: no caption ({text.name}) and no data.prompt; write one that names "
                        "the class word followed by the trigger word, e.g. 'a photo of a man img'")
    people.append(Person(folder.name, images, captions, sources))
  if not people:
    raise DataError(f"data.instance_dir: {root} holds no identity folders (one folder per person)")
  return people


def check_captions(people: list[Person], tokenize: Callable, trigger_id: int, word: str) -> None:
  """Every caption holds the trigger word once, after a class word (DataError naming its file)."""
  for person in people:
    ids = tokenize(person.captions)
    for row, caption, source in zip(ids, person.captions, person.files):
      where = np.flatnonzero(row == trigger_id)
      if len(where) != 1 or where[0] < 2:
        raise DataError(f"{source}: caption '{caption}' must hold the trigger word '{word}' once, "
                        f"right after the class word (e.g. 'a photo of a man {word}')")


def embed_faces(people: list[Person], analysis) -> list[Person]:
  """`people` with `embeddings`: each image's face by `analysis` (face/analysis.py's FaceAnalysis),
  the first detected as PhotoMaker v2 picks it (retrying at smaller detection sizes), raw
  embedding; None where no face is found (logged). A person with fewer than two images with a
  face is a DataError naming it (each target needs another image's face)."""
  from persona_jax.face.analysis import PHOTOMAKER_V2_DET_SIZES, PIPELINE_PICKS, pick
  out = []
  for person in people:
    embeddings = []
    for image, source in zip(person.images, person.files):
      faces = analysis.analyze(image, det_sizes=PHOTOMAKER_V2_DET_SIZES)
      if not faces:
        log.warning("%s (%s): no face found; not used as an ID image", person.name, source)
        embeddings.append(None)
        continue
      face = pick(faces, PIPELINE_PICKS["photomaker_v2"], f"{person.name} ({source})")
      embeddings.append(np.asarray(face.embedding, np.float32))
    found = sum(e is not None for e in embeddings)
    if found < 2:
      raise DataError(f"{person.name}: a face found in {found} of {len(embeddings)} images; "
                      "PhotoMaker v2 needs at least two where the face is clearly visible (a "
                      "target's ID images are the person's other photos)")
    out.append(dataclasses.replace(person, embeddings=embeddings))
  return out


def pick_references(rng: np.random.Generator, count: int, target: int, most: int,
                    eligible=None) -> np.ndarray:
  """n indices of [0, count) (of `eligible`, default all) other than `target`, without
  replacement, n uniform in 1 .. min(most, candidates)."""
  pool = range(count) if eligible is None else eligible
  others = np.asarray([k for k in pool if k != target])
  n = int(rng.integers(1, min(most, len(others)) + 1))
  return rng.choice(others, n, replace=False)


@dataclasses.dataclass
class Examples(grain.transforms.RandomMap):
  """Index of a (person, target) pair -> one training example (module docstring)."""
  people: list
  pairs: list                          # [(person index, image index)]
  tokenize: Callable                   # list[str] -> {ids key: [B, L]}
  processor: object                    # CLIPImageProcessorConfig
  num_references: int
  random_flip: float

  def random_map(self, index, rng: np.random.Generator):
    p, j = self.pairs[index]
    person = self.people[p]
    image = person.images[j]
    if rng.random() < self.random_flip:
      image = image[:, ::-1]
    faces = person.embeddings
    eligible = None if faces is None else [k for k, e in enumerate(faces) if e is not None]
    refs = pick_references(rng, len(person.images), j, self.num_references, eligible)
    h, w = self.processor.crop_size
    pixels = np.zeros((self.num_references, h, w, 3), np.float32)
    for slot, k in enumerate(refs):
      pixels[slot] = preprocess_image(person.images[k], self.processor)
    r = image.shape[0]
    out = {PIXELS: img_ops.to_model_range(np.ascontiguousarray(image)),
           TIME_IDS: micro_conditioning((r, r), 0, 0, (r, r)),
           ID_PIXELS: pixels, ID_COUNT: np.int32(len(refs))}
    if faces is not None:
      embeds = np.zeros((self.num_references, len(faces[refs[0]])), np.float32)
      for slot, k in enumerate(refs):
        embeds[slot] = faces[k]
      out[ID_EMBEDS] = embeds
    out.update({k: v[0] for k, v in self.tokenize([person.captions[j]]).items()})
    return out


def make_dataset(people: list[Person], tokenize: Callable, processor, num_references: int,
                 random_flip: float, batch_size: int, seed: int):
  """The infinite, reshuffled-every-epoch batch dataset over every (person, target) pair."""
  pairs = [(p, j) for p, person in enumerate(people) for j in range(len(person.images))]
  examples = Examples(people, pairs, tokenize, processor, num_references, random_flip)
  return (grain.MapDataset.source(list(range(len(pairs)))).seed(seed).shuffle()
          .repeat().random_map(examples).batch(batch_size, drop_remainder=True))
