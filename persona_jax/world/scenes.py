"""The toy world: a deterministic, seeded generator of small RGB images with plain-English captions.

A scene is one object (a class, a colour, a pattern with a second colour, a size, a position)
on a background (a named colour or a simple texture), e.g. "a photo of a small red and white
striped ball on the left on a blue background". Images are rendered 4x supersampled and
box-filtered, so edges are anti-aliased.

A *subject* is a specific instance: a class with a (pattern, colour, pattern colour) look that
pre-training never shows (`HELD_OUT_LOOKS`), so personalizing it teaches a new concept while
"a photo of a ball" keeps a real class prior. Splits:
  "train"  scenes whose look is not held out (pre-training, the metric encoder's training set)
  "test"   held-out scenes of the same distribution (other seeds) for the metric encoder
Scene k of a split with seed s is the same on every machine: its generator is seeded with
(s, split, k) and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

CLASSES = ("ball", "box", "flower", "star", "ring", "heart")
COLOURS = {
    "red": (214, 39, 40), "orange": (245, 130, 32), "yellow": (240, 214, 36),
    "green": (44, 160, 64), "blue": (40, 82, 214), "purple": (132, 58, 186),
    "pink": (240, 128, 184), "white": (242, 242, 242), "black": (24, 24, 24),
    "brown": (128, 80, 40), "gray": (128, 128, 128),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
SIZES = {"small": 0.2, "medium": 0.26, "large": 0.32}           # radius / image side
POSITIONS = {"left": 0.33, "center": 0.5, "right": 0.67}            # x of the centre / image side
BG_COLOURS = ("white", "black", "gray", "blue", "green", "red", "yellow", "pink", "brown",
              "purple", "orange")
TEXTURES = {"grass": ((52, 140, 48), (96, 188, 72)), "sand": ((214, 190, 140), (236, 216, 170)),
            "brick": ((150, 60, 44), (200, 190, 180)), "water": ((30, 90, 170), (90, 160, 220))}
BACKGROUNDS = BG_COLOURS + tuple(TEXTURES)
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Look:
  """What makes an instance itself: colour, pattern and the pattern's second colour."""
  colour: str
  pattern: str = "plain"
  pattern_colour: str | None = None     # None for plain


@dataclasses.dataclass(frozen=True)
class Scene:
  cls: str
  look: Look
  size: str
  position: str
  background: str
  dx: float = 0.0                       # jitter of the centre, image-side units
  dy: float = 0.0
  angle: float = 0.0                    # rotation of the shape and its pattern, radians


def all_looks() -> list[Look]:
  plain = [Look(c) for c in COLOURS]
  patterned = [Look(c, p, q) for p in PATTERNS[1:] for c in COLOURS for q in COLOURS if q != c]
  return plain + patterned


def _stable_hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# Stripes and checks give both colours half the object, so "red and white striped" and "white and
# red striped" look the same: the canonical look names those colours in COLOURS order.
SYMMETRIC_PATTERNS = ("striped", "checked")


def canonical_look(look: Look) -> Look:
  """The look as the image shows it (symmetric patterns: colours in COLOURS order)."""
  if look.pattern in SYMMETRIC_PATTERNS:
    first, second = sorted((look.colour, look.pattern_colour), key=list(COLOURS).index)
    return Look(first, look.pattern, second)
  return look


# One patterned look in ten (both orders of a symmetric one) is never shown in pre-training:
# subjects are drawn from these.
HELD_OUT_LOOKS = frozenset(l for l in all_looks()
                           if l.pattern != "plain" and _stable_hash(repr(canonical_look(l))) % 10 == 0)


_TRAIN_PATTERNED = tuple(l for l in all_looks() if l.pattern != "plain" and l not in HELD_OUT_LOOKS)


@dataclasses.dataclass(frozen=True)
class Subject:
  """A specific instance: a class with a held-out look."""
  cls: str
  look: Look

  @property
  def words(self) -> str:
    """The subject's description without the identifier, e.g. 'blue and yellow striped ball'."""
    return f"{describe_look(self.look)} {self.cls}"


def subjects() -> list[Subject]:
  """Every (class, held-out canonical look) pair, in a fixed order."""
  looks = sorted((l for l in HELD_OUT_LOOKS if l == canonical_look(l)), key=repr)
  return [Subject(c, l) for c in CLASSES for l in looks]


def describe_look(look: Look) -> str:
  if look.pattern == "plain":
    return look.colour
  return f"{look.colour} and {look.pattern_colour} {look.pattern}"


def _rng(seed: int, *key) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF] + [_stable_hash(str(k)) & 0xFFFFFFFF for k in key])


def _layout(rng: np.random.Generator, cls: str, look: Look, backgrounds=BACKGROUNDS) -> Scene:
  """Size, position, background (never the object's colour) and jitter for an object."""
  taken = {look.colour, look.pattern_colour}
  options = [b for b in backgrounds if b not in taken]
  return Scene(cls, look, str(rng.choice(list(SIZES))), str(rng.choice(list(POSITIONS))),
               str(rng.choice(options)), dx=float(rng.uniform(-0.04, 0.04)),
               dy=float(rng.uniform(-0.12, 0.12)), angle=float(rng.uniform(0, 2 * np.pi)))


_ALL_PATTERNED = tuple(l for l in all_looks() if l.pattern != "plain")


def sample_scene(seed: int, split: str, index: int, *, held_out: bool = False) -> Scene:
  """Scene `index` of a split ("train" or "test"): any class, a look that is not held out
  (`held_out=True`: any look, held-out ones included: the metric encoder, which judges
  subjects, learns from these; it is no generative model's training data)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  rng = _rng(seed, split, index) if not held_out else _rng(seed, split, "any look", index)
  # Half the scenes are plain: colours, classes and backgrounds are learned before patterns.
  if rng.random() < 0.5:
    look = Look(str(rng.choice(list(COLOURS))))
  else:
    looks = _ALL_PATTERNED if held_out else _TRAIN_PATTERNED
    look = looks[int(rng.integers(len(looks)))]
  return _layout(rng, str(rng.choice(CLASSES)), look)


def subject_scenes(subject: Subject, n: int, seed: int = 0, backgrounds=None) -> list[Scene]:
  """`n` reference scenes of a subject (varied size, position and background; by default
  backgrounds from the first half of BACKGROUNDS, so the rest stay unseen for
  recontextualization prompts)."""
  backgrounds = backgrounds or reference_backgrounds()
  return [_layout(_rng(seed, "subject", repr(subject), k), subject.cls, subject.look, backgrounds)
          for k in range(n)]


def reference_backgrounds() -> tuple[str, ...]:
  """The backgrounds a subject's reference images use; the others are for new contexts."""
  return BG_COLOURS[: len(BG_COLOURS) // 2 + 1]


def caption(scene: Scene, rng: np.random.Generator | None = None, *, identifier: str = "",
            look: bool = True) -> str:
  """The caption of a scene. With `rng`, optional parts are dropped at random (pre-training
  captions: colour and pattern dropped 10% of the time, so "a photo of a ball" means any ball;
  size and position half the time; the background 20%); without, every part is said.
  `identifier` (e.g. "sks") goes before the class word. `look=False` never says the colours
  and pattern (the training captions of methods that take the look from an image)."""
  keep = (lambda p: True) if rng is None else (lambda p: rng.random() < p)
  words = ["a photo of a"]
  if keep(0.5):
    words.append(scene.size)
  if keep(0.9) and look:
    words.append(describe_look(scene.look))
  if identifier:
    words.append(identifier)
  words.append(scene.cls)
  if keep(0.5):
    words.append({"left": "on the left", "center": "in the center", "right": "on the right"}[scene.position])
  if keep(0.8):
    words.append(background_phrase(scene.background))
  return " ".join(words)


def background_phrase(background: str) -> str:
  return f"on {background}" if background in TEXTURES else f"on a {background} background"


def render(scene: Scene, size: int = 32) -> np.ndarray:
  """The scene as uint8 [size, size, 3] (rendered at 4x and box-filtered)."""
  s = size * SUPERSAMPLE
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s                          # [s, s] in (0, 1)
  rng = np.random.default_rng(_stable_hash(repr(scene)) & 0xFFFFFFFF)   # texture noise
  image = background_pixels(scene.background, xx, yy, rng)
  cx, cy = POSITIONS[scene.position] + scene.dx, 0.5 + scene.dy
  r = SIZES[scene.size]
  # Object-centred, rotated coordinates in units of the radius.
  u, v = (xx - cx) / r, (yy - cy) / r
  c, si = np.cos(scene.angle), np.sin(scene.angle)
  u, v = c * u + si * v, -si * u + c * v
  mask = shape_mask(scene.cls, u, v)
  colour = np.asarray(COLOURS[scene.look.colour], np.float32)
  fill = np.broadcast_to(colour, image.shape).copy()
  if scene.look.pattern != "plain":
    second = np.asarray(COLOURS[scene.look.pattern_colour], np.float32)
    fill[pattern_mask(scene.look.pattern, u, v)] = second
  image = np.where(mask[..., None], fill, image)
  return image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def coverage(scene: Scene, size: int = 32) -> np.ndarray:
  """The fraction of each pixel the object covers: float32 [size, size] in 0..1 (the render's
  box filter applied to its object mask)."""
  s = size * SUPERSAMPLE
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
  cx, cy = POSITIONS[scene.position] + scene.dx, 0.5 + scene.dy
  r = SIZES[scene.size]
  u, v = (xx - cx) / r, (yy - cy) / r
  c, si = np.cos(scene.angle), np.sin(scene.angle)
  mask = shape_mask(scene.cls, c * u + si * v, -si * u + c * v).astype(np.float32)
  return mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def background_pixels(name: str, xx, yy, rng) -> np.ndarray:
  s = xx.shape[0]
  if name in COLOURS:
    return np.broadcast_to(np.asarray(COLOURS[name], np.float32), (s, s, 3)).copy()
  a, b = (np.asarray(c, np.float32) for c in TEXTURES[name])
  if name == "brick":
    row = np.floor(yy * 8)
    shift = (row % 2) * 0.125
    mortar = ((yy * 8) % 1 < 0.12) | (((xx + shift) * 4) % 1 < 0.06)
    return np.where(mortar[..., None], b, a)
  if name == "water":
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (6 * yy + 0.6 * np.sin(2 * np.pi * 3 * xx)))
    return a + (b - a) * t[..., None]
  # grass, sand: speckle noise at 1/4 resolution
  noise = rng.random((s // 4, s // 4)).repeat(4, 0).repeat(4, 1)
  return a + (b - a) * noise[..., None]


def shape_mask(cls: str, u, v, xp=np) -> np.ndarray:
  """Mask of a class in object coordinates (radius 1); `xp` is numpy or jax.numpy."""
  rho, theta = xp.hypot(u, v), xp.arctan2(v, u)
  if cls == "ball":
    return rho < 1.0
  if cls == "box":
    return (xp.abs(u) < 0.82) & (xp.abs(v) < 0.82)
  if cls == "flower":
    return rho < 0.55 + 0.45 * xp.abs(xp.cos(2.5 * theta))
  if cls == "star":
    spikes = xp.abs(((theta * 5 / (2 * np.pi)) % 1) - 0.5) * 2    # 0 at a point, 1 between
    return rho < 1.0 - 0.55 * spikes
  if cls == "ring":
    return (rho < 1.0) & (rho > 0.55)
  if cls == "heart":
    x, y = u * 1.15, -v * 1.15 + 0.25
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
  raise ValueError(f"unknown class {cls!r}")


def pattern_mask(name: str, u, v, xp=np) -> np.ndarray:
  """Where the pattern's second colour goes, in object coordinates."""
  # Periods of 0.7-0.8 radius: at 32x32 even a small object's stripes, dots and checks are
  # two or more pixels wide.
  if name == "striped":
    return (u * 1.25) % 1 < 0.5
  if name == "dotted":
    gu, gv = (u * 1.4) % 1 - 0.5, (v * 1.4) % 1 - 0.5
    return gu * gu + gv * gv < 0.09
  if name == "checked":
    return ((xp.floor(u * 1.4) + xp.floor(v * 1.4)) % 2) == 0
  raise ValueError(f"unknown pattern {name!r}")


# ---------------------------------------------------------------------------------------------
# The same renderer in JAX, batched: ~20x faster on CPU, for training on fresh scenes every step
# (the metric encoder). `render` stays the reference: equal up to rounding at edges and the
# texture noise, which is drawn from JAX's generator (tested to agree pixel for pixel on most
# of the image).

_BG_RGB = np.asarray([COLOURS[b] if b in COLOURS else TEXTURES[b][0] for b in BACKGROUNDS], np.float32)
_BG_RGB2 = np.asarray([TEXTURES[b][1] if b in TEXTURES else COLOURS[b] for b in BACKGROUNDS], np.float32)
_COLOUR_RGB = np.asarray(list(COLOURS.values()), np.float32)


def scene_arrays(scene_list) -> dict[str, np.ndarray]:
  """The per-scene numbers `render_batch` draws from: indices, centre, radius, angle, noise seed."""
  def index(table, name):
    return list(table).index(name)
  return {
      "cls": np.asarray([index(CLASSES, s.cls) for s in scene_list], np.int32),
      "colour": np.asarray([index(COLOURS, s.look.colour) for s in scene_list], np.int32),
      "pattern": np.asarray([index(PATTERNS, s.look.pattern) for s in scene_list], np.int32),
      "pattern_colour": np.asarray([index(COLOURS, s.look.pattern_colour or s.look.colour)
                                    for s in scene_list], np.int32),
      "background": np.asarray([index(BACKGROUNDS, s.background) for s in scene_list], np.int32),
      "centre": np.asarray([(POSITIONS[s.position] + s.dx, 0.5 + s.dy) for s in scene_list], np.float32),
      "radius": np.asarray([SIZES[s.size] for s in scene_list], np.float32),
      "angle": np.asarray([s.angle for s in scene_list], np.float32),
      "noise_seed": np.asarray([_stable_hash(repr(s)) & 0x7FFFFFFF for s in scene_list], np.uint32),
  }


def render_batch(arrays: dict, size: int = 32):
  """`render` for a batch given by `scene_arrays` (jit it): float32 [B, size, size, 3] in 0..255,
  not rounded."""
  import jax
  import jax.numpy as jnp
  s = size * SUPERSAMPLE
  grid = (jnp.arange(s, dtype=jnp.float32) + 0.5) / s
  yy, xx = jnp.meshgrid(grid, grid, indexing="ij")

  def one(a):
    # Background: a colour, or one of the textures between its two colours.
    t_brick = ((yy * 8) % 1 < 0.12) | (((xx + (jnp.floor(yy * 8) % 2) * 0.125) * 4) % 1 < 0.06)
    t_water = 0.5 + 0.5 * jnp.sin(2 * jnp.pi * (6 * yy + 0.6 * jnp.sin(2 * jnp.pi * 3 * xx)))
    noise = jax.random.uniform(jax.random.PRNGKey(a["noise_seed"]), (s // 4, s // 4))
    t_noise = jnp.repeat(jnp.repeat(noise, 4, 0), 4, 1)
    textures = {"brick": t_brick.astype(jnp.float32), "water": t_water, "grass": t_noise,
                "sand": t_noise}
    t = jnp.stack([textures.get(b, jnp.zeros_like(t_water)) for b in BACKGROUNDS])[a["background"]]
    lo = jnp.asarray(_BG_RGB)[a["background"]][None, None, :]
    hi = jnp.asarray(_BG_RGB2)[a["background"]][None, None, :]
    image = lo + (hi - lo) * t[..., None]
    # Object coordinates, rotated, in units of the radius.
    u, v = (xx - a["centre"][0]) / a["radius"], (yy - a["centre"][1]) / a["radius"]
    c, si = jnp.cos(a["angle"]), jnp.sin(a["angle"])
    u, v = c * u + si * v, -si * u + c * v
    mask = jnp.stack([shape_mask(cls, u, v, xp=jnp) for cls in CLASSES])[a["cls"]]
    second = jnp.stack([jnp.zeros_like(mask)] + [pattern_mask(p, u, v, xp=jnp) for p in PATTERNS[1:]])[a["pattern"]]
    fill = jnp.where(second[..., None], jnp.asarray(_COLOUR_RGB)[a["pattern_colour"]][None, None, :],
                     jnp.asarray(_COLOUR_RGB)[a["colour"]][None, None, :])
    image = jnp.where(mask[..., None], fill, image)
    return image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))

  return jax.vmap(one)(arrays)


def look_attributes(look: Look) -> dict[str, str]:
  """colour, pattern, pattern colour ("none" when plain) of the canonical look."""
  look = canonical_look(look)
  return {"colour": look.colour, "pattern": look.pattern,
          "pattern_colour": look.pattern_colour or "none"}


def scene_attributes(scene: Scene) -> dict[str, str]:
  """The attributes a metric encoder predicts (what the image shows): class, colour, pattern,
  pattern colour, background."""
  return {"class": scene.cls, **look_attributes(scene.look), "background": scene.background}


ATTRIBUTES = {"class": CLASSES, "colour": tuple(COLOURS), "pattern": PATTERNS,
              "pattern_colour": ("none",) + tuple(COLOURS), "background": BACKGROUNDS}


def batch(seed: int, split: str, start: int, n: int, size: int = 32, captions: bool = True):
  """Scenes start..start+n-1 of a split: (uint8 [n, size, size, 3], captions, scenes)."""
  scenes = [sample_scene(seed, split, k) for k in range(start, start + n)]
  images = np.stack([render(sc, size) for sc in scenes])
  texts = [caption(sc, _rng(seed, split, k, "caption")) for k, sc in zip(range(start, start + n), scenes)] \
      if captions else []
  return images, texts, scenes


__all__ = ["CLASSES", "COLOURS", "PATTERNS", "SIZES", "POSITIONS", "BACKGROUNDS", "TEXTURES",
           "ATTRIBUTES", "HELD_OUT_LOOKS", "Look", "Scene", "Subject", "all_looks", "subjects",
           "sample_scene", "subject_scenes", "reference_backgrounds", "caption", "render", "coverage",
           "scene_attributes", "look_attributes", "canonical_look", "describe_look", "background_phrase", "batch", "scene_arrays",
           "render_batch"]
