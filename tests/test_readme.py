"""The README's library snippets run as written on the embedded default."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tests.markers import slow

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(heading: str) -> str:
  """The first ```python block after `heading` in the README."""
  text = README.read_text()
  start = text.index(heading)
  return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@slow
def test_library_and_sampling_snippets_run_on_the_embedded_default(tmp_path, monkeypatch):
  """"Using the library" then "Sampling" (which continues with its `pipe`), in one namespace:
  the UNet's output has the latents' shape (8 channels on the toy base, not SD's 4), the copy
  is a diffusers folder, the images are the toy base's size."""
  monkeypatch.chdir(tmp_path)
  names = {}
  exec(compile(_python_block_after("## Using the library"), "README:library", "exec"), names)
  assert names["eps"].shape == names["latents"].shape == (1, 8, 8, 8)
  assert np.isfinite(np.asarray(names["eps"])).all()
  assert (tmp_path / "out" / "copy" / "model_index.json").is_file()
  exec(compile(_python_block_after("### Sampling"), "README:sampling", "exec"), names)
  images = np.asarray(names["images"])
  assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
  assert images.std() > 0.01


def test_the_snippets_read_the_latent_shape_from_the_pipeline():
  """The default suite's share of the slow test (which loads and compiles for about a minute on 2
  busy cores): the library snippet's latents come from the pipeline's UNet config (the toy base:
  8 x 8 x 8, not SD 1.5's 64 x 64 x 4), and neither snippet writes a latent shape by hand."""
  from persona_jax.default_model import shipped_base_dir
  from persona_jax.models.configs import UNetConfig
  library, sampling = _python_block_after("## Using the library"), _python_block_after("### Sampling")
  for block in (library, sampling):
    assert not re.search(r"\(\s*\d+(\s*,\s*\d+){2,3}\s*\)", block), block
  raw = json.loads((shipped_base_dir() / "unet" / "config.json").read_text())
  config = UNetConfig.from_dict(raw)
  key_lines = "\n".join(line for line in library.splitlines()
                        if line.startswith(("import jax", "unet =", "latents =")))
  names = {"pipe": SimpleNamespace(unet_config=config)}
  exec(compile(key_lines, "README:library", "exec"), names)
  assert names["latents"].shape == (1, raw["sample_size"], raw["sample_size"], raw["in_channels"])
  assert raw["in_channels"] == 8
  assert "latent_shape=(unet.sample_size, unet.sample_size, unet.in_channels)" in sampling


def test_the_toy_world_vocabulary_table_is_the_world_s():
  """The README's table of the embedded default's words lists the scene generator's words."""
  from persona_jax.world import scenes
  text = README.read_text()
  table = text[text.index("**The toy world's words.**"):text.index("It ignores other words")]
  rows = dict(re.findall(r"^\s*\| ([A-Z]+) \| (.+?) \|$", table, re.M))
  words = lambda part: [w.strip() for w in rows[part].split(",")]
  assert words("CLASS") == list(scenes.CLASSES)
  assert words("COLOUR") == list(scenes.COLOURS)
  assert words("PATTERN") == [p for p in scenes.PATTERNS if p != "plain"]
  assert words("SIZE") == list(scenes.SIZES)
  assert words("POSITION") == ["on the left", "in the center", "on the right"]
  assert rows["BACKGROUND"] == "on a COLOUR background; " + ", ".join(
      scenes.background_phrase(t) for t in scenes.TEXTURES)
  assert set(scenes.BG_COLOURS) <= set(scenes.COLOURS)
