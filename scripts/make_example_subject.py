"""Renders the bundled example subject (persona_jax/assets/example_subject/): four 128x128 views
of the toy world's first evaluation subject, a pink ball with yellow dots, whose look the toy
base model never saw in pre-training (world/efficacy.py `eval_subjects(1)[0]`). Deterministic;
run it to rebuild the PNGs (tests/world/test_efficacy.py checks they match).
"""

import sys
from pathlib import Path

from PIL import Image

from persona_jax.world import efficacy, scenes


def main(out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  subject = efficacy.eval_subjects(1)[0]
  for k, scene in enumerate(scenes.subject_scenes(subject, 4)):
    Image.fromarray(scenes.render(scene, 128)).save(out / f"{k:02d}.png", optimize=True)
  print(f"{out}: 4 views of the {subject.words}")


if __name__ == "__main__":
  default = Path(__file__).resolve().parents[1] / "persona_jax" / "assets" / "example_subject"
  main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
