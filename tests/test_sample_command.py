"""`persona-jax sample` from the embedded default and from a make-random-model folder."""

import numpy as np
import pytest
from PIL import Image

from persona_jax.cli import main
from persona_jax.default_model import default_model_dir, default_model_name


def test_sample_from_the_embedded_default(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "samples"
  assert main(["sample", "--prompt", "a photo of a red ball", "a photo of a blue box",
               "--num-images", "3", "--batch-size", "2", "--steps", "3", "--out", str(out)]) == 0
  folder = default_model_dir()
  assert folder == tmp_path / "cache" / "models" / default_model_name()
  assert (folder / "model_index.json").is_file()
  written = capsys.readouterr().out.split()
  assert sorted(p.rsplit("/", 1)[1] for p in written) == [
      f"0000_{i:04d}.png" for i in range(6)] + ["grid.png"]
  img = np.asarray(Image.open(out / "0000_0002.png"))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0
  # The grid shows the 32x32 images 4x enlarged (pixel repetition), one prompt per row: 2 rows of
  # 3 (image 5 = the second prompt's third image at row 1, column 2).
  tiles = np.asarray(Image.open(out / "grid.png"))
  assert tiles.shape == (2 + 2 * 130, 2 + 3 * 130, 3)
  for i in range(6):
    r, c = divmod(i, 3)
    np.testing.assert_array_equal(tiles[2 + 130 * r:130 * (r + 1):4, 2 + 130 * c:130 * (c + 1):4],
                                  np.asarray(Image.open(out / f"0000_{i:04d}.png")))


def test_sample_from_a_folder_with_size_and_seed(model_dirs, tmp_path):
  out = tmp_path / "s"
  args = ["sample", "--model", str(model_dirs["sd2"]), "--prompt", "a red ball", "a blue box",
          "--negative-prompt", "blurry", "--steps", "2", "--height", "24", "--width", "40",
          "--seed", "9", "--eta", "0.5", "--guidance-rescale", "0.7", "--out", str(out)]
  assert main(args) == 0
  a = np.asarray(Image.open(out / "0009_0001.png"))
  assert a.shape == (24, 40, 3)
  assert not np.array_equal(a, np.asarray(Image.open(out / "0009_0000.png")))


def test_bad_size_is_a_clear_error(model_dirs, tmp_path, capsys):
  assert main(["sample", "--model", str(model_dirs["sd1"]), "--prompt", "x", "--height", "33",
               "--out", str(tmp_path)]) == 2
  assert "--height 33: must be a positive multiple of 2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0.5"], "--beta goes with a run of --instantbooth"),
    (["--ip-scale", "0.5", "--image-encoder", "enc"], "--image-encoder goes with a run of --ip-adapter"),
    (["--start-merge-step", "3"], "--start-merge-step goes with a run of --fastcomposer"),
    (["--input", "beta=x"], "--input beta=x: 'x' is not a float"),
    (["--input", "gamma=1"], "--input gamma=1: expected NAME=VALUE with NAME one of"),
    (["--e4t", "a", "--instantbooth", "b"], "--e4t and --instantbooth do not combine"),
    (["--e4t", "a", "--run", "b"], "--e4t and --run do not combine"),
    (["--image", "x.png"], "--image is a subject image of a run (--run or --e4t, --fastcomposer, "
                           "--instantbooth, --ip-adapter, --photomaker)"),
    (["--e4t", "a"], "--e4t needs --image PATH"),
    (["--e4t", "a", "--image", "x.png", "--image", "y.png"], "--e4t reads one --image"),
    (["--e4t", "a", "--image", "x.png", "--beta", "1"], "--beta is not a knob of e4t"),
    (["--custom-diffusion", "a", "--image", "x.png"], "--custom-diffusion takes no --image"),
    (["--run", "nowhere"], "nowhere: no such run folder or result file"),
])
def test_run_flags_are_checked_before_anything_loads(flags, message, tmp_path, capsys,
                                                     monkeypatch):
  """The run flags of `sample` (from the registry: --run, the per-method flags, the knobs):
  knobs only with their method, one run at a time, the --image count each takes; no model is
  read first."""
  import persona_jax.pipeline

  def no_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the flags were checked")
  monkeypatch.setattr(persona_jax.pipeline, "load_pipeline", no_load)
  assert main(["sample", "--prompt", "x", "--out", str(tmp_path), *flags]) == 2
  assert message in capsys.readouterr().err
