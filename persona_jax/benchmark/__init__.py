"""`persona-jax bench`: persona_jax against diffusers PyTorch on identical weights.

Each measurement runs in its own subprocess (two frameworks fighting for the same cores in one
process is not a measurement), alternating A B A B over several repetitions; the report gives
medians and ratios. persona_jax's first call is timed cold (the first repetition, on an empty
persistent compilation cache of its case) and warm (the later ones, loading what the first
stored: what a second run of a command costs). Peak memory is the process's peak RSS (JAX's
`memory_stats()` is empty on CPU; on GPU the device's peak bytes are reported too).

Cases (more join as methods land):
  unet_forward   UNet forward at batch 2 (one classifier-free-guidance step), no gradients
  unet_train     full-UNet train step at batch 4: forward, backward, AdamW
  ti_train       Textual Inversion step at batch 4: text encoder with one new token row, UNet,
                 backward to the row, AdamW (persona_jax: the row only; PyTorch as diffusers'
                 example: AdamW over the whole embedding table, other rows restored), from
                 latents (diffusers' script also VAE-encodes pixels every step)
  db_train       DreamBooth step (UNet only) at batch 2 instance + 2 class rows, cached latents
                 and text contexts, prior loss, grad-norm clipping 1.0, AdamW over the full UNet
                 (persona_jax: the real train_step and method; PyTorch: diffusers'
                 train_dreambooth.py step)
  lora_train     LoRA rank 4 on the attention projections (to_q, to_k, to_v, to_out) at batch 4,
                 cached text contexts, AdamW over the factors (persona_jax: the lora method, factors
                 merged into the weights each step; PyTorch: peft's LoRA adapter on the same
                 modules, as diffusers' train_dreambooth_lora.py)
  dblora_train   DreamBooth-LoRA: lora_train with prior preservation, 2 instance + 2 class rows
                 in one forward, loss mean(instance) + mean(class) (diffusers'
                 train_dreambooth_lora(_sdxl).py with --with_prior_preservation)
  cd_train       Custom Diffusion at batch 4: cross-attention to_k/to_v trainable, BOS key/value
                 detached, cached text contexts, clipping 1.0, AdamW (persona_jax: the
                 custom_diffusion method without a modifier token; PyTorch: diffusers'
                 train_custom_diffusion.py, CustomDiffusionAttnProcessor2_0 with train_kv)
  e4t_tune       E4T's 15 tuning steps at batch 4 (one timed iteration is all 15): the tune
                 phase's trainable set (the whole UNet, the E4T encoder, rank-4 weight offsets on
                 every attention q/k/v), a frozen CLIP image encoder (class tokens of every second
                 layer) and the UNet's down/mid features recomputed for z_t in each step; the real
                 method and train_step from a randomly initialized encoder (a pre-trained one
                 costs the same). persona_jax only: diffusers has no E4T.
  db_train_bf16, db_train_remat, db_train_accum2
                 the same with one memory option: bf16 compute with float32 params (PyTorch:
                 autocast, as accelerate's --mixed_precision bf16), remat of UNet blocks
                 (PyTorch: gradient checkpointing), 2 accumulated micro-batches of 1 + 1 rows
Presets:
  reduced  the SD 1.5 architecture at reduced width: block_out_channels (64, 128, 256, 256),
           layers_per_block 2, 8 heads, cross_attention_dim 256, 32x32 latents (CPU-sized);
           e4t_tune's image encoder a ViT-B/14-like tower at width 256 (12 layers, 224 px)
  sd15     the real SD 1.5 UNet shapes, 64x64 latents (for GPU/TPU machines); e4t_tune's image
           encoder has OpenCLIP ViT-H/14's shapes (the reference's)
  sdxl     the SDXL base UNet's layout (no attention at the first level, linear projections,
           head size 64, text_time added conditioning) at reduced width: block_out_channels
           (64, 128, 256), heads (1, 2, 4), transformer depths (1, 2, 4) (SDXL: (1, 2, 10); 4
           compiles in a third of the time, for a step ~10% faster), cross_attention_dim 256
           (two encoders' 96 + 160), pooled text 160, time-id width 32, 32x32 latents
           (CPU-sized). Only the cases without a text or image encoder (not ti_train,
           e4t_tune), each also given pooled text embeds [B, 160] and time ids [B, 6]
           (diffusers' added_cond_kwargs; ours: the cached batch's `pooled` and `time_ids`,
           which the text conditioning hands to the UNet). With --memory-plan: sdxl_full's
           shapes.
  sdxl_full  stable-diffusion-xl-base-1.0's UNet shapes (2.6B parameters), 128x128 latents
           (for GPU/TPU machines; what `--preset sdxl --memory-plan` plans)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DB_VARIANTS = ("db_train", "db_train_bf16", "db_train_remat", "db_train_accum2")
ADAPTER_CASES = ("lora_train", "dblora_train", "cd_train")
CASES = ("unet_forward", "unet_train", "ti_train", "lora_train", "dblora_train", "cd_train",
         "e4t_tune") + DB_VARIANTS
JAX_ONLY = ("e4t_tune",)                                         # no diffusers counterpart
E4T_STEPS = 15
DEFAULT_CASES = ("unet_forward", "unet_train", "ti_train", "db_train", "lora_train",
                 "cd_train")                                     # the memory variants on request
FRAMEWORKS = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class Preset:
  unet: dict
  latent: int          # latent height = width
  text_encoder: dict = dataclasses.field(default_factory=dict)
  context_len: int = 77
  image_encoder: dict = dataclasses.field(default_factory=dict)   # CLIPVisionConfig fields
  cases: tuple[str, ...] = CASES        # the cases it runs
  plan: str | None = None               # the preset `--memory-plan` plans instead (None: itself)

  @property
  def pooled(self) -> int:
    """Width of SDXL's pooled text embeds (0: no added conditioning)."""
    u = self.unet
    if u.get("addition_embed_type") != "text_time":
      return 0
    return u["projection_class_embeddings_input_dim"] - 6 * u["addition_time_embed_dim"]


_SD15_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, attention_head_dim=8, in_channels=4, out_channels=4, norm_num_groups=32)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5)
_SDXL_BLOCKS = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time", in_channels=4, out_channels=4, norm_num_groups=32)
SDXL_CASES = ("unet_forward", "unet_train", "lora_train", "dblora_train", "cd_train") + DB_VARIANTS
PRESETS = {
    "reduced": Preset(dict(_SD15_BLOCKS, block_out_channels=[64, 128, 256, 256],
                           cross_attention_dim=256, sample_size=32), latent=32,
                      text_encoder=dict(_CLIP, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=12, num_attention_heads=4,
                                        projection_dim=256),
                      image_encoder=dict(hidden_size=256, intermediate_size=1024,
                                         projection_dim=256, num_hidden_layers=12,
                                         num_attention_heads=4, image_size=224, patch_size=14)),
    "sd15": Preset(dict(_SD15_BLOCKS, block_out_channels=[320, 640, 1280, 1280],
                        cross_attention_dim=768, sample_size=64), latent=64,
                   text_encoder=dict(_CLIP, hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     projection_dim=768),
                   image_encoder=dict(hidden_size=1280, intermediate_size=5120,
                                      projection_dim=1024, num_hidden_layers=32,
                                      num_attention_heads=16, image_size=224, patch_size=14,
                                      hidden_act="gelu")),
    # Widths / 5 (head size 64 kept: heads / 5), text and time-id widths / 8 (2048 -> 256 = the
    # two encoders' 768 + 1280 -> 96 + 160), depths (1, 2, 4) for SDXL's (1, 2, 10), latents
    # 128 -> 32.
    "sdxl": Preset(dict(_SDXL_BLOCKS, block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4],
                        transformer_layers_per_block=[1, 2, 4], cross_attention_dim=256,
                        addition_time_embed_dim=32,
                        projection_class_embeddings_input_dim=160 + 6 * 32, sample_size=32),
                   latent=32, cases=SDXL_CASES, plan="sdxl_full"),
    "sdxl_full": Preset(dict(_SDXL_BLOCKS, block_out_channels=[320, 640, 1280],
                             attention_head_dim=[5, 10, 20],
                             transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                             addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=2816, sample_size=128),
                        latent=128, cases=SDXL_CASES),
}
BATCH = ({"unet_forward": 2, "unet_train": 4, "ti_train": 4, "lora_train": 4, "dblora_train": 4,
          "cd_train": 4, "e4t_tune": 4} | {c: 4 for c in DB_VARIANTS})
PLACEHOLDER_POSITION = 5
LORA_RANK = 4


def write_unet(folder: Path, preset: Preset, seed: int = 0) -> Path:
  """A random UNet folder (config.json + safetensors) both frameworks load."""
  from persona_jax.convert.diffusers import params_to_state_dict
  from persona_jax.convert.files import write_json, write_safetensors
  from persona_jax.models.configs import UNetConfig
  from persona_jax.models.components import abstract_params
  from persona_jax.random_model import random_params
  config = UNetConfig.from_dict(preset.unet)
  params = random_params(abstract_params("unet", config), np.random.default_rng(seed))
  write_json(folder / "config.json", {"_class_name": "UNet2DConditionModel", **preset.unet})
  write_safetensors(folder / "diffusion_pytorch_model.safetensors", params_to_state_dict(params))
  return folder


def write_text_encoder(folder: Path, preset: Preset, seed: int = 1) -> Path:
  """A random CLIP text encoder folder (transformers layout, `text_model.` keys)."""
  from persona_jax.convert.diffusers import params_to_state_dict
  from persona_jax.convert.files import write_json, write_safetensors
  from persona_jax.models.configs import TextEncoderConfig
  from persona_jax.models.components import abstract_params
  from persona_jax.random_model import random_params
  config = TextEncoderConfig.from_dict(preset.text_encoder)
  params = random_params(abstract_params("text_encoder", config), np.random.default_rng(seed))
  write_json(folder / "config.json", {"architectures": ["CLIPTextModel"],
                                      "model_type": "clip_text_model", **preset.text_encoder})
  write_safetensors(folder / "model.safetensors", params_to_state_dict(params, prefix="text_model."))
  return folder


def write_image_encoder(folder: Path, preset: Preset, seed: int = 3) -> Path:
  """A random CLIPVisionModelWithProjection folder of the preset's image encoder."""
  from persona_jax.data.clip_images import CLIPImageProcessorConfig
  from persona_jax.image_encoder import save_image_encoder
  import jax
  import jax.numpy as jnp

  from persona_jax.models.clip_vision import CLIPVisionModel
  from persona_jax.models.configs import CLIPVisionConfig
  config = CLIPVisionConfig(**preset.image_encoder, with_projection=True)
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = jax.jit(CLIPVisionModel(config).init)(jax.random.key(seed), pixels)["params"]
  return save_image_encoder(folder, config, params,
                            processor=CLIPImageProcessorConfig.for_image_size(config.image_size))


def _ids(batch: int):
  """Token ids [B, 77]: BOS, random words, the new token (id 49408) at a fixed position, EOS pad."""
  rng = np.random.default_rng(2)
  ids = np.full((batch, 77), 49407, np.int64)
  ids[:, 0] = 49406
  ids[:, 1:9] = rng.integers(300, 40000, (batch, 8))
  ids[:, PLACEHOLDER_POSITION] = 49408
  return ids


def _inputs(preset: Preset, batch: int, channels_last: bool):
  rng = np.random.default_rng(1)
  shape = (batch, preset.latent, preset.latent, 4)
  x = rng.standard_normal(shape).astype(np.float32)
  noise = rng.standard_normal(shape).astype(np.float32)
  t = rng.integers(0, 1000, batch)
  ctx = rng.standard_normal((batch, preset.context_len, preset.unet["cross_attention_dim"])).astype(np.float32)
  if not channels_last:
    x, noise = x.transpose(0, 3, 1, 2).copy(), noise.transpose(0, 3, 1, 2).copy()
  return x, t, ctx, noise


def added_cond_shapes(preset: Preset, batch: int) -> dict:
  """{name: shape} of SDXL's added conditioning ({} without it)."""
  if not preset.pooled:
    return {}
  return {"text_embeds": (batch, preset.pooled), "time_ids": (batch, 6)}


def added_cond(preset: Preset, batch: int) -> dict | None:
  """SDXL's added conditioning of a batch (None without it): pooled text embeds [B, P] and
  time ids [B, 6] = (original size, crop top-left, target size) of the latents' image."""
  if not preset.pooled:
    return None
  size = 8 * preset.latent
  return {"text_embeds": np.random.default_rng(5).standard_normal((batch, preset.pooled)).astype(np.float32),
          "time_ids": np.tile(np.asarray([size, size, 0, 0, size, size], np.float32), (batch, 1))}


def db_options(case: str) -> tuple[bool, bool, int]:
  """(bf16 compute, remat, gradient-accumulation micro-steps) of a db_train case."""
  return case.endswith("bf16"), case.endswith("remat"), 2 if case.endswith("accum2") else 1


# ----------------------------------------------------------------------------------------------
# Driver.


def compilation_cache_env(env: dict, folder: Path) -> dict:
  """A jax worker's environment with its persistent compilation cache in `folder` (every program
  stored, as the CLI stores them: cache.py)."""
  return dict(env, JAX_COMPILATION_CACHE_DIR=str(folder),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _spawn(framework, case, unet_dir, preset, iters, dtype, env) -> dict:
  cmd = [sys.executable, "-m", "persona_jax.benchmark", framework, case, str(unet_dir), preset,
         str(iters), dtype]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"bench worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_note() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def bench(preset: str = "reduced", cases=DEFAULT_CASES, frameworks=FRAMEWORKS, reps: int = 3,
          iters: int = 5, dtype: str = "float32", device_note: str = "", malloc_tunable: bool = True,
          print_fn=print) -> dict:
  """Alternates frameworks over `reps` repetitions per case; returns and prints the summary."""
  unsupported = [c for c in cases if c not in PRESETS[preset].cases]
  if unsupported:
    from persona_jax.errors import ConfigError
    raise ConfigError(f"--preset {preset} does not run {' '.join(unsupported)} (it runs: "
                      f"{' '.join(PRESETS[preset].cases)})")
  import jax
  import torch
  from persona_jax.runtime import MALLOC_TUNABLE
  env = dict(os.environ, PERSONA_JAX_NO_REEXEC="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)    # each case's own, empty at first: cold, then warm
  if malloc_tunable:                            # the same allocator setting for both frameworks
    env["GLIBC_TUNABLES"] = MALLOC_TUNABLE
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    unet_dir = write_unet(Path(tmp) / "unet", PRESETS[preset])
    if PRESETS[preset].text_encoder:
      write_text_encoder(Path(tmp) / "text_encoder", PRESETS[preset])
    if any(c in cases for c in JAX_ONLY):
      write_image_encoder(Path(tmp) / "image_encoder", PRESETS[preset])
    for case in cases:
      for rep in range(reps):
        order = frameworks if rep % 2 == 0 else frameworks[::-1]
        order = [fw for fw in order if fw == "jax" or case not in JAX_ONLY]
        for fw in order:
          fw_env = (compilation_cache_env(env, Path(tmp) / "jax_cache" / case) if fw == "jax"
                    else env)
          r = _spawn(fw, case, unet_dir, preset, iters, dtype, fw_env)
          r["rep"] = rep
          if fw == "jax":
            r["cache"] = "warm" if rep else "cold"
          results.append(r)
          print_fn(f"  {case:14s} {fw:5s} rep {rep}: median {r['median_s'] * 1e3:8.1f} ms, "
                   f"first call {r['first_call_s']:6.1f} s {r.get('cache', ''):4s}, "
                   f"peak RSS {r['peak_rss_mb']:7.0f} MB "
                   f"(steps {r.get('steady_peak_rss_mb') or 0:7.0f} MB)")
  summary = {}
  for case in cases:
    row = {}
    for fw in frameworks:
      rs = [r for r in results if r["case"] == case and r["framework"] == fw]
      if not rs:                     # a persona_jax-only case
        continue
      cold = [r for r in rs if r.get("cache") != "warm"]
      warm = [r["first_call_s"] for r in rs if r.get("cache") == "warm"]
      row[fw] = dict(median_s=statistics.median(r["median_s"] for r in rs),
                     first_call_s=statistics.median(r["first_call_s"] for r in cold),
                     first_call_warm_s=statistics.median(warm) if warm else None,
                     peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
                     steady_peak_rss_mb=max(r.get("steady_peak_rss_mb") or 0 for r in rs),
                     device_peak_mb=max((r.get("device_peak_mb", 0) for r in rs), default=0),
                     xla_memory_mb=next((r["xla_memory_mb"] for r in rs if r.get("xla_memory_mb")), None))
    if "jax" in row and "torch" in row:
      row["speedup"] = row["torch"]["median_s"] / row["jax"]["median_s"]
    summary[case] = row
  meta = dict(preset=preset, dtype=dtype, reps=reps, iters=iters, machine=machine_note(),
              glibc_tunables=env.get("GLIBC_TUNABLES", ""),
              device=device_note or jax.devices()[0].device_kind, jax=jax.__version__,
              torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
  print_fn(format_summary(summary, meta))
  return dict(meta=meta, summary=summary, runs=results)


def format_summary(summary: dict, meta: dict) -> str:
  lines = [f"persona-jax bench --preset {meta['preset']} ({meta['dtype']}, {meta['reps']} reps x "
           f"{meta['iters']} iters; {meta['machine']}; device {meta['device']}; jax {meta['jax']}, "
           f"torch {meta['torch']}; {meta['date']})",
           "| case | persona_jax | diffusers PyTorch | speedup (torch/jax) | first call jax (warm: "
           "compilation cache filled) / torch "
           "| peak RSS jax / torch (whole process) | peak RSS jax / torch (during the steps) |",
           "|---|---|---|---|---|---|---|"]
  for case, row in summary.items():
    j, t = row.get("jax"), row.get("torch")
    fmt = lambda r: f"{r['median_s'] * 1e3:.0f} ms" if r else "-"
    both = lambda key, unit, f: " / ".join(f"{r[key]:{f}} {unit}" if r else "-" for r in (j, t))
    speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
    first = both('first_call_s', 's', '.1f')
    if j and j.get("first_call_warm_s") is not None:
      first = first.replace(" / ", f" (warm {j['first_call_warm_s']:.1f} s) / ", 1)
    lines.append(f"| {case} | {fmt(j)} | {fmt(t)} | {speedup} | {first} | "
                 f"{both('peak_rss_mb', 'MB', '.0f')} | {both('steady_peak_rss_mb', 'MB', '.0f')} |")
  planned = {case: row["jax"]["xla_memory_mb"] for case, row in summary.items()
             if row.get("jax", {}).get("xla_memory_mb")}
  if planned:
    lines += ["", "XLA's buffer plan of the persona_jax step (MB): arguments + outputs - donated "
              "aliases + temporaries = peak",
              "| case | arguments | outputs | aliased | temporaries | peak |", "|---|---|---|---|---|---|"]
    for case, m in planned.items():
      lines.append(f"| {case} | {m['arguments']:.0f} | {m['outputs']:.0f} | {m['aliased']:.0f} | "
                   f"{m['temporaries']:.0f} | {m['peak']:.0f} |")
  return "\n".join(lines)


