"""scripts/device_bench.sh, the prepared GPU benchmark, run here on the CPU: its --dry-run goes the
whole way (model write, FLOP counts, every persona_jax and PyTorch worker, the report) with a tiny
model; with no budget left it still unpacks the carried packages this machine lacks, writes the
model, counts FLOPs and reports every job as skipped."""

import io
import json
import tarfile
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.markers import slow

ROOT = Path(__file__).resolve().parents[1]


def run_script(out: Path, *flags, env=None) -> list[dict]:
  env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
  proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_bench.sh"), "--dry-run", "--out",
                         str(out), *flags], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (out / "device_bench.jsonl").read_text().splitlines()]
  assert records[0]["kind"] == "meta" and records[-1]["kind"] == "end"
  assert (out / "device_bench.md").read_text().strip() in proc.stdout
  return records


def write_bundle(folder: Path, name: str, version: str) -> None:
  """A carried package as device_wheels.sh stores one: a wheel's contents in NAME-VERSION-...tar.xz."""
  folder.mkdir(exist_ok=True)
  files = {f"{name}/__init__.py": "", f"{name}-{version}.dist-info/METADATA":
           f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}
  with tarfile.open(folder / f"{name}-{version}-py3-none-any.tar.xz", "w:xz") as tar:
    for path, text in files.items():
      info = tarfile.TarInfo(path)
      info.size = len(text.encode())
      tar.addfile(info, io.BytesIO(text.encode()))


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_no_budget_left_reports_every_job_skipped(tmp_path):
  packages, site = tmp_path / "packages", tmp_path / "site"
  write_bundle(packages, "pj_device_bench_probe", "1.0")      # missing here: unpacked
  write_bundle(packages, "numpy", "0.1")                        # older than ours: left alone
  records = run_script(tmp_path / "out", "--budget", "-1", "--cases", "sample", "lora",
                       "dreambooth", env=dict(DEVICE_BENCH_PACKAGES=str(packages),
                                              DEVICE_BENCH_SITE=str(site)))
  assert sorted(p.name for p in site.iterdir()) == ["pj_device_bench_probe",
                                                    "pj_device_bench_probe-1.0.dist-info"]
  flops = [r for r in records if r["kind"] == "flops"]
  assert [(r["model"], r["size"]) for r in flops] == [("tiny", 32)]
  assert finite(flops[0]["per_image_flops"])
  skipped = {(r["case"], r["framework"]) for r in records if r["kind"] == "skipped"}
  assert skipped == {(c, fw) for c in ("sample", "lora", "dreambooth") for fw in ("jax", "torch")}
  assert not [r for r in records if r["kind"] == "result"]
  table = (tmp_path / "out" / "device_bench.md").read_text()
  assert table.count("not measured: budget") == 6


@slow
def test_dry_run_measures_every_case_on_both_frameworks(tmp_path):
  records = run_script(tmp_path, "--peak-tflops", "1")
  assert not [r for r in records if r["kind"] == "skipped"]
  measured = [r for r in records if r["kind"] == "result"]
  summary = records[-2]["results"]                 # with the FLOPs known at the end
  assert records[-2]["kind"] == "summary" and len(summary) == len(measured)
  results = {(r["case"], r["framework"], r["batch"]): r for r in summary}
  expected = {(case, fw, batch) for fw in ("jax", "torch")
              for case, batch in (("sample", 1), ("sample", 2), ("lora", 2), ("dreambooth", 2),
                                  ("sdxl_sample", 1))}
  assert set(results) == expected
  for (case, fw, _), r in results.items():
    keys = ["seconds", "peak_mb", "flops", "mfu", "first_call_s"]
    keys += ["per_image_s"] if "sample" in case else ["steps_per_s"]
    keys += ["compile_s"] if fw == "jax" else []
    assert all(finite(r[k]) for k in keys), (case, fw, {k: r[k] for k in keys})
    assert r["mfu"] == r["flops"] / r["seconds"] / 1e12
  # Sampling FLOPs grow with the batch; the train steps' come from XLA's lowered program.
  assert results["sample", "jax", 2]["flops"] == 2 * results["sample", "jax", 1]["flops"]
  assert results["lora", "jax", 2]["flops_source"] == "lowered"
  assert results["sdxl_sample", "jax", 1]["model"] == "tiny_sdxl"
  table = (tmp_path / "device_bench.md").read_text()
  for case, fw, batch in expected:
    assert f"| {case} | {results[case, fw, batch]['model']} | {batch} |" in table


def test_a_failing_worker_is_reported_with_its_last_log_line(tmp_path):
  from persona_jax.benchmark import device
  report = device.Report(tmp_path, None)
  job = device.Job("sample/jax", "jax", dict(case="sample", model=str(tmp_path / "missing"),
                                             model_name="tiny", size=32, dtype="float32",
                                             batches=[1], steps=2, reps=1))
  status = device.run_worker(job, report, dict(os.environ), timeout=120)
  assert status.startswith("failed (exit 1): ") and "missing" in status
  assert report.records == []
