"""The persona_jax side of `persona-jax bench` (a worker process): each case built as one
synchronous iteration; `memory_plan` compiles the steps from shapes and reads XLA's buffer plan."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from persona_jax.benchmark import (ADAPTER_CASES, BATCH, DB_VARIANTS, E4T_STEPS, LORA_RANK,
                                   PRESETS, Preset, _ids, _inputs, added_cond, added_cond_shapes,
                                   db_options)


def jax_case(case: str, unet_dir: Path, preset: Preset, dtype: str):
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
  added = jax.tree.map(jnp.asarray, added_cond(preset, BATCH[case]))
  if case == "unet_forward":
    fwd = jax.jit(unet.apply)
    return lambda: jax.block_until_ready(fwd({"params": params}, x, t, ctx, None, added))
  if case == "ti_train":
    return _jax_ti_step(unet, params, unet_dir.parent / "text_encoder", x, noise, jdtype)
  if case in DB_VARIANTS:
    return _jax_db_step(case, config, params, x, ctx, added)
  if case in ADAPTER_CASES:
    return _jax_adapter_step(case, config, params, x, ctx, added)
  if case == "e4t_tune":
    return _jax_e4t_tune(config, params, unet_dir.parent, x, jdtype)
  tx = optax.adamw(1e-5)
  opt_state = tx.init(params)

  def step(params, opt_state, x, t, ctx, noise, added):
    def loss_fn(p):
      pred = unet.apply({"params": p}, x, t, ctx, None, added)
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [params, opt_state]

  def run():
    carry[0], carry[1], loss = step(carry[0], carry[1], x, t, ctx, noise, added)
    jax.block_until_ready(loss)
  return run


def cached_added(added):
  """SDXL's added conditioning ({"text_embeds", "time_ids"}: diffusers' names, arrays or shapes)
  as a cached training batch carries it ({"pooled", "time_ids"}: data/batch.py), which the text
  conditioning hands to the UNet; None -> {}."""
  return {("pooled" if k == "text_embeds" else k): v for k, v in (added or {}).items()}


def _batch(shapes: dict, abstract: bool, rng, prior_rows: int | None = None, added=None):
  """A cached-latent batch of `shapes` (+ SDXL's added conditioning `added`, {name: shape} or
  {name: array}): ShapeDtypeStructs, or random arrays with a tiny latent variance and, with
  `prior_rows`, the last `prior_rows` rows marked as class rows."""
  import jax
  import jax.numpy as jnp
  added = added or {}
  if abstract:
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in {**shapes, **added}.items()}
  batch = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
  batch["latent_logvar"] = jnp.full(shapes["latent_logvar"], -30.0)
  if prior_rows is not None:
    m = shapes["prior"][0]
    batch["prior"] = jnp.asarray([0.0] * (m - prior_rows) + [1.0] * prior_rows)
  return dict(batch, **{k: jnp.asarray(v) for k, v in added.items()})


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
  trainable = method.params.init(jax.random.PRNGKey(0), frozen)
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
  from persona_jax.data.batch import CLIP_PIXELS, IDS
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
                         method.params.init(jax.random.PRNGKey(0), base))
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


def _jax_db_parts(case, config, unet_params, batch_size: int, latent: int, context_len: int,
                  added=None):
  """(jitted step, state, micro-batch list) of our DreamBooth step: the real train_step with the
  dreambooth method, frozen = {}. Works on arrays or on ShapeDtypeStructs (memory plans).
  `added`: SDXL's added conditioning of the whole batch, {name: array} (or {name: shape})."""
  import functools

  import jax
  import jax.numpy as jnp

  from persona_jax.methods import dreambooth
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  bf16, remat, accum = db_options(case)
  unet = UNet2DConditionModel(dataclasses.replace(
      config, dtype=jnp.bfloat16 if bf16 else config.dtype, remat="blocks" if remat else config.remat))
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
  for k in range(accum):
    rows = {name: (m,) + v[1:] if abstract else v[k * m:(k + 1) * m]
            for name, v in cached_added(added).items()}
    batches.append(_batch(shapes, abstract, rng, m // 2, rows))
  return step, state, batches


def _jax_db_step(case, config, unet_params, latents, ctx, added=None):
  """Our DreamBooth step, timed (compiled ahead of time inside the first call, so the
  result also carries XLA's memory plan)."""
  import jax
  step, state, batches = _jax_db_parts(case, config, unet_params, latents.shape[0],
                                       latents.shape[1], ctx.shape[1], added)
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


REMAT_POLICIES = ("none", "blocks", "dots")


def memory_plan(preset: str = "sd15", cases=DB_VARIANTS, batch_size: int = 2, print_fn=print,
                remat=(), target: str = "cpu") -> dict:
  """XLA's buffer plan of the DreamBooth step for each memory option (and of the LoRA and Custom
  Diffusion steps: ADAPTER_CASES), compiled from shapes only
  (no weights are created, so the real SD 1.5 and SDXL UNets plan on a laptop; a preset with a
  `plan` preset plans that one: sdxl plans sdxl_full).

  remat: UNet remat policies (REMAT_POLICIES) to plan every case under, keyed "case remat=P"
    (empty: each case as it is; db_train_remat is `blocks` whatever is asked).
  target: "cpu" (this machine's XLA:CPU), or "tpu:TOPOLOGY" (e.g. "tpu:v5e:2x2"): compiled by
    libtpu's TPU compiler for one chip of that topology, without a TPU (`pip install
    "jax[tpu]"` brings libtpu), attention through XLA. XLA:CPU's plan is not an accelerator's:
    its default concurrency-optimized scheduler runs the rematerialized regions early, so remat
    saves nothing there (`plan_remat` below; figures in BENCHMARKS.md).
  """
  import jax
  import jax.numpy as jnp

  from persona_jax.models.configs import UNetConfig
  from persona_jax.models.components import abstract_params
  p = PRESETS[PRESETS[preset].plan or preset]
  config = UNetConfig.from_dict(p.unet)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        abstract_params("unet", config))
  added = added_cond_shapes(p, batch_size)
  place, config = plan_target(target, config)
  out = {}
  for case in cases:
    for policy in remat or (None,):
      c = config if policy is None else dataclasses.replace(config, remat=policy)
      if case in ADAPTER_CASES:
        step, state, frozen, batch = _adapter_parts(case, c, params, batch_size, p.latent,
                                                    p.context_len, added)
      else:
        step, state, batches = _jax_db_parts(case, c, params, batch_size, p.latent,
                                             p.context_len, added)
        frozen, batch = {}, batches[0]
      key = case if policy is None else f"{case} remat={policy}"
      out[key] = xla_memory_mb(step.lower(*place((state, frozen, batch))).compile())
      print_fn(f"  {key:28s} {out[key]}")
  return out


def plan_target(target: str, config):
  """(place, config) for compiling from shapes for `target` (see `memory_plan`): place(tree)
  gives every ShapeDtypeStruct of the tree that target's device; config: the UNet config the
  target plans (TPU: XLA attention, as this process's CPU backend would pick its own kernel)."""
  import jax
  import numpy as np

  from persona_jax.errors import ConfigError
  if target == "cpu":
    return (lambda tree: tree), config
  platform, _, topology = target.partition(":")
  if platform != "tpu" or not topology:
    raise ConfigError(f"memory plan target '{target}': use cpu or tpu:TOPOLOGY (e.g. tpu:v5e:2x2)")
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError(f"memory plan target '{target}' needs libtpu: pip install \"jax[tpu]\"")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology, platform="tpu").devices[0]
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("one",)),
                                        jax.sharding.PartitionSpec())
  place = lambda tree: jax.tree.map(                                        # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  return place, dataclasses.replace(config, attention="xla")


def _unet_loss_args(config, batch_size: int, latent: int, context_len: int, place):
  """(loss(config) -> fn(params, x, t, context), args as ShapeDtypeStructs placed by `place`)
  of the UNet's float32 denoising loss."""
  import jax
  import jax.numpy as jnp

  from persona_jax.models.components import abstract_params
  from persona_jax.models.unet import UNet2DConditionModel
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)              # noqa: E731
  args = place((jax.tree.map(lambda x: f32(*x.shape), abstract_params("unet", config)),
                f32(batch_size, latent, latent, config.in_channels),
                jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                f32(batch_size, context_len, config.cross_attention_dims[0])))

  def loss(c):
    unet = UNet2DConditionModel(c)
    return lambda params, x, t, context: jnp.mean(jnp.square(
        unet.apply({"params": params}, x, t, context).astype(jnp.float32)))
  return loss, args


def remat_residuals_mb(config, batch_size: int, latent: int, context_len: int,
                       policies=REMAT_POLICIES) -> dict:
  """{policy: MB} that autodiff keeps from the UNet loss's forward for its backward (the
  parameters included), traced from shapes, nothing compiled: what a remat policy decides,
  whatever a compiler's schedule then does with it."""
  import jax
  loss, args = _unet_loss_args(config, batch_size, latent, context_len, lambda tree: tree)
  out = {}
  for policy in policies:
    f = loss(dataclasses.replace(config, remat=policy))
    backward = jax.eval_shape(lambda p, *rest: jax.vjp(lambda p: f(p, *rest), p)[1], *args)
    out[policy] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward)) / 2**20
  return out


def plan_remat(config, batch_size: int, latent: int, context_len: int, target: str = "cpu",
               policies=REMAT_POLICIES) -> dict:
  """{policy: xla_memory_mb} of the UNet's float32 loss and parameter gradient (no optimizer)
  for `config` (a UNetConfig) at [batch_size, latent, latent, in_channels] latents and
  [batch_size, context_len, cross_attention_dim] contexts, compiled from shapes for `target`
  (see `memory_plan`)."""
  import jax
  place, config = plan_target(target, config)
  loss, args = _unet_loss_args(config, batch_size, latent, context_len, place)
  return {policy: xla_memory_mb(jax.jit(jax.grad(loss(dataclasses.replace(config, remat=policy))))
                                .lower(*args).compile())
          for policy in policies}


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


def _adapter_parts(case, config, unet_params, batch_size: int, latent: int, context_len: int,
                   added=None):
  """(jitted step, state, frozen, batch) of our LoRA (rank 4 on the attention projections; as
  DreamBooth-LoRA with half the rows class rows for `dblora_train`) or Custom Diffusion (attn2 K/V, BOS detached, no modifier token) step: the real train_step and
  method, cached latents and contexts (and SDXL's added conditioning `added`, {name: array} or
  {name: shape}). Works on arrays or on ShapeDtypeStructs (memory plans: nothing allocated but
  LoRA's small factors)."""
  import functools

  import jax
  import jax.numpy as jnp

  from persona_jax import tree
  from persona_jax.methods import custom_diffusion as cd
  from persona_jax.methods import lora
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.train.optim import OptimConfig, make_optimizer
  from persona_jax.train.state import init_state
  base = {"unet": unet_params}
  if case in ("lora_train", "dblora_train"):
    method = lora.make(lora.LoRAConfig(rank=LORA_RANK, targets=("attn",)), base, unet_config=config)
    trainable, frozen, lr = method.params.init(jax.random.PRNGKey(0), base), base, 1e-4
  else:
    method = cd.make(cd.CustomDiffusionConfig(modifier_tokens=(), initializer_tokens=()),
                     dict(base, text_encoder=_BENCH_TEXT_TABLE))
    (trainable, frozen), lr = tree.split(base, method.params.select), 1e-5
  unet = UNet2DConditionModel(dataclasses.replace(config, addons=method.unet))
  abstract = isinstance(jax.tree.leaves(unet_params)[0], jax.ShapeDtypeStruct)
  if abstract:          # the plan needs only shapes
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
  tx, _ = make_optimizer(OptimConfig(lr=lr, clip_grad_norm=1.0), trainable, total_steps=10,
                         batch_size=batch_size)
  step = _jitted_train_step(method, unet, None, tx)
  init = functools.partial(init_state, tx=tx, seed=0)
  state = jax.eval_shape(init, trainable) if abstract else init(trainable)
  shapes = {"latent_mean": (batch_size, latent, latent, 4), "latent_logvar": (batch_size, latent, latent, 4),
            "context": (batch_size, context_len, config.cross_attention_dims[0])}
  prior = None
  if case == "dblora_train":                # DreamBooth-LoRA: the second half are class rows
    shapes["prior"], prior = (batch_size,), batch_size // 2
  return step, state, frozen, _batch(shapes, abstract, np.random.default_rng(1), prior,
                                     cached_added(added))


def _jax_adapter_step(case, config, unet_params, latents, ctx, added=None):
  """Our LoRA or Custom Diffusion step, timed (compiled ahead of time in the first call, so the
  result also carries XLA's memory plan)."""
  import jax
  step, state, frozen, batch = _adapter_parts(case, config, unet_params, latents.shape[0],
                                              latents.shape[1], ctx.shape[1], added)
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


