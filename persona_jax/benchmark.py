"""`persona-jax bench`: persona_jax against diffusers PyTorch on identical weights.

Each measurement runs in its own subprocess (two frameworks fighting for the same cores in one
process is not a measurement), alternating A B A B over several repetitions; the report gives
medians and ratios. Peak memory is the process's peak RSS (JAX's `memory_stats()` is empty on
CPU; on GPU the device's peak bytes are reported too).

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
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DB_VARIANTS = ("db_train", "db_train_bf16", "db_train_remat", "db_train_accum2")
ADAPTER_CASES = ("lora_train", "cd_train")
CASES = ("unet_forward", "unet_train", "ti_train", "lora_train", "cd_train", "e4t_tune") + DB_VARIANTS
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


_SD15_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, attention_head_dim=8, in_channels=4, out_channels=4, norm_num_groups=32)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5)
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
}
BATCH = ({"unet_forward": 2, "unet_train": 4, "ti_train": 4, "lora_train": 4, "cd_train": 4,
          "e4t_tune": 4} | {c: 4 for c in DB_VARIANTS})
PLACEHOLDER_POSITION = 5


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


# ----------------------------------------------------------------------------------------------
# Workers: build one case, return a function that runs one synchronous iteration.


def _jax_case(case: str, unet_dir: Path, preset: Preset, dtype: str):
  import jax
  import jax.numpy as jnp
  import optax

  from persona_jax.convert.diffusers import state_dict_to_params
  from persona_jax.convert.files import read_weights
  from persona_jax.models.configs import UNetConfig, read_json
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.models.components import abstract_params
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  config = dataclasses.replace(UNetConfig.from_dict(read_json(unet_dir / "config.json")),
                               dtype=jdtype)
  state, source = read_weights(unet_dir, "diffusion_pytorch_model")
  params = jax.device_put(state_dict_to_params(state, abstract_params("unet", config), source=source))
  unet = UNet2DConditionModel(config)
  x, t, ctx, noise = (jnp.asarray(a) for a in _inputs(preset, BATCH[case], channels_last=True))
  if case == "unet_forward":
    fwd = jax.jit(unet.apply)
    return lambda: jax.block_until_ready(fwd({"params": params}, x, t, ctx))
  if case == "ti_train":
    return _jax_ti_step(unet, params, unet_dir.parent / "text_encoder", x, noise, jdtype)
  if case in DB_VARIANTS:
    return _jax_db_step(case, config, params, x, ctx)
  if case in ADAPTER_CASES:
    return _jax_adapter_step(case, config, params, x, ctx)
  if case == "e4t_tune":
    return _jax_e4t_tune(config, params, unet_dir.parent, x, jdtype)
  tx = optax.adamw(1e-5)
  opt_state = tx.init(params)

  def step(params, opt_state, x, t, ctx, noise):
    def loss_fn(p):
      pred = unet.apply({"params": p}, x, t, ctx)
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [params, opt_state]

  def run():
    carry[0], carry[1], loss = step(carry[0], carry[1], x, t, ctx, noise)
    jax.block_until_ready(loss)
  return run


def _jitted_train_step(method, unet, text_encoder, tx):
  """persona_jax's real train_step for a bench case (SD's scaled-linear schedule, epsilon; the
  VAE is config only: batches carry latents), compiled with the state donated."""
  import functools

  import jax

  from persona_jax.diffusion.losses import Objective
  from persona_jax.models.components import SDModels
  from persona_jax.diffusion.schedules import SchedulerConfig
  from persona_jax.models.configs import VAEConfig
  from persona_jax.models.vae import AutoencoderKL
  from persona_jax.train.step import train_step
  models = SDModels(unet, text_encoder, AutoencoderKL(VAEConfig(latent_channels=4)))
  objective = Objective(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012), 1.0)
  return jax.jit(functools.partial(train_step, method=method, models=models, objective=objective,
                                   tx=tx), donate_argnums=0)


def _read_text_encoder(text_dir: Path, jdtype):
  """(TextEncoderConfig with compute dtype `jdtype`, params) of the bench's text_encoder/."""
  from persona_jax.convert.diffusers import state_dict_to_params, text_encoder_adapt
  from persona_jax.convert.files import read_weights
  from persona_jax.models.configs import TextEncoderConfig, read_json
  from persona_jax.models.components import abstract_params
  config = dataclasses.replace(TextEncoderConfig.from_dict(read_json(text_dir / "config.json")),
                               dtype=jdtype)
  state, source = read_weights(text_dir, "model")
  return config, state_dict_to_params(state, abstract_params("text_encoder", config),
                                      source=source, adapt=text_encoder_adapt)


def _jax_ti_step(unet, unet_params, text_dir: Path, latents, noise, jdtype):
  """Our Textual Inversion step (the real train_step and method) from cached-latent batches."""

  import jax
  import jax.numpy as jnp

  from persona_jax.methods import textual_inversion as ti
  from persona_jax.models.text_encoder import CLIPTextModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  config, text_params = _read_text_encoder(text_dir, jdtype)
  frozen = jax.device_put({"unet": unet_params, "text_encoder": text_params})
  method = ti.make(ti.TextualInversionConfig(placeholder="<bench>", initializer="toy"), frozen)
  trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)
  tx, _ = make_optimizer(OptimConfig(lr=1e-3, clip_grad_norm=0.0), trainable, total_steps=10,
                         batch_size=latents.shape[0])
  step = _jitted_train_step(method, unet, CLIPTextModel(config), tx)
  batch = {"latent_mean": latents, "latent_logvar": jnp.full(latents.shape, -30.0),
           "ids": jnp.asarray(_ids(latents.shape[0]), jnp.int32)}
  carry = [init_state(trainable, tx, seed=0)]

  def run():
    carry[0], metrics = step(carry[0], frozen, batch)
    jax.block_until_ready(metrics["loss"])
  del noise
  return run


def _jax_e4t_tune(config, unet_params, folder: Path, latents, jdtype):
  """E4T's 15 tuning steps (the real method and train_step), one timed iteration: the UNet, the
  encoder and the offsets train; the text and image encoders are frozen. `folder` holds the
  bench's text_encoder/ and image_encoder/."""
  import importlib.resources

  import jax
  import jax.numpy as jnp

  from persona_jax import tree
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.methods import e4t
  from persona_jax.methods.base import CLIP_PIXELS, IDS
  from persona_jax.models.text_encoder import CLIPTextModel
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  text_config, text_params = _read_text_encoder(folder / "text_encoder", jdtype)
  base = jax.device_put({"unet": unet_params, "text_encoder": text_params})
  tokenizer = Path(str(importlib.resources.files("persona_jax") / "assets" / "tokenizer"))
  # The pretrain phase builds the same encoder and offsets without a pre-trained file; the
  # tune phase's trainable set adds the whole UNet, as below.
  options = e4t.E4TConfig(phase="pretrain", class_word="face",
                          image_encoder=str(folder / "image_encoder"), embedding_reg=1e-4)
  method = e4t.make(options, base, tokenizer, unet_config=config)
  trainable = tree.merge({"unet": base["unet"]},
                         method.init_trainable(jax.random.PRNGKey(0), base))
  frozen = {"text_encoder": base["text_encoder"], **jax.device_put(method.components())}
  tx, _ = make_optimizer(OptimConfig(lr=1.6e-5, clip_grad_norm=1.0), trainable,
                         total_steps=E4T_STEPS, batch_size=latents.shape[0])
  step = _jitted_train_step(method, UNet2DConditionModel(config), CLIPTextModel(text_config), tx)
  clip_config, _ = load_image_encoder(folder / "image_encoder")
  rng = np.random.default_rng(4)
  size = clip_config.image_size
  batch = {"latent_mean": latents, "latent_logvar": jnp.full(latents.shape, -30.0),
           IDS: jnp.asarray(_ids(latents.shape[0]), jnp.int32),
           CLIP_PIXELS: jnp.asarray(rng.standard_normal((latents.shape[0], size, size, 3)),
                                    jnp.float32)}
  carry = [init_state(trainable, tx, seed=0)]

  def run():
    for _ in range(E4T_STEPS):
      carry[0], metrics = step(carry[0], frozen, batch)
    jax.block_until_ready(metrics["loss"])
  return run


def _db_options(case: str) -> tuple[bool, bool, int]:
  """(bf16 compute, remat, gradient-accumulation micro-steps) of a db_train case."""
  return case.endswith("bf16"), case.endswith("remat"), 2 if case.endswith("accum2") else 1


def _jax_db_parts(case, config, unet_params, batch_size: int, latent: int, context_len: int):
  """(jitted step, state, micro-batch list) of our DreamBooth step: the real train_step with the
  dreambooth method, frozen = {}. Works on arrays or on ShapeDtypeStructs (memory plans)."""
  import functools

  import jax
  import jax.numpy as jnp

  from persona_jax.methods import dreambooth
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  bf16, remat, accum = _db_options(case)
  unet = UNet2DConditionModel(dataclasses.replace(
      config, dtype=jnp.bfloat16 if bf16 else config.dtype, remat="blocks" if remat else "none"))
  method = dreambooth.make(dreambooth.DreamBoothConfig(), {"unet": unet_params})
  trainable = {"unet": unet_params}
  tx, _ = make_optimizer(OptimConfig(lr=5e-6, clip_grad_norm=1.0, grad_accum=accum), trainable,
                         total_steps=10, batch_size=batch_size // accum)
  step = _jitted_train_step(method, unet, None, tx)
  init = functools.partial(init_state, tx=tx, seed=0)
  abstract = isinstance(jax.tree.leaves(unet_params)[0], jax.ShapeDtypeStruct)
  state = jax.eval_shape(init, trainable) if abstract else init(trainable)
  rng = np.random.default_rng(1)
  m = batch_size // accum                          # rows per micro-step: half instance, half class
  shapes = {"latent_mean": (m, latent, latent, 4), "latent_logvar": (m, latent, latent, 4),
            "context": (m, context_len, config.cross_attention_dims[0]), "prior": (m,)}
  batches = []
  for _ in range(accum):
    if abstract:
      batch = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    else:
      batch = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
      batch["latent_logvar"] = jnp.full(shapes["latent_logvar"], -30.0)
      batch["prior"] = jnp.asarray([0.0] * (m // 2) + [1.0] * (m // 2))
    batches.append(batch)
  return step, state, batches


def _jax_db_step(case, config, unet_params, latents, ctx):
  """Our DreamBooth step, timed (compiled ahead of time inside the first call, so the
  result also carries XLA's memory plan)."""
  import jax
  step, state, batches = _jax_db_parts(case, config, unet_params, latents.shape[0],
                                       latents.shape[1], ctx.shape[1])
  carry = [state]
  compiled = []

  def run():
    if not compiled:
      compiled.append(step.lower(carry[0], {}, batches[0]).compile())
      run.xla_memory = xla_memory_mb(compiled[0])
    for batch in batches:
      carry[0], metrics = compiled[0](carry[0], {}, batch)
    jax.block_until_ready(metrics["loss"])
  return run


def memory_plan(preset: str = "sd15", cases=DB_VARIANTS, batch_size: int = 2, print_fn=print) -> dict:
  """XLA's buffer plan of the DreamBooth step for each memory option (and of the LoRA and Custom
  Diffusion steps: ADAPTER_CASES), compiled from shapes only
  (no weights are created, so the real SD 1.5 UNet plans on a laptop). CPU plans; an
  accelerator's compiler fuses and schedules differently."""
  import jax
  import jax.numpy as jnp

  from persona_jax.models.configs import UNetConfig
  from persona_jax.models.components import abstract_params
  p = PRESETS[preset]
  config = UNetConfig.from_dict(p.unet)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        abstract_params("unet", config))
  out = {}
  for case in cases:
    if case in ADAPTER_CASES:
      step, state, frozen, batch = _adapter_parts(case, config, params, batch_size, p.latent,
                                                  p.context_len)
    else:
      step, state, batches = _jax_db_parts(case, config, params, batch_size, p.latent, p.context_len)
      frozen, batch = {}, batches[0]
    out[case] = xla_memory_mb(step.lower(state, frozen, batch).compile())
    print_fn(f"  {case:16s} {out[case]}")
  return out


def xla_memory_mb(compiled) -> dict | None:
  """XLA's buffer plan of a compiled step: arguments, outputs, temporaries and the peak they
  imply (arguments + outputs - donated aliases + temporaries), in MB."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  mb = lambda b: b / 2**20
  return dict(arguments=mb(stats.argument_size_in_bytes), outputs=mb(stats.output_size_in_bytes),
              aliased=mb(stats.alias_size_in_bytes), temporaries=mb(stats.temp_size_in_bytes),
              peak=mb(stats.argument_size_in_bytes + stats.output_size_in_bytes
                      - stats.alias_size_in_bytes + stats.temp_size_in_bytes))


def _torch_db_step(case, unet, x, noise, t, ctx, sync):
  """diffusers' train_dreambooth.py step with prior preservation: one forward over instance +
  class rows, `chunk(2)`, mse + prior_loss_weight * mse, clip 1.0, AdamW."""
  import contextlib

  import torch
  bf16, remat, accum = _db_options(case)
  unet.train()
  if remat:
    unet.enable_gradient_checkpointing()
  opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
  b = x.shape[0]
  m = b // accum // 2
  micro = [torch.cat([torch.arange(k * m, (k + 1) * m), b // 2 + torch.arange(k * m, (k + 1) * m)])
           for k in range(accum)]
  autocast = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

  def run():
    for rows in micro:
      with autocast():
        pred = unet(x[rows], t[rows], ctx[rows]).sample
      pred, pred_prior = pred.float().chunk(2)
      target, target_prior = noise[rows].float().chunk(2)
      loss = (torch.nn.functional.mse_loss(pred, target)
              + 1.0 * torch.nn.functional.mse_loss(pred_prior, target_prior)) / accum
      loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
  return run


LORA_RANK = 4


def _adapter_parts(case, config, unet_params, batch_size: int, latent: int, context_len: int):
  """(jitted step, state, frozen, batch) of our LoRA (rank 4 on the attention projections) or
  Custom Diffusion (attn2 K/V, BOS detached, no modifier token) step: the real train_step and
  method, cached latents and contexts. Works on arrays or on ShapeDtypeStructs (memory plans)."""
  import jax
  import jax.numpy as jnp

  from persona_jax import tree
  from persona_jax.methods import custom_diffusion as cd
  from persona_jax.methods import lora
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  base = {"unet": unet_params}
  if case == "lora_train":
    method = lora.make(lora.LoRAConfig(rank=LORA_RANK, targets=("attn",)), base, unet_config=config)
    trainable, frozen, lr = method.init_trainable(jax.random.PRNGKey(0), base), base, 1e-4
  else:
    method = cd.make(cd.CustomDiffusionConfig(modifier_tokens=(), initializer_tokens=()),
                     dict(base, text_encoder=_BENCH_TEXT_TABLE))
    (trainable, frozen), lr = tree.split(base, method.select), 1e-5
  unet = UNet2DConditionModel(dataclasses.replace(config, **dict(method.unet_options)))
  abstract = isinstance(jax.tree.leaves(unet_params)[0], jax.ShapeDtypeStruct)
  if abstract:          # the plan needs only shapes; the trainable leaves are small or copied
    trainable = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
  tx, _ = make_optimizer(OptimConfig(lr=lr, clip_grad_norm=1.0), trainable, total_steps=10,
                         batch_size=batch_size)
  step = _jitted_train_step(method, unet, None, tx)
  state = init_state(trainable, tx, seed=0)
  shapes = {"latent_mean": (batch_size, latent, latent, 4), "latent_logvar": (batch_size, latent, latent, 4),
            "context": (batch_size, context_len, config.cross_attention_dims[0])}
  if abstract:
    batch = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
  else:
    rng = np.random.default_rng(1)
    batch = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
    batch["latent_logvar"] = jnp.full(shapes["latent_logvar"], -30.0)
  return step, state, frozen, batch


def _jax_adapter_step(case, config, unet_params, latents, ctx):
  """Our LoRA or Custom Diffusion step, timed (compiled ahead of time in the first call, so the
  result also carries XLA's memory plan)."""
  import jax
  step, state, frozen, batch = _adapter_parts(case, config, unet_params, latents.shape[0],
                                              latents.shape[1], ctx.shape[1])
  batch = dict(batch, latent_mean=latents, context=ctx)
  carry, compiled = [state], []

  def run():
    if not compiled:
      compiled.append(step.lower(carry[0], frozen, batch).compile())
      run.xla_memory = xla_memory_mb(compiled[0])
    carry[0], metrics = compiled[0](carry[0], frozen, batch)
    jax.block_until_ready(metrics["loss"])
  return run


# The method checks new tokens against the text encoder's table; with no modifier token only its
# row count matters (the shipped tokenizer's 49408).
_BENCH_TEXT_TABLE = {"embeddings": {"token_embedding": {"embedding": np.zeros((49408, 1), np.float32)}}}


def _torch_cd_step(unet, x, noise, t, ctx, sync):
  """diffusers' train_custom_diffusion.py step (no modifier token): CustomDiffusionAttnProcessor2_0
  with train_kv on every cross-attention, initialized from to_k/to_v, AdamW over them, clip 1.0."""
  from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
  unet.requires_grad_(False)
  weights = unet.state_dict()
  procs = {}
  for name in unet.attn_processors:
    layer = name.split(".processor")[0]
    if name.endswith("attn1.processor"):
      procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                    hidden_size=None, cross_attention_dim=None)
      continue
    w_k = weights[layer + ".to_k.weight"]
    procs[name] = CustomDiffusionAttnProcessor2_0(
        train_kv=True, train_q_out=False, hidden_size=w_k.shape[0],
        cross_attention_dim=w_k.shape[1]).to(device=w_k.device, dtype=w_k.dtype)
    procs[name].load_state_dict({"to_k_custom_diffusion.weight": w_k,
                                 "to_v_custom_diffusion.weight": weights[layer + ".to_v.weight"]})
  params = [p for proc in procs.values() for p in proc.parameters()]
  unet.set_attn_processor(dict(procs))         # diffusers pops the entries of the dict it gets
  return _torch_adapter_run(unet, params, 1e-5, x, noise, t, ctx, sync)


def _torch_adapter_run(unet, params, lr, x, noise, t, ctx, sync):
  """The timed step of a frozen UNet with trainable `params` (LoRA, Custom Diffusion): forward,
  backward, clipping 1.0, AdamW."""
  import torch
  unet.train()
  opt = torch.optim.AdamW(params, lr=lr)

  def run():
    loss = torch.nn.functional.mse_loss(unet(x, t, ctx).sample.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
  return run


def _torch_lora_step(unet, x, noise, t, ctx, sync):
  """diffusers' train_dreambooth_lora.py step: peft LoRA (rank 4, alpha 4, gaussian init) on
  to_q/to_k/to_v/to_out.0, UNet frozen, AdamW over the adapter, clipping 1.0."""
  from peft import LoraConfig
  unet.requires_grad_(False)
  unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
  params = [p for p in unet.parameters() if p.requires_grad]
  return _torch_adapter_run(unet, params, 1e-4, x, noise, t, ctx, sync)


def _torch_ti_step(unet, text_dir: Path, x, noise, t, tdtype, device, sync):
  """diffusers' textual_inversion.py step: embedding table trainable (AdamW over all of it),
  text encoder and UNet frozen, other rows restored after the step."""
  import torch
  from transformers import CLIPTextModel
  text = CLIPTextModel.from_pretrained(text_dir).to(device=device, dtype=tdtype)
  text.resize_token_embeddings(text.config.vocab_size + 1)
  table = text.get_input_embeddings().weight
  with torch.no_grad():
    table[-1] = table[1000]
  unet.requires_grad_(False)
  text.requires_grad_(False)
  table.requires_grad_(True)
  text.train()
  unet.train()
  opt = torch.optim.AdamW([table], lr=1e-3)
  original = table.detach().clone()
  keep = torch.ones(table.shape[0], dtype=torch.bool, device=device)
  keep[-1] = False
  ids = torch.from_numpy(_ids(x.shape[0])).to(device)

  def run():
    context = text(ids)[0]
    pred = unet(x, t, context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      table[keep] = original[keep]
    sync()
  return run


def _torch_case(case: str, unet_dir: Path, preset: Preset, dtype: str):
  import torch
  from diffusers import UNet2DConditionModel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  unet = UNet2DConditionModel.from_pretrained(unet_dir).to(device=device, dtype=tdtype)
  x, t, ctx, noise = (torch.from_numpy(np.asarray(a)).to(device)
                      for a in _inputs(preset, BATCH[case], channels_last=False))
  x, ctx, noise = x.to(tdtype), ctx.to(tdtype), noise.to(tdtype)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if case == "unet_forward":
    unet.eval()

    def run():
      with torch.no_grad():
        unet(x, t, ctx)
      sync()
    return run
  if case == "ti_train":
    return _torch_ti_step(unet, unet_dir.parent / "text_encoder", x, noise, t, tdtype, device, sync)
  if case in DB_VARIANTS:
    return _torch_db_step(case, unet, x, noise, t, ctx, sync)
  if case == "lora_train":
    return _torch_lora_step(unet, x, noise, t, ctx, sync)
  if case == "cd_train":
    return _torch_cd_step(unet, x, noise, t, ctx, sync)
  unet.train()
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(unet(x, t, ctx).sample.float(), noise.float())
    loss.backward()
    opt.step()
    sync()
  return run


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (Linux), so the steps' peak excludes compilation."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mb() -> float | None:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return None


def worker(framework: str, case: str, unet_dir: Path, preset: str, iters: int, dtype: str) -> dict:
  """Runs one case in this process: first call (compile), then `iters` timed calls."""
  p = PRESETS[preset]
  build = _jax_case if framework == "jax" else _torch_case
  run = build(case, unet_dir, p, dtype)
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  steady_from = _reset_peak_rss()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  result = dict(framework=framework, case=case, first_call_s=first, times_s=times,
                median_s=statistics.median(times),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                steady_peak_rss_mb=_peak_rss_mb() if steady_from else None)
  if getattr(run, "xla_memory", None):
    result["xla_memory_mb"] = run.xla_memory
  if framework == "jax":
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      result["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  else:
    import torch
    if torch.cuda.is_available():
      result["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return result


# ----------------------------------------------------------------------------------------------
# Driver.


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
  import jax
  import torch
  from persona_jax.runtime import MALLOC_TUNABLE
  env = dict(os.environ, PERSONA_JAX_NO_REEXEC="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)    # compile time is measured cold
  if malloc_tunable:                            # the same allocator setting for both frameworks
    env["GLIBC_TUNABLES"] = MALLOC_TUNABLE
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    unet_dir = write_unet(Path(tmp) / "unet", PRESETS[preset])
    write_text_encoder(Path(tmp) / "text_encoder", PRESETS[preset])
    if any(c in cases for c in JAX_ONLY):
      write_image_encoder(Path(tmp) / "image_encoder", PRESETS[preset])
    for case in cases:
      for rep in range(reps):
        order = frameworks if rep % 2 == 0 else frameworks[::-1]
        order = [fw for fw in order if fw == "jax" or case not in JAX_ONLY]
        for fw in order:
          r = _spawn(fw, case, unet_dir, preset, iters, dtype, env)
          r["rep"] = rep
          results.append(r)
          print_fn(f"  {case:14s} {fw:5s} rep {rep}: median {r['median_s'] * 1e3:8.1f} ms, "
                   f"first call {r['first_call_s']:6.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                   f"(steps {r.get('steady_peak_rss_mb') or 0:7.0f} MB)")
  summary = {}
  for case in cases:
    row = {}
    for fw in frameworks:
      rs = [r for r in results if r["case"] == case and r["framework"] == fw]
      if not rs:                     # a persona_jax-only case
        continue
      row[fw] = dict(median_s=statistics.median(r["median_s"] for r in rs),
                     first_call_s=statistics.median(r["first_call_s"] for r in rs),
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
           "| case | persona_jax | diffusers PyTorch | speedup (torch/jax) | first call jax / torch "
           "| peak RSS jax / torch (whole process) | peak RSS jax / torch (during the steps) |",
           "|---|---|---|---|---|---|---|"]
  for case, row in summary.items():
    j, t = row.get("jax"), row.get("torch")
    fmt = lambda r: f"{r['median_s'] * 1e3:.0f} ms" if r else "-"
    both = lambda key, unit, f: " / ".join(f"{r[key]:{f}} {unit}" if r else "-" for r in (j, t))
    speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
    lines.append(f"| {case} | {fmt(j)} | {fmt(t)} | {speedup} | {both('first_call_s', 's', '.1f')} | "
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


if __name__ == "__main__":
  fw, case, unet_dir, preset, iters, dtype = sys.argv[1:7]
  print(json.dumps(worker(fw, case, Path(unet_dir), preset, int(iters), dtype)))
