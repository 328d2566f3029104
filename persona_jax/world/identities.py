"""The toy world's identity domain: the stand-in for faces.

An *identity* is one individual: a class and a look (as in `scenes`), plus what tells apart
identities of the same class and look, the way a face differs from another of the same age and
skin tone: a small round **mark** (its colour and its place on the object) and the object's
**proportions** (wider or taller, area kept). Captions never say the mark or the proportions
("a photo of a red ball on a blue background", like "a photo of a man"): only an identity encoder
(`world/toy_identity_encoder.py`, the stand-in for ArcFace) tells identities apart.

An identity is seen in many scenes: any size (radius 0.18-0.34 of the image side), position,
in-plane pose (rotation within +-0.5 rad, roughly upright as faces are) and background. Scenes
with two identities side by side (StoryMaker's setting) carry one coverage mask each.

Identities 0 .. NUM_TRAIN-1 are the training identities; NUM_TRAIN .. NUM_TRAIN+NUM_HELD_OUT-1
are held out: no "train"-split scene ever shows one (evaluation and the identity encoder's
verification pairs use them). Identity k is a function of k only; identity scene k of a split
with seed s of (s, split, k) only. Only training looks are used (`scenes.HELD_OUT_LOOKS` stay
the subjects'), and not the ring: its centre is a hole, where the "nose" keypoint would fall.

**Keypoints** (5 per identity, like a face detector's two eyes, nose tip and two mouth corners):
fixed points of the object's own frame, `KEYPOINT_TEMPLATE` in units of the radius (x right, y
down when the object is upright), moved with its proportions, rotation, size and position. They
are in pixel coordinates of the rendered image: x to the right, y down, (0, 0) the top-left corner
of the top-left pixel, so pixel (row i, column j) spans [j, j+1) x [i, i+1). The order is
insightface's: left eye, right eye, nose, left mouth corner, right mouth corner (left/right as
the viewer sees the upright object). Every keypoint lies on the object for every class.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from persona_jax.world import scenes
from persona_jax.world.scenes import COLOURS, Look

IDENTITY_CLASSES = ("ball", "box", "flower", "star", "heart")
NUM_TRAIN = 1000
NUM_HELD_OUT = 200
KEYPOINT_TEMPLATE = np.asarray([(-0.25, -0.2), (0.25, -0.2), (0.0, 0.03), (-0.2, 0.28),
                                (0.2, 0.28)], np.float32)       # [5, 2] (u, v), radius units
MARK_RADIUS = 0.26              # radius units: ~1.6 px on the smallest object at 32x32
MAX_POSE = 0.5                  # radians either way
SINGLE_RADIUS = (0.18, 0.34)    # of the image side
PAIR_RADIUS = (0.12, 0.16)      # two side by side never overlap: centres >= 0.46 apart
_TRAIN_LOOKS = tuple(l for l in scenes.all_looks() if l not in scenes.HELD_OUT_LOOKS)


@dataclasses.dataclass(frozen=True)
class Identity:
  """One individual: class, look, its mark (colour, centre in the object's frame in radius
  units) and proportions (`aspect`: width / height, area kept)."""
  index: int
  cls: str
  look: Look
  mark_colour: str
  mark_u: float
  mark_v: float
  aspect: float

  @property
  def held_out(self) -> bool:
    return self.index >= NUM_TRAIN

  @property
  def words(self) -> str:
    """What a caption says of it, e.g. 'red ball' (never the mark or proportions)."""
    return f"{scenes.describe_look(self.look)} {self.cls}"


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one identity is in a scene: centre (image-side units), radius, rotation (radians)."""
  cx: float
  cy: float
  radius: float
  angle: float


@dataclasses.dataclass(frozen=True)
class IdentityScene:
  """One or two identities (left to right) on a background."""
  identities: tuple[Identity, ...]
  placements: tuple[Placement, ...]
  background: str


def identity(index: int) -> Identity:
  """Identity `index` (0 .. NUM_TRAIN + NUM_HELD_OUT - 1): the same on every machine. Half are
  plain (the mark shows best on them), half wear a training pattern."""
  if not 0 <= index < NUM_TRAIN + NUM_HELD_OUT:
    raise ValueError(f"identity index {index} outside 0..{NUM_TRAIN + NUM_HELD_OUT - 1}")
  rng = scenes._rng(0, "identity", index)
  cls = str(rng.choice(IDENTITY_CLASSES))
  if rng.random() < 0.5:
    look = Look(str(rng.choice(list(COLOURS))))
  else:
    look = _TRAIN_LOOKS[int(rng.integers(len(_TRAIN_LOOKS)))]
    while look.pattern == "plain":
      look = _TRAIN_LOOKS[int(rng.integers(len(_TRAIN_LOOKS)))]
  mark_colour = str(rng.choice([c for c in COLOURS if c not in (look.colour, look.pattern_colour)]))
  rho, theta = rng.uniform(0.15, 0.45), rng.uniform(0, 2 * np.pi)
  return Identity(index, cls, look, mark_colour, float(rho * np.cos(theta)),
                  float(rho * np.sin(theta)), float(np.exp(rng.uniform(-0.3, 0.3))))


def train_identities() -> list[Identity]:
  return [identity(k) for k in range(NUM_TRAIN)]


def held_out_identities() -> list[Identity]:
  return [identity(k) for k in range(NUM_TRAIN, NUM_TRAIN + NUM_HELD_OUT)]


def _split_range(split: str) -> tuple[int, int]:
  if split == "train":
    return 0, NUM_TRAIN
  if split == "held_out":
    return NUM_TRAIN, NUM_TRAIN + NUM_HELD_OUT
  raise ValueError(f"identity split must be 'train' or 'held_out', got {split!r}")


def _background(rng, ids) -> str:
  taken = {c for i in ids for c in (i.look.colour, i.look.pattern_colour, i.mark_colour)}
  return str(rng.choice([b for b in scenes.BACKGROUNDS if b not in taken]))


def place(rng, radius_range, cx_range, cy_range) -> Placement:
  return Placement(float(rng.uniform(*cx_range)), float(rng.uniform(*cy_range)),
                   float(rng.uniform(*radius_range)), float(rng.uniform(-MAX_POSE, MAX_POSE)))


def identity_scene(seed: int, split: str, index: int, who: Identity | None = None) -> IdentityScene:
  """Scene `index` of one identity of `split` ("train" or "held_out"; `who` picks the identity,
  else it is drawn from the split): any size, position, pose and background."""
  lo, hi = _split_range(split)
  rng = scenes._rng(seed, "identity scene", split, index, who.index if who else None)
  who = who or identity(int(rng.integers(lo, hi)))
  if who.index not in range(lo, hi):
    raise ValueError(f"identity {who.index} is not in the {split!r} split")
  r = rng.uniform(*SINGLE_RADIUS)
  margin = r * 1.1
  p = Placement(float(rng.uniform(max(margin, 0.3), min(1 - margin, 0.7))),
                float(rng.uniform(max(margin, 0.35), min(1 - margin, 0.65))), float(r),
                float(rng.uniform(-MAX_POSE, MAX_POSE)))
  return IdentityScene((who,), (p,), _background(rng, [who]))


def pair_scene(seed: int, split: str, index: int) -> IdentityScene:
  """Scene `index` of two different identities of `split` side by side (left, right)."""
  lo, hi = _split_range(split)
  rng = scenes._rng(seed, "pair scene", split, index)
  a, b = rng.choice(np.arange(lo, hi), size=2, replace=False)
  ids = (identity(int(a)), identity(int(b)))
  left = place(rng, PAIR_RADIUS, (0.23, 0.27), (0.4, 0.6))
  right = place(rng, PAIR_RADIUS, (0.73, 0.77), (0.4, 0.6))
  return IdentityScene(ids, (left, right), _background(rng, ids))


def _object_frame(who: Identity, p: Placement, xx, yy):
  """(u, v): the rotated object frame in radius units, before proportions."""
  u, v = (xx - p.cx) / p.radius, (yy - p.cy) / p.radius
  c, s = np.cos(p.angle), np.sin(p.angle)
  return c * u + s * v, -s * u + c * v


def _proportions(who: Identity) -> tuple[float, float]:
  """(sx, sy): width and height factors, sx * sy = 1."""
  return float(np.sqrt(who.aspect)), float(1 / np.sqrt(who.aspect))


def _draw(who: Identity, p: Placement, xx, yy):
  """(object mask, fill colours [s, s, 3]) of one identity on the supersampled grid."""
  u, v = _object_frame(who, p, xx, yy)
  sx, sy = _proportions(who)
  un, vn = u / sx, v / sy                                   # the unstretched frame
  mask = scenes.shape_mask(who.cls, un, vn)
  fill = np.broadcast_to(np.asarray(COLOURS[who.look.colour], np.float32), xx.shape + (3,)).copy()
  if who.look.pattern != "plain":
    fill[scenes.pattern_mask(who.look.pattern, u, v)] = COLOURS[who.look.pattern_colour]
  mark = (un - who.mark_u) ** 2 + (vn - who.mark_v) ** 2 < MARK_RADIUS ** 2
  fill[mark] = COLOURS[who.mark_colour]
  return mask, fill


def _grid(size: int):
  s = size * scenes.SUPERSAMPLE
  return (np.mgrid[0:s, 0:s] + 0.5) / s


def _box(a: np.ndarray, size: int) -> np.ndarray:
  return a.reshape(size, scenes.SUPERSAMPLE, size, scenes.SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: IdentityScene, size: int = 32) -> np.ndarray:
  """The scene as uint8 [size, size, 3] (4x supersampled, box-filtered, like `scenes.render`)."""
  yy, xx = _grid(size)
  rng = np.random.default_rng(scenes._stable_hash(repr(scene)) & 0xFFFFFFFF)
  image = scenes.background_pixels(scene.background, xx, yy, rng)
  for who, p in zip(scene.identities, scene.placements):
    mask, fill = _draw(who, p, xx, yy)
    image = np.where(mask[..., None], fill, image)
  return _box(image, size).round().astype(np.uint8)


def masks(scene: IdentityScene, size: int = 32) -> np.ndarray:
  """Each identity's pixel coverage: float32 [n, size, size] in 0..1 (disjoint objects)."""
  yy, xx = _grid(size)
  return np.stack([_box(_draw(who, p, xx, yy)[0].astype(np.float32), size)
                   for who, p in zip(scene.identities, scene.placements)])


def keypoints(scene: IdentityScene, size: int = 32) -> np.ndarray:
  """float32 [n, 5, 2]: each identity's keypoints (x, y) in pixels (module docstring)."""
  out = []
  for who, p in zip(scene.identities, scene.placements):
    sx, sy = _proportions(who)
    u, v = KEYPOINT_TEMPLATE[:, 0] * sx, KEYPOINT_TEMPLATE[:, 1] * sy
    c, s = np.cos(p.angle), np.sin(p.angle)
    x = p.cx + p.radius * (c * u - s * v)                  # the inverse of `_object_frame`'s turn
    y = p.cy + p.radius * (s * u + c * v)
    out.append(np.stack([x, y], -1) * size)
  return np.asarray(out, np.float32)


def _size_word(radius: float) -> str:
  return "small" if radius < 0.23 else "medium" if radius < 0.29 else "large"


def _position_phrase(cx: float) -> str:
  return "on the left" if cx < 0.42 else "on the right" if cx > 0.58 else "in the center"


def caption(scene: IdentityScene, rng: np.random.Generator | None = None) -> str:
  """What the scene shows in the world's words, never the mark or proportions: "a photo of a
  large red ball on the left on grass"; two identities: "a photo of a red ball and a blue star
  on a green background" (left first). With `rng`, optional parts drop as `scenes.caption`'s."""
  keep = (lambda q: True) if rng is None else (lambda q: rng.random() < q)

  def described(who: Identity) -> str:
    return who.words if keep(0.9) else who.cls
  if len(scene.identities) == 1:
    (who,), (p,) = scene.identities, scene.placements
    words = ["a photo of a"] + ([_size_word(p.radius)] if keep(0.5) else []) + [described(who)]
    if keep(0.5):
      words.append(_position_phrase(p.cx))
  else:
    words = ["a photo of a", described(scene.identities[0]), "and a", described(scene.identities[1])]
  if keep(0.8):
    words.append(scenes.background_phrase(scene.background))
  return " ".join(words)


__all__ = ["IDENTITY_CLASSES", "NUM_TRAIN", "NUM_HELD_OUT", "KEYPOINT_TEMPLATE", "Identity",
           "Placement", "IdentityScene", "identity", "train_identities", "held_out_identities",
           "identity_scene", "pair_scene", "render", "masks", "keypoints", "caption"]
