"""One run per workdir: a second `train` is refused while another process holds the workdir,
`export` and `sample --run` say the run is in progress, and a SIGKILLed holder leaves no stale
lock."""

import json
import os
import signal
import subprocess
import sys

from persona_jax.cli import main
from persona_jax.workdir_lock import holder

HOLD = """
import sys, time
from persona_jax.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_is_refused_and_a_killed_one_leaves_no_lock(model_dirs, tmp_path, capsys):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps({"model": str(model_dirs["sd1"]),
                                              "method": {"name": "textual_inversion"}}))
  other = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE, text=True)
  try:
    assert other.stdout.readline().strip() == "held"
    assert holder(wd).startswith(f"process {other.pid} on ")
    train = ["train", "--config", "textual_inversion:tiny", "--workdir", str(wd), "--noprogress",
             f"--config.model={model_dirs['sd1']}", "--config.steps=1", "--config.batch_size=8",
             "--config.sample_prompts=()"]
    assert main(train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{wd}: another run is training in this workdir (process {other.pid}" in err[0]
    assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert f"{wd}: the run is in progress (process {other.pid}" in capsys.readouterr().err
    assert main(["sample", "--run", str(wd), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    assert "the run is in progress" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (wd / "checkpoints").exists()
  finally:
    os.kill(other.pid, signal.SIGKILL)
    other.wait()
  # The kernel dropped the dead holder's lock: the file remains, the workdir is free.
  assert (wd / ".lock").is_file() and holder(wd) is None
  assert main(train) == 0
  capsys.readouterr()
  assert (wd / "learned_embeds.safetensors").is_file()
