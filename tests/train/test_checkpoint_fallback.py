"""Checkpoint fallback: a damaged checkpoint (truncated or bit-flipped state file, deleted
_METADATA, missing iterator state) is named by its bad file, moved to WORKDIR/damaged/, and the
newest intact one resumes; none intact is one line; a damaged config.json names the file."""

import logging
import os
import shutil

import pytest

from persona_jax import ConfigError
from persona_jax.train import checkpoint as ckpt
from persona_jax.train import loop
from tests.runs import one_device_mesh, ti_config


@pytest.fixture(scope="module")
def finished(model_dirs, tmp_path_factory):
  """A 4-step run with checkpoints 2 and 4."""
  wd = tmp_path_factory.mktemp("fallback") / "run"
  loop.train(ti_config(model_dirs["sd1"], steps=4, checkpoint_every=2, keep_checkpoints=5), wd,
             progress=False, mesh=one_device_mesh())
  return wd


def _damage(step_dir, how):
  """Damages a finished checkpoint as disks and people do."""
  files = sorted((step_dir / "state").rglob("d/*"))
  if how == "truncated-state":
    for data in files:
      data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  elif how == "flipped-state":
    for data in files:
      raw = bytearray(data.read_bytes())
      for k in range(10):
        raw[(len(raw) // 3 + 7 * k) % len(raw)] ^= 0xFF
      data.write_bytes(bytes(raw))
  elif how == "deleted-metadata":
    (step_dir / "state" / "_METADATA").unlink()
  else:                                     # the data iterator's state file
    (step_dir / "data" / "process_0-of-1.json").unlink()


def test_a_damaged_checkpoint_falls_back_and_the_run_finishes(finished, model_dirs, tmp_path, caplog):
  """Resume names the damaged checkpoint's bad file, moves it to WORKDIR/damaged/, resumes from
  the newest intact one and finishes; with none intact, one line says so."""
  from persona_jax.train.checkpoint import DamagedCheckpoint
  how = "truncated-state"
  wd = shutil.copytree(finished, tmp_path / "run")
  _damage(wd / "checkpoints" / "4", how)
  with caplog.at_level(logging.WARNING):
    loop.train(ti_config(model_dirs["sd1"], steps=6, checkpoint_every=2, keep_checkpoints=5), wd,
               progress=False, mesh=one_device_mesh())
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert f"checkpoint step 4 is damaged ({wd / 'checkpoints' / '4'}" in warning
  assert "resuming from step 2, the newest intact checkpoint" in warning
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"] and os.listdir(wd / "damaged") == ["4"]
  for step in ("2", "4", "6"):               # none intact: one line, nothing moved
    _damage(wd / "checkpoints" / step, "deleted-metadata")
  with pytest.raises(DamagedCheckpoint, match=r"no intact checkpoint in .*checkpoints: step 6: "
                                              r".*step 4: .*step 2: .*Move .* aside"):
    loop.train(ti_config(model_dirs["sd1"], steps=8, checkpoint_every=2, keep_checkpoints=5), wd,
               progress=False, mesh=one_device_mesh())
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]


def test_a_damaged_config_json_names_the_file(finished, model_dirs, tmp_path):
  wd = shutil.copytree(finished, tmp_path / "run")
  (wd / "config.json").write_text((wd / "config.json").read_text()[:40])
  with pytest.raises(ConfigError, match=rf"{wd / 'config.json'}: damaged, not valid JSON"):
    loop.train(ti_config(model_dirs["sd1"], steps=4, checkpoint_every=2, keep_checkpoints=5), wd,
               progress=False, mesh=one_device_mesh())


@pytest.fixture(scope="module")
def restore_args(model_dirs):
  """(abstract state, a fresh data iterator factory, the base fingerprint) of the run's config."""
  import jax

  from persona_jax.data.pipeline import make_iterator
  run = loop.build(ti_config(model_dirs["sd1"], steps=4), mesh=one_device_mesh())
  state = loop.initial_state(run)
  abstract = ckpt.abstract_of(state, jax.tree.map(lambda x: x.sharding, state))
  return abstract, lambda: make_iterator(run.dataset), run.fingerprint


@pytest.mark.parametrize("how", ["flipped-state", "deleted-metadata", "missing-iterator"])
def test_each_kind_of_damage_is_found_and_named(finished, restore_args, tmp_path, caplog, how):
  """The other damages, through `restore_latest` itself: step 4 named by its bad file, moved
  aside, step 2 restored."""
  abstract, iterator, fingerprint = restore_args
  wd = shutil.copytree(finished, tmp_path / "run")
  _damage(wd / "checkpoints" / "4", how)
  manager = ckpt.make_manager(wd, 5)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(manager, abstract, iterator(), fingerprint, wd)
  manager.close()
  assert restored[1] == 2 and os.listdir(wd / "damaged") == ["4"]
  named = {"flipped-state": "checkpoints/4/state", "deleted-metadata": "checkpoints/4/state/_METADATA",
           "missing-iterator": "checkpoints/4/data/process_0-of-1.json"}[how]
  assert f"checkpoint step 4 is damaged ({wd}/{named}" in caplog.text
