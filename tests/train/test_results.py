"""Results that are checked and current: the step and a digest recorded in each result file, a
damaged one refused by export and sample --run, a stale one (an extended run that has not
finished) refused, and identical runs writing byte-identical files."""

import json

import pytest
from safetensors import safe_open

from persona_jax.cli import main
from persona_jax.train import loop
from tests.runs import one_device_mesh, ti_config


@pytest.fixture(scope="module")
def two_runs(model_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp("results")
  for name in ("a", "b"):
    loop.train(ti_config(model_dirs["sd1"], steps=2), root / name, progress=False,
               mesh=one_device_mesh())
  return root / "a", root / "b"


def test_identical_runs_write_identical_bytes_with_step_and_digest(two_runs):
  a, b = (wd / "learned_embeds.safetensors" for wd in two_runs)
  assert a.read_bytes() == b.read_bytes()
  with safe_open(str(a), "np") as f:
    meta = f.metadata()
  assert meta["step"] == "2" and len(meta["persona_jax_digest"]) == 32
  assert json.loads((two_runs[0] / "result.json").read_text()) == {"step": 2, "files": [str(a)]}


def test_a_damaged_result_is_refused_naming_it(two_runs, tmp_path, capsys):
  wd = two_runs[1]
  path = wd / "learned_embeds.safetensors"
  raw = bytearray(path.read_bytes())
  for k in range(10):                       # ten bytes inside the tensor data
    raw[-1 - 3 * k] ^= 0x40
  path.write_bytes(bytes(raw))
  assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert f"{path}: damaged: its tensors no longer match the digest" in err and len(err.splitlines()) == 1
  assert main(["sample", "--run", str(wd), "--prompt", "a <my-toy>", "--out", str(tmp_path / "s")]) == 2
  assert f"{path}: damaged" in capsys.readouterr().err


def test_a_stale_result_is_refused_and_export_records_the_step(two_runs, tmp_path, capsys):
  wd = two_runs[0]
  assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "ok")]) == 0
  capsys.readouterr()
  assert json.loads((tmp_path / "ok" / "export.json").read_text())["step"] == 2
  # The run extended to 4 steps and stopped after its step-4 checkpoint, before its result.
  (wd / "checkpoints" / "4").mkdir()
  try:
    assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (f"{wd}: its result is from step 2, but the run has gone on to a checkpoint at step 4 "
            "and has not finished: run the same `train` command again") in err
  finally:
    (wd / "checkpoints" / "4").rmdir()


def test_a_truncated_result_and_fewer_steps_than_done_are_one_line(two_runs, model_dirs, tmp_path,
                                                                   capsys):
  """A result cut short is refused naming it (not safetensors' raw error); asking a run for fewer
  steps than it has checkpointed is refused before anything is written."""
  import shutil

  from persona_jax import ConfigError
  wd = shutil.copytree(two_runs[0], tmp_path / "run")
  path = wd / "learned_embeds.safetensors"
  path.write_bytes(path.read_bytes()[:-10])
  assert main(["sample", "--run", str(wd), "--prompt", "a <my-toy>", "--out", str(tmp_path / "s")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{path}: cannot read safetensors file" in err[0]
  config_before = (wd / "config.json").read_bytes()
  with pytest.raises(ConfigError, match=rf"steps: {wd} has a checkpoint at step 2, past the 1 steps"):
    loop.train(ti_config(model_dirs["sd1"], steps=1), wd, progress=False, mesh=one_device_mesh())
  assert (wd / "config.json").read_bytes() == config_before
