"""`persona-jax eval` with a tuning-free method (FastComposer, the one whose class prompts take
another path than its subject prompts): an untrained run (lr 0) leaves the class prompts' images
the base's, with the same noise per prompt, while its subject images change. Through the CLI in
subprocesses, as test_personalization_works.py (one device, XLA's usual optimization)."""

import numpy as np
from PIL import Image

from tests.runs import run_cli as cli

TILE, PAD = 128, 2                  # the grid's enlarged 32 px tiles and its padding


def rows(grid_file):
  """The one-column sample grid's tiles, top to bottom: [prompts, 128, 128, 3]."""
  grid = np.asarray(Image.open(grid_file)).astype(np.int16)
  n = (grid.shape[0] - PAD) // (TILE + PAD)
  return np.stack([grid[PAD + r * (TILE + PAD): PAD + r * (TILE + PAD) + TILE, PAD: PAD + TILE]
                   for r in range(n)])


def test_fastcomposer_untrained_keeps_the_class_prompts_and_changes_the_subjects(tmp_path):
  cli("train", "--config", "fastcomposer:tiny", "--workdir", str(tmp_path / "fc"),
      "--config.steps=1", "--config.optim.lr=0", "--config.checkpoint_every=1", "--noprogress")
  small = ["--subjects", "1", "--seeds", "1", "--contexts", "1", "--sample-steps", "6",
           "--noprogress"]
  cli("eval", "--method", "fastcomposer", "--state", str(tmp_path / "fc"), "--out",
      str(tmp_path / "ev_fc"), *small)
  cli("eval", "--method", "base", "--out", str(tmp_path / "ev_base"), *small)
  name = "pink_and_yellow_dotted_ball.png"
  fc, base = rows(tmp_path / "ev_fc" / "samples" / name), rows(tmp_path / "ev_base" / "samples" / name)
  assert fc.shape == base.shape == (3, TILE, TILE, 3)     # subject, context, class
  # The class prompt: the base's own image (the same UNet at lr 0, the same noise).
  assert np.abs(fc[2] - base[2]).max() <= 2
  # The subject and context prompts: their marker is not a word (the ids are the base's
  # prompt's), so only the subject image, fused into "ball" by the untrained MLP, changes them.
  assert np.abs(fc[:2] - base[:2]).max() > 8
