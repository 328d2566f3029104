"""The sampling commands' flags: every default in --help, impossible values refused in one line
before any model loads (the embedded default's own VAE factor and timesteps, read from its config
files), usage errors in one line."""

import argparse

import pytest

from persona_jax.cli import build_parser, main
from persona_jax.cli.parsers import shown_default


def _commands():
  sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  return sub.choices


def test_help_shows_every_default():
  """Each flag of each command (but switches, repeatable and required flags) says its default;
  values argparse knows are shown as they are."""
  commands = _commands()
  for name, parser in commands.items():
    if name == "train":                   # absl flags: `train --help` is the configs' own help
      continue
    text = " ".join(parser.format_help().split())
    assert "default: None" not in text, name
    for action in parser._actions:
      if shown_default(action) is None and action.option_strings and not action.required:
        assert (isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction,
                                    argparse._HelpAction, argparse._StoreFalseAction))
                or "default" in action.help.lower()), (name, action.option_strings)
  sample = " ".join(commands["sample"].format_help().split())
  for shown in ("--steps STEPS denoising steps (default: 50)", "(default: 4)",
                "--eta ETA DDIM eta, 0 to 1 (0 deterministic, 1 DDPM-like) (default: 0.0)",
                "--beta BETA", "(default: the model's, its UNet's sample_size x the VAE's factor)"):
    assert shown in sample
  assert "--num NUM how many images OUT should hold" in " ".join(
      commands["make-class-images"].format_help().split())


IMPOSSIBLE = [
    (["--steps", "-5"], "--steps -5: the number of denoising steps must be at least 1"),
    (["--steps", "0"], "--steps 0:"),
    (["--steps", "1001"], "--steps 1001: at most 1000, the training timesteps of the embedded "
                          "default"),
    (["--num-images", "0"], "--num-images 0: images per prompt must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: images per batch must be at least 1"),
    (["--height", "30"], "--height 30: must be a positive multiple of 4 (the VAE's downsampling "
                         "factor of the embedded default)"),
    (["--width", "0"], "--width 0: the image size must be a positive number of pixels"),
    (["--height", "-8"], "--height -8:"),
    (["--guidance", "-1"], "--guidance -1.0: the guidance scale must be 0 or more"),
    (["--guidance", "nan"], "--guidance nan:"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5: must be between 0 and 1"),
    (["--eta", "2"], "--eta 2.0: DDIM's eta must be between 0"),
    (["--eta", "-0.1"], "--eta -0.1:"),
    (["--clip-skip", "-1"], "--clip-skip -1:"),
    (["--seed", "-1"], "--seed -1: the seed must be between 0 and 2**63 - 1"),
    (["--original-size", "0", "32"], "--original-size 0 32: H W must be positive"),
    (["--crops-coords-top-left", "-1", "0"], "--crops-coords-top-left -1 0: TOP LEFT must be 0"),
    (["--scheduler", "pndm"], "argument --scheduler: invalid choice: 'pndm'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
]

CLASS_IMAGES = [
    (["--num", "-1"], "--num -1: how many class images OUT should hold: 0 or more"),
    (["--steps", "0"], "--steps 0:"),
    (["--height", "30"], "--height 30: must be a positive multiple of 4"),
    (["--batch-size", "0"], "--batch-size 0:"),
    (["--scheduler", "plms"], "argument --scheduler: invalid choice: 'plms'"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
  """Any model load fails the test (sample and make-class-images load through these)."""
  import persona_jax.methods.registry
  import persona_jax.pipeline

  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded before the flags were checked")
  monkeypatch.setattr(persona_jax.pipeline, "load_pipeline", refuse)
  monkeypatch.setattr(persona_jax.methods.registry, "load_model", refuse)


def _exit_code(argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:                # argparse's usage errors
    return e.code


def _one_line_error(capsys, expected: str) -> None:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert expected in err, err


@pytest.mark.parametrize("flags, message", IMPOSSIBLE)
def test_sample_refuses_impossible_values_before_loading(flags, message, tmp_path, capsys,
                                                         no_model_loads):
  assert _exit_code(["sample", "--prompt", "x", "--out", str(tmp_path), *flags]) == 2
  _one_line_error(capsys, message)
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", CLASS_IMAGES)
def test_make_class_images_refuses_impossible_values_before_loading(flags, message, tmp_path,
                                                                    capsys, no_model_loads):
  assert _exit_code(["make-class-images", "--prompt", "x", "--num", "2", "--out", str(tmp_path),
                     *flags]) == 2
  _one_line_error(capsys, message)


def test_a_folder_s_own_factor_and_a_missing_flag(model_dirs, tmp_path, capsys, no_model_loads):
  """The size rule is the folder's VAE factor (the random sd1 model's: 2); a missing required
  flag is one line too."""
  assert _exit_code(["sample", "--model", str(model_dirs["sd1"]), "--prompt", "x",
                     "--width", "33", "--out", str(tmp_path)]) == 2
  _one_line_error(capsys, f"--width 33: must be a positive multiple of 2 (the VAE's downsampling "
                          f"factor of {model_dirs['sd1']})")
  assert _exit_code(["sample", "--prompt", "x"]) == 2
  _one_line_error(capsys, "the following arguments are required: --out (see persona-jax sample "
                          "--help)")
