"""End to end on the toy world: DreamBooth on a held-out subject (a look the base never saw) must
make the base draw that subject. The control runs share the prompts' seeds: the base model with
the class word, and DreamBooth at learning rate 0 with the identifier. A harness that scored the
references, a train step that did not update, or a sampler that ignored the trained params
would all fail it.

The runs go through `persona-jax eval` in a subprocess, as a user runs it: one device and XLA's
usual optimization (the tests' 8 simulated devices and -O0 compilation would make them ~4x
slower).
"""

import json

import numpy as np
from PIL import Image

from persona_jax.default_model import is_toy_base_shipped
from tests.runs import run_cli

STEPS = 100
SEEDS = 6


def evaluate(tmp_path, method, *flags):
  out = tmp_path / f"{method}{''.join(flags)}"
  run_cli("eval", "--method", method, "--subjects", "1", "--seeds", str(SEEDS), "--contexts", "1",
          "--batch-size", "8", "--out", str(out), "--noprogress", *flags)
  return json.loads((out / "eval.json").read_text())


def test_dreambooth_makes_the_base_draw_a_held_out_subject(tmp_path):
  assert is_toy_base_shipped(), "the embedded default is not the toy-world base"
  trained = evaluate(tmp_path, "dreambooth_noprior", "--steps", str(STEPS))
  control = evaluate(tmp_path, "dreambooth_noprior", "--steps", "2", "--lr", "0")  # moves nothing
  base = evaluate(tmp_path, "base")
  match = {name: r["subject_match"] for name, r in
           (("dreambooth", trained), ("lr 0", control), ("base", base))}
  assert match["dreambooth"] >= max(match["lr 0"], match["base"]) + 0.25, match
  # The subject's generations look more like its references than the controls' do.
  assert trained["subject_similarity"] > max(control["subject_similarity"],
                                             base["subject_similarity"]), (trained, control, base)
  # `persona-jax sample --run` on the trained run folder draws the eval's own subject images
  # (the same prompt, sampler settings and per-image seeds; the eval's grid shows them 4x).
  subject = "pink_and_yellow_dotted_ball"
  run = tmp_path / f"dreambooth_noprior--steps{STEPS}" / "runs" / subject
  out = tmp_path / "sampled"
  run_cli("sample", "--run", str(run), "--prompt", trained["subjects"][0]["prompts"][0],
          "--num-images", str(SEEDS), "--steps", "25", "--guidance", "4", "--seed", "0",
          "--out", str(out))
  grid = np.asarray(Image.open(run.parent.parent / "samples" / f"{subject}.png")).astype(int)
  for k in range(SEEDS):
    tile = grid[2:130:4, 2 + 130 * k: 130 + 130 * k: 4]
    image = np.asarray(Image.open(out / f"0000_{k:04d}.png")).astype(int)
    assert np.abs(image - tile).max() <= 2, k
