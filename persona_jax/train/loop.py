"""`persona-jax train`: build a run from its config and train it, resumably.

Resume order: a checkpoint in the workdir -> fresh start. An identical second command resumes
where the first stopped (after a crash, a kill or preemption) and ends bitwise where an
uninterrupted run ends on CPU; a changed config or base model is an error.

Outputs in WORKDIR: config.json (the resolved config), metrics.jsonl, checkpoints/STEP/,
samples/step_STEP.png (grids from the sample prompts), and the method's result files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax import tree
from persona_jax.data import pipeline as data
from persona_jax.default_model import resolve_model
from persona_jax.diffusion.losses import Objective
from persona_jax.diffusion.sampling import SDModels
from persona_jax.errors import ConfigError, PersonaError
from persona_jax.images import grid, save_png
from persona_jax.methods.base import MethodConditioning, encode_text
from persona_jax.methods.registry import make_method
from persona_jax.parallel import mesh as mesh_lib
from persona_jax.parallel.rules import infer_shardings, shard_like
from persona_jax.pipeline import Pipeline, load_pipeline
from persona_jax.text_to_image import SampleOptions, text_to_image
from persona_jax.tokenizer import tokenize, tokenizer_with_tokens
from persona_jax.train import checkpoint as ckpt
from persona_jax.train.config import RunConfig
from persona_jax.train.optim import make_optimizer, optimizer_step
from persona_jax.train.state import TrainState, init_state
from persona_jax.train.step import train_step

log = logging.getLogger(__name__)


class NaNLossError(PersonaError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Run:
  """Everything a training run is made of, built from its config (tests drive its parts)."""
  config: RunConfig
  pipe: Pipeline
  method: object
  models: SDModels
  objective: Objective
  tokenizer: object
  frozen: dict                 # the base params the step needs (not trained)
  trainable: dict              # initial trainable params
  tx: object
  schedule: object
  dataset: object
  mesh: object
  fingerprint: str
  model_dir: Path

  def tokenize(self, prompts):
    return tokenize(self.tokenizer, [self.method.expand_prompt(p) for p in prompts])

  def full_params(self, trainable):
    """The params the models see: the whole base (all components) with the method applied."""
    return self.method.transform(self.pipe_frozen_all(), trainable)

  def pipe_frozen_all(self):
    trainable_paths = set(tree.flatten(self.trainable))
    flat = {p: v for p, v in tree.flatten(self.pipe.params).items() if p not in trainable_paths}
    return tree.unflatten(flat)


def build(config: RunConfig, *, mesh=None) -> Run:
  """Loads the base, builds the method, the data and the optimizer of a run."""
  model_dir = resolve_model(config.model)
  pipe = load_pipeline(model_dir)
  compute = jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32
  models = SDModels(
      pipe.unet.__class__(dataclasses.replace(pipe.unet_config, dtype=compute, remat=config.remat)),
      pipe.text_encoder.__class__(dataclasses.replace(pipe.text_encoder_config, dtype=compute)),
      pipe.vae)
  method = make_method(config.method_name, config.method_options, pipe.params, pipe.tokenizer_dir)
  tokenizer = tokenizer_with_tokens(pipe.tokenizer_dir, method.added_tokens)

  existing, rest = tree.split(pipe.params, method.select)
  new = method.init_trainable(jax.random.PRNGKey(config.seed + 1), pipe.params)
  trainable = tree.merge(jax.tree.map(lambda x: x.astype(jnp.float32), existing), new)
  if not tree.flatten(trainable):
    raise ConfigError(f"method {config.method_name} selects no trainable parameters")

  instances = data.load_instances(config.data, method.expand_prompt)
  dataset_kwargs = {}
  needed = {"unet"}
  if config.data.center_crop:
    dataset_kwargs["moments"] = data.encode_moments(pipe.vae, pipe.params["vae"],
                                                    np.stack(instances.images))
  else:
    needed.add("vae")
  tokenize_fn = lambda prompts: tokenize(tokenizer, prompts)
  if method.text_trains():
    needed.add("text_encoder")
    dataset_kwargs["tokenize"] = tokenize_fn
  else:
    captions = data.all_captions(instances, config.data.caption_dropout)
    encode = jax.jit(lambda ids: encode_text(method, models, pipe.params, ids))
    dataset_kwargs["contexts"] = data.encode_captions(encode, tokenize_fn, captions)
    dataset_kwargs["caption_index"] = {c: i for i, c in enumerate(captions)}
  dataset = data.make_dataset(config.data, instances, config.batch_size, config.seed, **dataset_kwargs)

  frozen = {k: v for k, v in rest.items() if k in needed}
  if compute != jnp.float32:
    frozen = jax.tree.map(lambda x: x.astype(compute), frozen)
  mesh = mesh or mesh_lib.make_mesh(config.fsdp)
  mesh_lib.check_batch_size(config.batch_size, mesh)
  tx, schedule = make_optimizer(config.optim, trainable, total_steps=config.steps,
                                batch_size=config.batch_size, num_devices=1)
  objective = Objective(pipe.scheduler_config, pipe.vae_config.scaling_factor,
                        config.min_snr_gamma, config.offset_noise)
  return Run(config, pipe, method, models, objective, tokenizer, frozen, trainable, tx, schedule,
             dataset, mesh, ckpt.base_fingerprint(model_dir), model_dir)


def jit_step(run: Run, state_shardings, frozen_shardings):
  """The train step compiled with its shardings; the state is donated."""
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  step = functools.partial(train_step, method=run.method, models=run.models,
                           objective=run.objective, tx=run.tx, ema_decay=run.config.optim.ema_decay)
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sh),
                 out_shardings=(state_shardings, mesh_lib.replicated(run.mesh)), donate_argnums=0)


def initial_state(run: Run) -> TrainState:
  """The step-0 state, created on the mesh: trainable leaves placed by the sharding rules, and
  the optimizer moments created under jit so they inherit those shardings."""
  c = run.config
  trainable = shard_like(run.trainable, infer_shardings(run.trainable, tuple(c.sharding), run.mesh))
  return jax.jit(functools.partial(init_state, tx=run.tx, seed=c.seed,
                                   ema=c.optim.ema_decay > 0))(trainable)


# Keys a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = frozenset({
    "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts",
    "sample_negative_prompt", "sample_steps", "sample_guidance", "sample_images", "sample_seed"})


def _write_config(workdir: Path, config: RunConfig) -> None:
  """Writes the resolved config; a resumed run must match it (up to RESUMABLE_CHANGES, and
  `steps` with a constant learning rate, so a finished run can be extended)."""
  path = workdir / "config.json"
  resolved = config.to_dict()
  if path.is_file():
    saved, new = tree.flatten(json.loads(path.read_text())), tree.flatten(resolved)
    diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    allowed = set(RESUMABLE_CHANGES) | ({"steps"} if config.optim.schedule == "constant" else set())
    blocking = [k for k in diff if k not in allowed]
    if blocking:
      raise ConfigError(f"{path}: this workdir was started with a different config (differs in "
                        f"{', '.join(blocking[:5])}); resume with the same config or use a new "
                        "workdir")
    if not diff:
      return
    log.info("%s: resuming with changed %s", path, ", ".join(diff))
  ckpt.write_json_atomic(path, resolved)


def sample_grid(run: Run, trainable, step: int, workdir: Path, progress: bool = False) -> Path | None:
  """Samples the config's prompts with the current params; writes samples/step_STEP.png."""
  c = run.config
  if not c.sample_prompts:
    return None
  params = run.full_params(trainable)
  options = SampleOptions(steps=c.sample_steps, guidance=c.sample_guidance, seed=c.sample_seed,
                          height=c.data.resolution, width=c.data.resolution, batch_size=4)
  images = text_to_image(run.pipe, list(c.sample_prompts), c.sample_negative_prompt,
                         c.sample_images, options, params=params, progress=progress,
                         tokenizer=run.tokenizer, conditioning=MethodConditioning(run.method),
                         expand_prompt=run.method.expand_prompt)
  return save_png(grid(images, cols=c.sample_images), workdir / "samples" / f"step_{step:06d}.png")


def _check_finite(pending: list, step_of_first: int, manager) -> None:
  """Raises NaNLossError naming the first step whose loss is not finite."""
  losses = np.asarray(jax.device_get([m["loss"] for m in pending]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    last = manager.latest_step()
    kept = (f"the last good checkpoint is step {last} in {manager.directory}" if last is not None
            else "no checkpoint was written yet")
    raise NaNLossError(f"the loss became {losses[bad[0]]} at step {step_of_first + int(bad[0]) + 1}; "
                       f"stopping ({kept}). Lower optim.lr, enable optim.clip_grad_norm, or check "
                       "the data.")


def train(config: RunConfig, workdir, *, progress: bool = True, mesh=None) -> dict:
  """Trains (or resumes) the run in `workdir`. Returns a summary dict."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _write_config(workdir, config)
  run = build(config, mesh=mesh)
  c = config
  total = c.steps * c.optim.grad_accum            # micro-steps
  state = initial_state(run)
  st_sh = jax.tree.map(lambda x: x.sharding, state)
  fr_sh = infer_shardings(run.frozen, tuple(c.sharding), run.mesh)
  frozen = shard_like(run.frozen, fr_sh)
  manager = ckpt.make_manager(workdir, c.keep_checkpoints)
  iterator = data.make_iterator(run.dataset)
  meta = {"base_path": str(run.model_dir), "base_fingerprint": run.fingerprint,
          "method": c.method_name, "config": c.to_dict()}
  start = manager.latest_step()
  if start is not None:
    state, _ = ckpt.restore(manager, start, ckpt.abstract_of(state, st_sh), iterator, run.fingerprint)
    log.info("resuming %s from step %d", workdir, start)
  else:
    start = 0
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.trainable))
  log.info("training %s: %d trainable params in %d leaves (%s), %d steps of batch %d on %d device(s)",
           c.method_name, n_trainable, len(tree.flatten(run.trainable)),
           ", ".join(tree.paths(run.trainable)[:4]) + (" ..." if len(tree.flatten(run.trainable)) > 4 else ""),
           c.steps, c.batch_size, run.mesh.size)
  step_fn = jit_step(run, st_sh, fr_sh)
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  metrics_file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
  bar = tqdm(total=total, initial=start, desc=f"train {c.method_name}", unit="step",
             disable=not progress, dynamic_ncols=True)
  pending, pending_from, last_log_time, last_log_step = [], start, time.perf_counter(), start
  try:
    for step in range(start, total):
      batch = jax.device_put(next(iterator), batch_sh)
      state, metrics = step_fn(state, frozen, batch)
      pending.append(metrics)
      done = step + 1
      bar.update(1)
      at_log = done % c.log_every == 0 or done == total
      at_ckpt = done % c.checkpoint_every == 0 or done == total
      if at_log or at_ckpt:
        _check_finite(pending, pending_from, manager)
        now = time.perf_counter()
        last = jax.device_get(pending[-1])
        record = {"step": done, **{k: float(v) for k, v in last.items()},
                  "lr": float(run.schedule(optimizer_step(done - 1, c.optim.grad_accum))),
                  "steps_per_sec": (done - last_log_step) / max(now - last_log_time, 1e-9)}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        pending, pending_from, last_log_time, last_log_step = [], done, now, done
      if at_ckpt:
        ckpt.save(manager, done, state, iterator, meta)
      if c.sample_every and done % c.sample_every == 0 and done != total:
        sample_grid(run, state.trainable, done, workdir)
    manager.wait_until_finished()
  finally:
    bar.close()
    metrics_file.close()
    manager.close()
  # With EMA on, the averaged params are the result (written and sampled).
  final = jax.device_get(state.ema if state.ema is not None else state.trainable)
  outputs = write_outputs(run, final, workdir)
  grid_path = sample_grid(run, final, total, workdir, progress=progress)
  return {"workdir": str(workdir), "steps": total, "state": state, "outputs": outputs,
          "samples": str(grid_path) if grid_path else None}


def write_outputs(run: Run, trainable, workdir: Path) -> list[str]:
  """The method's result files (e.g. Textual Inversion's learned embeddings)."""
  from persona_jax.convert.files import write_safetensors
  out = []
  if run.method.added_tokens and "tokens" in trainable:
    rows = np.asarray(trainable["tokens"], np.float32)
    path = workdir / "learned_embeds.safetensors"
    write_safetensors(path, {run.method.added_tokens[0]: rows},
                      {"format": "pt", "tokens": json.dumps(list(run.method.added_tokens)),
                       "base_model": str(run.model_dir)})
    out.append(str(path))
  return out
