"""mixed_precision `auto`: bf16 compute on an accelerator, float32 on CPU, resolved once per run
(config.json records the choice); `no` and `bf16` are kept as asked."""

import json

import jax
import pytest

from persona_jax.errors import ConfigError
from persona_jax.train import loop
from persona_jax.train.config import RunConfig, resolve_mixed_precision
from tests.runs import ti_config


@pytest.mark.parametrize("value,backend,want", [
    ("auto", "cpu", "no"), ("auto", "gpu", "bf16"), ("auto", "tpu", "bf16"),
    ("no", "tpu", "no"), ("no", "gpu", "no"), ("bf16", "cpu", "bf16")])
def test_resolution_rule(value, backend, want):
  assert resolve_mixed_precision(value, backend) == want


def test_auto_is_the_default_and_follows_the_default_backend(monkeypatch):
  assert RunConfig().mixed_precision == "auto"
  assert resolve_mixed_precision("auto") == "no"                    # this CPU: float32 as before
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert resolve_mixed_precision("auto") == "bf16"
  with pytest.raises(ConfigError, match="mixed_precision: 'fp16' is not one of auto, no, bf16"):
    ti_config("model", mixed_precision="fp16")


def test_the_run_records_the_resolved_choice(tmp_path, monkeypatch):
  """config.json holds what `auto` became; a run started with `auto` (or before the option
  existed, by the old default `no` or without the key) resumes on the same kind of backend,
  and a change of backend under an explicit config is refused."""
  wd = tmp_path / "run"
  wd.mkdir()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  loop._write_config(wd, ti_config("model"))
  saved = json.loads((wd / "config.json").read_text())
  assert saved["mixed_precision"] == "bf16"
  (wd / "checkpoints" / "2").mkdir(parents=True)
  loop._write_config(wd, ti_config("model"))                        # resumes: auto is bf16 here
  loop._write_config(wd, ti_config("model", mixed_precision="bf16"))
  with pytest.raises(ConfigError, match="differs in mixed_precision"):
    loop._write_config(wd, ti_config("model", mixed_precision="no"))
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  for old in ({"mixed_precision": "no"}, {}):                       # a CPU run of an earlier version
    (wd / "config.json").write_text(json.dumps({**{k: v for k, v in saved.items()
                                                   if k != "mixed_precision"}, **old}))
    loop._write_config(wd, ti_config("model"))
