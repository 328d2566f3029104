"""`persona-jax bench`'s report and presets: persona_jax-only cases (E4T) print dashes, not NaNs;
the sdxl preset's added conditioning."""

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


def test_sdxl_preset_runs_the_unet_cases_and_plans_the_real_unet():
  import pytest

  from persona_jax.errors import ConfigError
  from persona_jax.models.configs import UNetConfig
  p = benchmark.PRESETS["sdxl"]
  assert UNetConfig.from_dict(p.unet).addition_embed_type == "text_time"
  assert p.pooled == 160 and benchmark.added_cond_shapes(p, 3) == {"text_embeds": (3, 160),
                                                                   "time_ids": (3, 6)}
  added = benchmark.added_cond(p, 2)
  assert added["time_ids"].tolist() == [[256, 256, 0, 0, 256, 256]] * 2
  assert "ti_train" not in p.cases and "e4t_tune" not in p.cases and "db_train" in p.cases
  full = benchmark.PRESETS[p.plan].unet            # stable-diffusion-xl-base-1.0/unet/config.json
  assert (full["block_out_channels"], full["transformer_layers_per_block"],
          full["attention_head_dim"], full["cross_attention_dim"],
          full["projection_class_embeddings_input_dim"], benchmark.PRESETS[p.plan].pooled) == (
              [320, 640, 1280], [1, 2, 10], [5, 10, 20], 2048, 2816, 1280)
  assert benchmark.added_cond(benchmark.PRESETS["reduced"], 2) is None
  with pytest.raises(ConfigError, match="does not run ti_train"):
    benchmark.bench(preset="sdxl", cases=("unet_forward", "ti_train"))


def test_added_conditioning_reaches_the_unet_kwargs():
  """The bench's cached SDXL batches carry `pooled` and `time_ids`, which the methods' own text
  conditioning hands to the UNet as its added conditioning (no bench-local conditioning)."""
  from persona_jax.benchmark.jax_cases import cached_added
  from persona_jax.methods import dreambooth
  from persona_jax.models.components import SDModels
  method = dreambooth.make(dreambooth.DreamBoothConfig(), {})
  batch = {"context": "ctx", **cached_added({"text_embeds": "pooled", "time_ids": "ids"}),
           "prior": "p"}
  models = SDModels(None, None, None)
  state = method.conditioning.prepare(models, None, batch)
  kwargs, terms = method.conditioning.at(models, None, state, None, None, None)
  assert kwargs == {"encoder_hidden_states": "ctx",
                    "added_cond": {"text_embeds": "pooled", "time_ids": "ids"}} and terms == {}
  assert cached_added(None) == {}
