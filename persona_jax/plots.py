"""Loss curves as PNGs, drawn with Pillow (no plotting library): `persona-jax plot WORKDIR` reads
WORKDIR/metrics.jsonl and writes WORKDIR/loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from persona_jax.data.images import DataError
from persona_jax.images import save_png

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def read_metrics(path: Path) -> list[dict]:
  """The records of a metrics.jsonl (a torn last line, from a run killed mid-write, is skipped)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file; point at a training workdir (it writes metrics.jsonl)")
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average over `window` points (shorter at the start)."""
  if window <= 1 or len(values) < 2:
    return values
  c = np.cumsum(np.insert(values, 0, 0.0))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def line_plot(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
              size: tuple[int, int] = (720, 400), log_y: bool = False) -> np.ndarray:
  """{label: (x [N], y [N])} -> an [H, W, 3] uint8 chart with axes, ticks and a legend."""
  w, h = size
  left, right, top, bottom = 64, 16, 28, 36
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
  ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
  ys_t = np.log10(np.maximum(ys, 1e-12)) if log_y else ys
  x0, x1 = float(xs.min()), float(xs.max())
  y0, y1 = float(np.nanmin(ys_t)), float(np.nanmax(ys_t))
  if x1 == x0:
    x1 = x0 + 1
  if y1 == y0:
    y1 = y0 + 1

  def px(x, y):
    return (left + (x - x0) / (x1 - x0) * (w - left - right),
            top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

  draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
  for i in range(5):
    yv = y0 + (y1 - y0) * i / 4
    _, yp = px(x0, yv)
    draw.line([left, yp, w - right, yp], fill=(225, 225, 225))
    label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
    draw.text((4, yp - 6), label, fill=(0, 0, 0), font=font)
    xv = x0 + (x1 - x0) * i / 4
    xp, _ = px(xv, y0)
    draw.text((xp - 12, h - bottom + 6), f"{xv:.0f}", fill=(0, 0, 0), font=font)
  for k, (label, (x, y)) in enumerate(series.items()):
    colour = COLOURS[k % len(COLOURS)]
    y = np.log10(np.maximum(np.asarray(y, float), 1e-12)) if log_y else np.asarray(y, float)
    points = [px(a, b) for a, b in zip(np.asarray(x, float), y) if math.isfinite(b)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    draw.text((left + 8, top + 6 + 14 * k), label, fill=colour, font=font)
  if title:
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
  return np.asarray(image)


def loss_curve(workdir, out=None, keys=("loss",), window: int = 20, log_y: bool = True) -> Path:
  """Writes the smoothed curves of `keys` from WORKDIR/metrics.jsonl to OUT (default
  WORKDIR/loss.png); returns the path."""
  workdir = Path(workdir)
  records = read_metrics(workdir / "metrics.jsonl")
  series = {}
  for key in keys:
    # A resumed run appends again from its checkpoint's step: the later record of a step wins.
    by_step = {r["step"]: r[key] for r in records if key in r and "step" in r}
    rows = sorted(by_step.items())
    if rows:
      x, y = map(np.asarray, zip(*rows))
      series[f"{key} (mean of {window})" if window > 1 else key] = (x, smooth(y.astype(float), window))
  if not series:
    raise DataError(f"{workdir / 'metrics.jsonl'}: no records with {', '.join(keys)}")
  title = f"{workdir.name}: {', '.join(keys)} by step"
  return save_png(line_plot(series, title, log_y=log_y), Path(out) if out else workdir / "loss.png")
