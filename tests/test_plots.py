import json

import numpy as np
import pytest
from PIL import Image

from persona_jax.data.images import DataError
from persona_jax.plots import COLOURS, loss_curve, read_metrics, smooth


def _write(path, records, torn=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_loss_curve_draws_each_series_and_skips_a_torn_line(tmp_path):
  records = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 101)]
  _write(tmp_path / "metrics.jsonl", records, torn='{"step": 101, "lo')
  assert len(read_metrics(tmp_path / "metrics.jsonl")) == 100
  path = loss_curve(tmp_path, keys=("loss", "lr"), window=5)
  image = np.asarray(Image.open(path).convert("RGB"))
  for colour in COLOURS[:2]:
    assert np.all(image == colour, axis=-1).sum() > 50, colour


def test_resumed_run_records_use_the_later_value(tmp_path, monkeypatch):
  first = [{"step": s, "loss": 5.0} for s in range(1, 11)]
  resumed = [{"step": s, "loss": 1.0} for s in range(6, 21)]
  _write(tmp_path / "metrics.jsonl", first + resumed)
  from persona_jax import plots
  seen = {}
  real = plots.line_plot
  monkeypatch.setattr(plots, "line_plot",
                      lambda series, *a, **k: seen.update(series) or real(series, *a, **k))
  loss_curve(tmp_path, window=1)
  (x, y), = seen.values()
  assert list(x) == list(range(1, 21))
  assert list(y) == [5.0] * 5 + [1.0] * 15


def test_smooth_is_a_trailing_mean():
  np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def test_missing_file_and_missing_key_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="metrics.jsonl"):
    loss_curve(tmp_path)
  _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
  with pytest.raises(DataError, match="no records with kl"):
    loss_curve(tmp_path, keys=("kl",))
