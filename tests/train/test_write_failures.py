"""A full disk (ENOSPC) in each writer: one line naming the file, the free space and the last
complete checkpoint; no temporary file of ours left; nothing written before lost."""

import errno

import numpy as np
import pytest

from persona_jax.cli import main
from persona_jax.convert import files
from persona_jax.errors import WriteFailed
from persona_jax.train import checkpoint as ckpt
from persona_jax.train import loop
from tests.runs import one_device_mesh, ti_config


def full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def temporaries(folder):
  return sorted(str(p) for p in folder.rglob(".*.tmp")) + sorted(
      str(p) for p in folder.rglob("*orbax-checkpoint-tmp*"))


def test_a_full_disk_at_the_result_keeps_the_checkpoints(model_dirs, tmp_path, monkeypatch):
  wd = tmp_path / "run"
  monkeypatch.setattr(files, "safetensors_bytes", full_disk)
  with pytest.raises(WriteFailed, match=rf"^{wd / 'learned_embeds.safetensors'}: cannot write it "
                                        r"\(No space left on device; [\d.]+ MB free in .*\); nothing "
                                        r"of it was kept; the last complete checkpoint is step 4 in "
                                        rf"{wd / 'checkpoints'}; the same command resumes"):
    loop.train(ti_config(model_dirs["sd1"], steps=4), wd, progress=False, mesh=one_device_mesh())
  assert not temporaries(wd) and not (wd / "learned_embeds.safetensors").exists()
  monkeypatch.undo()
  loop.train(ti_config(model_dirs["sd1"], steps=4), wd, progress=False, mesh=one_device_mesh())
  assert (wd / "learned_embeds.safetensors").is_file()


def test_a_full_disk_at_a_checkpoint_names_the_last_complete_one(model_dirs, tmp_path, monkeypatch):
  wd = tmp_path / "run"
  save = ckpt.save

  def save_then_fill(manager, step, *args):
    if step == 4:
      full_disk()
    save(manager, step, *args)
  monkeypatch.setattr(ckpt, "save", save_then_fill)
  with pytest.raises(WriteFailed, match=rf"^{wd / 'checkpoints' / '4'}: cannot write it .*; the "
                                        r"last complete checkpoint is step 2 in"):
    loop.train(ti_config(model_dirs["sd1"], steps=4), wd, progress=False, mesh=one_device_mesh())
  assert [p.name for p in (wd / "checkpoints").iterdir()] == ["2"] and not temporaries(wd)


@pytest.mark.parametrize("writer", ["config", "metrics"])
def test_a_full_disk_at_the_config_or_the_metrics(model_dirs, tmp_path, monkeypatch, writer):
  wd = tmp_path / "run"
  if writer == "config":
    monkeypatch.setattr(files, "_publish", full_disk)
    where, last = wd / "config.json", "no checkpoint was complete yet"
  else:
    monkeypatch.setattr(loop, "_append_line", full_disk)
    where, last = wd / "metrics.jsonl", "no checkpoint was complete yet"
  with pytest.raises(WriteFailed, match=rf"^{where}: cannot write it .*; {last}$"):
    loop.train(ti_config(model_dirs["sd1"], steps=2), wd, progress=False, mesh=one_device_mesh())
  assert not temporaries(wd)


def test_a_full_disk_at_an_export_or_an_image(model_dirs, tmp_path, monkeypatch, capsys):
  """export (and its export.json) and PNG writes (sample grids, class images: images.save_png)."""
  from persona_jax import images
  wd = tmp_path / "run"
  loop.train(ti_config(model_dirs["sd1"], steps=2), wd, progress=False, mesh=one_device_mesh())
  monkeypatch.setattr(files, "_publish", full_disk)
  out = tmp_path / "out"
  assert main(["export", str(wd), "--format", "diffusers", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{out / 'learned_embeds.safetensors'}: cannot write it (No space" in err[0]
  assert not temporaries(out)
  monkeypatch.setattr(files.os, "replace", full_disk)          # the rename, after the PNG is written
  with pytest.raises(WriteFailed, match=rf"^{tmp_path / 'grid.png'}: cannot write it"):
    images.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "grid.png")
  assert not list(tmp_path.glob(".grid.png*"))
