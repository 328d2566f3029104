"""`persona-jax bench`'s report: persona_jax-only cases (E4T) print dashes, not NaNs."""

from persona_jax import benchmark


def test_report_rows_with_and_without_a_diffusers_counterpart():
  r = dict(median_s=1.5, first_call_s=2.0, peak_rss_mb=30, steady_peak_rss_mb=40,
           xla_memory_mb=None)
  meta = dict(preset="reduced", dtype="float32", reps=1, iters=1, machine="m", device="cpu",
              jax="j", torch="t", date="d")
  text = benchmark.format_summary({"e4t_tune": {"jax": r},
                                   "db_train": {"jax": r, "torch": r, "speedup": 1.0}}, meta)
  rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
  assert rows["e4t_tune"] == "| e4t_tune | 1500 ms | - | - | 2.0 s / - | 30 MB / - | 40 MB / - |"
  assert rows["db_train"].startswith("| db_train | 1500 ms | 1500 ms | 1.00x | 2.0 s / 2.0 s |")
  assert "e4t_tune" in benchmark.JAX_ONLY and "e4t_tune" in benchmark.CASES
