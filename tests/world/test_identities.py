"""The identity domain: deterministic identities and scenes, held-out identities never in training
scenes, keypoints on the rendered object, one disjoint mask per identity."""

import hashlib

import numpy as np

from persona_jax.world import identities as I
from persona_jax.world import scenes


def test_identities_and_scenes_are_deterministic():
  text = "|".join(repr(I.identity_scene(0, "train", k)) for k in range(10)) + \
      "|".join(repr(I.pair_scene(0, "train", k)) for k in range(10))
  assert hashlib.sha256(text.encode()).hexdigest()[:16] == GOLDEN
  a = np.stack([I.render(I.identity_scene(3, "train", k)) for k in range(4)])
  b = np.stack([I.render(I.identity_scene(3, "train", k)) for k in range(4)])
  np.testing.assert_array_equal(a, b)
  assert I.identity_scene(3, "train", 0) != I.identity_scene(4, "train", 0)
  # Identities of one class and look still differ (mark, proportions): all are distinct.
  everyone = I.train_identities() + I.held_out_identities()
  assert len({(i.cls, i.look, i.mark_colour, round(i.mark_u, 3), round(i.aspect, 3))
              for i in everyone}) == len(everyone)
  assert len({(i.cls, i.look) for i in everyone}) < len(everyone)      # shared looks exist
  assert not {i.look for i in everyone} & scenes.HELD_OUT_LOOKS          # subjects' looks stay unseen


GOLDEN = "3ef9d3ad6bac4a45"         # change only with a deliberate change of the world


def test_held_out_identities_never_appear_in_training_scenes():
  held = {i.index for i in I.held_out_identities()}
  seen = set()
  for k in range(1500):
    seen |= {i.index for i in I.identity_scene(0, "train", k).identities}
    seen |= {i.index for i in I.pair_scene(0, "train", k).identities}
  assert not seen & held and len(seen) > 900          # nearly every training identity appears
  evaluation = {i.index for k in range(300) for i in I.identity_scene(0, "held_out", k).identities}
  assert evaluation <= held and len(evaluation) > 130


def test_keypoints_land_on_the_object_and_masks_are_disjoint():
  for k in range(60):
    sc = I.identity_scene(1, "train", k) if k % 2 else I.pair_scene(1, "held_out", k)
    image, masks, points = I.render(sc).astype(np.float32), I.masks(sc), I.keypoints(sc)
    assert masks.shape == (len(sc.identities), 32, 32) and points.shape == (len(sc.identities), 5, 2)
    assert np.all(masks.sum(0) <= 1 + 1e-6)
    for who, mask, pts in zip(sc.identities, masks, points):
      colours = np.asarray([scenes.COLOURS[c] for c in (who.look.colour, who.look.pattern_colour,
                                                        who.mark_colour) if c], np.float32)
      for x, y in pts:
        row, col = int(y), int(x)
        assert mask[row, col] > 0.5
        # A pixel the object covers shows the object (a colour of its own, or a blend at a
        # pattern or mark edge), not the background: within the box of its colours.
        pixel = image[row, col]
        assert mask[row, col] < 1 or np.all(pixel >= colours.min(0) - 2) and np.all(pixel <= colours.max(0) + 2), (sc, pixel)
    # Points follow the pose: eyes above the mouth in the object's frame, left eye left of right.
    p = points[0]
    assert np.linalg.norm(p[0] - p[1]) > 0.3 * sc.placements[0].radius * 32


def test_captions_say_what_the_image_shows_and_never_the_mark():
  sc = I.pair_scene(0, "train", 5)
  text = I.caption(sc)
  a, b = sc.identities
  assert text.startswith(f"a photo of a {a.words} and a {b.words}")
  assert scenes.background_phrase(sc.background) in text
  single = I.identity_scene(0, "train", 5)
  assert single.identities[0].mark_colour not in I.caption(single).replace(
      single.identities[0].words, "")
