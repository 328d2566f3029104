"""Draws the bundled example subject (persona_jax/assets/example_subject/): four 128x128 photos of
one specific toy, a red ball with a white band and a yellow star, on different backgrounds and at
different positions and sizes. Deterministic; run it to rebuild the PNGs.

The toy-world issue replaces this with a subject from its own generator.
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
VIEWS = [  # background, centre (x, y), radius
    ((70, 110, 200), (64, 64), 40),
    ((90, 160, 90), (50, 70), 34),
    ((230, 220, 200), (76, 58), 44),
    ((60, 60, 70), (64, 76), 30),
]


def draw(background, centre, radius) -> Image.Image:
  img = Image.new("RGB", (SIZE, SIZE), background)
  d = ImageDraw.Draw(img)
  x, y = centre
  d.ellipse([x - radius + 4, y + radius - 6, x + radius + 4, y + radius + 6], fill=tuple(
      max(0, c - 40) for c in background))                                  # shadow
  d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(210, 30, 40))
  band = radius // 4
  d.rectangle([x - radius + 3, y - band, x + radius - 3, y + band], fill=(245, 245, 245))
  d.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(120, 10, 20), width=2)
  s = radius // 3
  star = [(x, y - s), (x + s // 3, y - s // 3), (x + s, y), (x + s // 3, y + s // 3), (x, y + s),
          (x - s // 3, y + s // 3), (x - s, y), (x - s // 3, y - s // 3)]
  d.polygon(star, fill=(250, 210, 30))
  return img


def main(out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for i, view in enumerate(VIEWS):
    draw(*view).save(out / f"{i:02d}.png", optimize=True)
  print(f"wrote {len(VIEWS)} images to {out}")


if __name__ == "__main__":
  default = Path(__file__).resolve().parents[1] / "persona_jax" / "assets" / "example_subject"
  main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
