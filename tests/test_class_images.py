"""Class images: sampled by the jitted sampler, resumable, per-image seeds, and the command."""

import numpy as np
import pytest
from PIL import Image

from persona_jax.class_images import METADATA, make_class_images
from persona_jax.cli import main
from persona_jax.data.images import DataError
from persona_jax.text_to_image import SampleOptions, text_to_image

OPTIONS = SampleOptions(steps=2, guidance=5.0, seed=3, height=16, width=16, batch_size=2)


def pixels(path):
  return np.asarray(Image.open(path))


def test_resumable_top_up_gives_the_same_images(pipes, tmp_path):
  pipe = pipes["sd1"]
  out = tmp_path / "class"
  first = make_class_images(pipe, "a photo of toy", 3, out, options=OPTIONS, progress=False)
  assert [p.name for p in first] == ["class-00000.png", "class-00001.png", "class-00002.png"]
  assert make_class_images(pipe, "a photo of toy", 3, out, options=OPTIONS, progress=False) == []
  # A lost image is redrawn identically; topping up keeps the existing ones.
  kept = pixels(out / "class-00001.png")
  (out / "class-00001.png").unlink()
  again = make_class_images(pipe, "a photo of toy", 5, out, options=OPTIONS, progress=False)
  assert [p.name for p in again] == ["class-00001.png", "class-00003.png", "class-00004.png"]
  np.testing.assert_array_equal(pixels(out / "class-00001.png"), kept)
  # Image i is the sampler's image i whatever the batching.
  direct = text_to_image(pipe, "a photo of toy", "", 5, OPTIONS, progress=False)
  for i in range(5):
    np.testing.assert_array_equal(pixels(out / f"class-{i:05d}.png"), direct[i])
  assert not np.array_equal(direct[0], direct[1])


def test_user_images_count_and_a_different_prompt_is_refused(pipes, tmp_path):
  out = tmp_path / "class"
  out.mkdir()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "mine.jpg")
  written = make_class_images(pipes["sd1"], "a photo of toy", 2, out, options=OPTIONS, progress=False)
  assert [p.name for p in written] == ["class-00000.png"]
  assert (out / METADATA).is_file()
  with pytest.raises(DataError, match="made for the prompt 'a photo of toy', not 'a dog'"):
    make_class_images(pipes["sd1"], "a dog", 4, out, options=OPTIONS, progress=False)


def test_make_class_images_command(model_dirs, tmp_path, capsys):
  out = tmp_path / "c"
  args = ["make-class-images", "--model", str(model_dirs["sd1"]), "--prompt", "a photo of toy",
          "--num", "2", "--steps", "2", "--guidance", "5", "--seed", "3", "--height", "16",
          "--width", "16", "--batch-size", "2", "--out", str(out)]
  assert main(args) == 0
  assert sorted(p.name for p in out.glob("*.png")) == ["class-00000.png", "class-00001.png"]
  assert "2 new class image(s)" in capsys.readouterr().err
  assert main(args) == 0
  assert "0 new class image(s)" in capsys.readouterr().err
  assert main(["make-class-images", "--model", str(tmp_path / "nope"), "--prompt", "x",
               "--num", "1", "--out", str(out)]) == 2
  assert "nope" in capsys.readouterr().err
