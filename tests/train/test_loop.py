"""The train loop: outputs, resume after SIGKILL (bitwise), divergence stops, base and config
checks, continuing with changes."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persona_jax import ConfigError, PersonaError
from persona_jax.cli import main
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import one_device_mesh, ti_config

ROOT = Path(__file__).resolve().parents[2]


def test_train_writes_checkpoints_metrics_and_embeddings(model_dirs, tmp_path):
  wd = tmp_path / "run"
  result = loop.train(ti_config(model_dirs["sd1"]), wd, progress=False, mesh=one_device_mesh())
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
  records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["lr"] == 5e-3 for r in records)
  embeds = load_file(wd / "learned_embeds.safetensors")
  assert list(embeds) == ["<my-toy>"] and embeds["<my-toy>"].shape == (2, 32)
  np.testing.assert_array_equal(embeds["<my-toy>"], np.asarray(result["state"].trainable["tokens"]))
  assert json.loads((wd / "config.json").read_text())["method"]["placeholder"] == "<my-toy>"


def test_divergence_stops_naming_the_step_and_leaf_with_no_result(model_dirs, tmp_path):
  """textual_inversion:tiny at optim.lr=1000 (before the guard: the row grew to 2.6e35 with a
  finite loss and a zero gradient norm, the loss NaN only at step 39, checkpoints 20-35 called
  good). The guard stops at the first step the row passes 1e4 x max(1, its step-0 magnitude),
  writes no result, and every checkpoint kept is from before that step."""
  import re

  from persona_jax.train.config import load_config, run_config
  from persona_jax.train.divergence import MAGNITUDE_FACTOR, DivergenceError
  c = load_config("textual_inversion:tiny")
  c.optim.lr, c.steps, c.log_every, c.checkpoint_every, c.keep_checkpoints = 1000.0, 40, 1, 1, 50
  c.sample_prompts = ()
  config = run_config(c)
  wd = tmp_path / "diverging"
  with pytest.raises(DivergenceError, match=r"training diverged: trainable leaf 'tokens' reached "
                                            r"\|x\| = \S+ at step (\d+), over 1e\+04 x max\(1, its "
                                            r"step-0 \S+\); stopping with no result \(the last good "
                                            r"checkpoint is step \d+") as err:
    loop.train(config, wd, progress=False, mesh=one_device_mesh())
  step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  assert 2 < step < 39
  assert not (wd / "learned_embeds.safetensors").exists()
  steps = sorted(int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit())
  assert steps == list(range(1, step))                    # the log window's good steps are kept
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] < step
  from persona_jax.train import checkpoint as ckpt
  manager = ckpt.make_manager(wd, 50)
  restored = manager.restore(steps[-1], args=ckpt.ocp.args.Composite(
      state=ckpt.ocp.args.StandardRestore()))["state"]
  assert np.abs(np.asarray(restored["trainable"]["tokens"])).max() < MAGNITUDE_FACTOR
  manager.close()
  # The NaN case: lr 1e38 overflows at once.
  with pytest.raises(DivergenceError, match=r"at step 1, .*no checkpoint was written before it"):
    loop.train(ti_config(model_dirs["sd1"], optim=dict(lr=1e38), steps=3), tmp_path / "nan",
               progress=False, mesh=one_device_mesh())


def test_vanished_gradients_and_checkpoints_after_the_divergence(model_dirs, tmp_path):
  """Ten steps of an exactly-zero gradient norm at a non-zero learning rate diverge at the first
  of them (zeros at lr 0, warm-up, do not count); checkpoints from that step on move to
  WORKDIR/diverged/ and a resume would start from the last good one."""
  from persona_jax.train import checkpoint as ckpt
  from persona_jax.train.divergence import DivergenceError, Guard
  guard = Guard({"a": np.ones(3, np.float32)}, lambda step: 0.0 if step <= 3 else 1e-3)

  def metrics(grad):
    return {"loss": np.float32(1.0), "grad_norm": np.float32(grad), "leaf_max": np.ones(1, np.float32)}
  assert guard.check([metrics(0.0)] * 3 + [metrics(0.5)] + [metrics(0.0)] * 9, 1) is None
  found = guard.check([metrics(0.0)], 14)
  assert found.step == 5 and "exactly 0 for 10 steps (5-14)" in found.message
  wd = tmp_path / "run"
  loop.train(ti_config(model_dirs["sd1"], steps=6, checkpoint_every=1, keep_checkpoints=10), wd,
             progress=False, mesh=one_device_mesh())
  manager = ckpt.make_manager(wd, 10)
  with pytest.raises(DivergenceError, match=r"the last good checkpoint is step 4 .*steps 5, 6 "
                                            r"moved to .*diverged"):
    loop._stop_diverged(dataclasses.replace(found, step=5), manager, wd)
  assert sorted(os.listdir(wd / "diverged")) == ["5", "6"]
  assert ckpt.make_manager(wd, 10).latest_step() == 4


def test_resume_against_a_changed_base_is_an_error(model_dirs, tmp_path):
  model = shutil.copytree(model_dirs["sd1"], tmp_path / "model")
  config = ti_config(model, steps=2)
  loop.train(config, tmp_path / "run", progress=False, mesh=one_device_mesh())
  f = model / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = load_file(f)
  tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1
  save_file(tensors, f)
  with pytest.raises(PersonaError, match="fingerprint"):
    loop.train(ti_config(model, steps=3), tmp_path / "run", progress=False, mesh=one_device_mesh())


def test_changed_config_is_an_error_but_more_steps_resume(model_dirs, tmp_path):
  wd = tmp_path / "run"
  (wd).mkdir()
  saved = ti_config(model_dirs["sd1"]).to_dict()
  del saved["model_config"]             # a run started before an option existed still resumes
  (wd / "config.json").write_text(json.dumps(saved))
  # Before the first checkpoint (a start that failed) any new config is taken.
  loop._write_config(wd, ti_config(model_dirs["sd1"], data=dict(resolution=64)))
  assert json.loads((wd / "config.json").read_text())["data"]["resolution"] == 64
  (wd / "config.json").write_text(json.dumps(saved))
  (wd / "checkpoints" / "2").mkdir(parents=True)
  with pytest.raises(ConfigError, match="differs in data.resolution"):
    loop._write_config(wd, ti_config(model_dirs["sd1"], data=dict(resolution=64)))
  loop._write_config(wd, ti_config(model_dirs["sd1"], steps=10, log_every=3))
  assert json.loads((wd / "config.json").read_text())["steps"] == 10


def test_cli_config_typo_and_missing_flags(tmp_path, capsys):
  assert main(["train", "--config", "textual_inversion:tiny", "--workdir", str(tmp_path),
               "--config.data.resolutoin=64"]) == 2
  assert "resolutoin" in capsys.readouterr().err
  assert main(["train", "--config", "no_such_method:tiny", "--workdir", str(tmp_path)]) == 2
  assert "no shipped config 'no_such_method'" in capsys.readouterr().err
  assert main(["train", "--config", "textual_inversion:tiny"]) == 2
  assert "--workdir" in capsys.readouterr().err


def _train_subprocess(config_file, workdir, env):
  return subprocess.Popen([sys.executable, "-m", "persona_jax", "train", "--config", str(config_file),
                           "--workdir", str(workdir), "--noprogress"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_state(workdir, step):
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  import jax
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


KILL_AFTER = [4] + sorted(np.random.default_rng(0).choice(np.arange(1, 8), 2, replace=False).tolist())


@slow             # three subprocesses compiling the step: ~75 s of the 15-minute CI budget
@pytest.mark.parametrize("kill_after", KILL_AFTER)
def test_sigkill_and_resume_ends_bitwise_equal(model_dirs, tmp_path, kill_after):
  """A run killed with SIGKILL after its step-K checkpoint and resumed by the identical command
  ends with the same trainable params and optimizer state, bit for bit, as an uninterrupted run.
  (Slow-only, with two more seeded random K.)"""
  values = ti_config(model_dirs["sd1"], steps=8, checkpoint_every=1, keep_checkpoints=10).to_dict()
  config_file = tmp_path / "ti.py"
  config_file.write_text("import json\nfrom ml_collections import ConfigDict\n\n"
                         f"def get_config(arg=None):\n  return ConfigDict(json.loads({json.dumps(json.dumps(values))}))\n")
  env = dict(os.environ, PERSONA_JAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
  a = _train_subprocess(config_file, tmp_path / "a", env)
  assert a.wait(timeout=600) == 0, a.stderr.read()
  b = _train_subprocess(config_file, tmp_path / "b", env)
  deadline = time.time() + 600
  while not (tmp_path / "b" / "checkpoints" / str(kill_after)).is_dir():
    assert b.poll() is None, b.stderr.read()
    assert time.time() < deadline
    time.sleep(0.05)
  b.send_signal(signal.SIGKILL)
  b.wait()
  killed_at = max(int(p) for p in os.listdir(tmp_path / "b" / "checkpoints") if p.isdigit())
  assert killed_at < 8, "the run finished before it could be killed"
  resumed = _train_subprocess(config_file, tmp_path / "b", env)
  assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
  assert "resuming" in resumed.stderr.read()
  sa, sb = _final_state(tmp_path / "a", 8), _final_state(tmp_path / "b", 8)
  assert sa.keys() == sb.keys() and any("tokens" in k for k in sa)
  for k in sa:
    assert np.array_equal(sa[k], sb[k]), k
  ea = load_file(tmp_path / "a" / "learned_embeds.safetensors")
  eb = load_file(tmp_path / "b" / "learned_embeds.safetensors")
  assert np.array_equal(ea["<my-toy>"], eb["<my-toy>"])


def test_continue_with_changes_is_explicit_logged_and_limited(model_dirs, tmp_path, caplog):
  """A stopped run continues from its checkpoint with a lower lr and more steps only with
  continue_with_changes (the CLI's --continue-with-changes), each change logged and kept in
  WORKDIR/config_changes.jsonl; any other change is still refused. (And a torn last line of
  metrics.jsonl is terminated before the resumed run appends.)"""
  import logging
  wd = tmp_path / "run"
  loop.train(ti_config(model_dirs["sd1"], steps=2), wd, progress=False, mesh=one_device_mesh())
  lower = ti_config(model_dirs["sd1"], steps=4, optim=dict(lr=1e-3))
  with pytest.raises(ConfigError, match=r"differs in optim.lr\); .*add --continue-with-changes"):
    loop.train(lower, wd, progress=False, mesh=one_device_mesh())
  other = ti_config(model_dirs["sd1"], steps=4, batch_size=1)
  with pytest.raises(ConfigError, match=r"differs in batch_size\); resume with the same config or "
                                        r"use a new workdir$"):
    loop.train(other, wd, progress=False, mesh=one_device_mesh(), continue_with_changes=True)
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')                     # a torn line: the first run killed mid-write
  with caplog.at_level(logging.WARNING):
    result = loop.train(lower, wd, progress=False, mesh=one_device_mesh(), continue_with_changes=True)
  assert result["steps"] == 4
  lines = (wd / "metrics.jsonl").read_text().splitlines()     # the torn line was terminated
  assert lines[2] == '{"step": 3, "lo'
  assert [json.loads(line)["step"] for line in lines[:2] + lines[3:]] == [1, 2, 3, 4]
  assert f"{wd}: continuing with optim.lr changed from 0.005 to 0.001" in caplog.text
  (record,) = [json.loads(line) for line in (wd / "config_changes.jsonl").read_text().splitlines()]
  assert record["changes"] == {"optim.lr": [0.005, 0.001], "steps": [2, 4]}
  assert json.loads((wd / "config.json").read_text())["optim"]["lr"] == 0.001
