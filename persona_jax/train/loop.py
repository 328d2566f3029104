"""`persona-jax train`: build a run from its config and train it, resumably.

Resume order: a checkpoint in the workdir -> fresh start. An identical second command resumes
where the first stopped (after a crash, a kill or preemption) and ends bitwise where an
uninterrupted run ends on CPU; a changed config or base model is an error.

Outputs in WORKDIR: config.json (the resolved config), metrics.jsonl, checkpoints/STEP/,
samples/step_STEP.png (grids from the sample prompts), and the method's result files. A run
that diverges (train/divergence.py) stops with no result; checkpoints from the divergence on
move to WORKDIR/diverged/, so a resume starts from the last good one.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax import distributed, tree
from persona_jax.data import pipeline as data
from persona_jax.data.batch import TIME_IDS
from persona_jax.default_model import resolve_model
from persona_jax.diffusion.losses import Objective
from persona_jax.errors import ConfigError, PersonaError, WriteFailed, write_failure
from persona_jax.images import grid, save_png
from persona_jax.methods import result_file
from persona_jax.methods.base import ResultContext
from persona_jax.methods.registry import load_model, make_method
from persona_jax.models.components import SDModels
from persona_jax.models.text_encoder import CLIPTextModel
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.parallel import mesh as mesh_lib
from persona_jax.parallel.rules import infer_shardings, optimizer_shardings, shard_like
from persona_jax.pipeline import Pipeline
from persona_jax.runtime import release_freed_memory
from persona_jax.text_to_image import SampleOptions, Sampling, text_to_image
from persona_jax.tokenizer import tokenize, tokenize_prompts, tokenizers_with_tokens
from persona_jax.train import checkpoint as ckpt
from persona_jax.train import data_sources, reporting
from persona_jax.train.config import RunConfig, resolve_mixed_precision
from persona_jax.train.divergence import DivergenceError, Guard
from persona_jax.workdir_lock import workdir_lock
from persona_jax.train.optim import (evaluation_params, make_optimizer, optimizer_metrics,
                                     optimizer_step)
from persona_jax.train.state import TrainState, init_state
from persona_jax.train.step import train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything a training run is made of, built from its config (tests drive its parts)."""
  config: RunConfig
  pipe: Pipeline
  method: object
  models: SDModels
  objective: Objective
  tokenizers: tuple            # one per text encoder (SDXL: two), with the method's tokens
  frozen: dict                 # the base params the step needs (not trained)
  trainable: dict              # initial trainable params
  tx: object
  schedule: object
  dataset: object
  mesh: object
  fingerprint: str
  model_dir: Path
  components: dict = dataclasses.field(default_factory=dict)   # the method's own frozen networks

  @property
  def tokenizer(self):
    """The (first) text encoder's tokenizer, with the method's tokens."""
    return self.tokenizers[0]

  def tokenize(self, prompts):
    """[B, L] ids of the first tokenizer (`prompt_inputs` gives every encoder's)."""
    return tokenize(self.tokenizer, [self.method.tokens.expand(p) for p in prompts])

  def prompt_inputs(self, prompts) -> dict:
    """{"ids": [B, L] (, SDXL "ids_2")} of prompts as the method rewrites them."""
    return tokenize_prompts(self.tokenizers, [self.method.tokens.expand(p) for p in prompts])

  def full_params(self, trainable):
    """The params the models see: the whole base (all components) with the method applied."""
    return self.method.params.apply(self.pipe_frozen_all(), trainable)

  def base_pipeline(self) -> Pipeline:
    """The base pipeline with every param: `pipe`, or the base loaded again once training has
    taken the leaves it trains (`without_initial_params` leaves their shapes in `pipe`)."""
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.pipe.params)):
      return self.pipe
    return load_model(self.model_dir, **single_file_options(self.config))

  def pipe_frozen_all(self):
    trainable_paths = set(tree.flatten(self.trainable))
    base = {**self.pipe.params, **self.components}
    flat = {p: v for p, v in tree.flatten(base).items() if p not in trainable_paths}
    return tree.unflatten(flat)


def single_file_options(config: RunConfig) -> dict:
  """`load_model`'s options for a single-file base: its config folder and prediction type."""
  return {k: v for k, v in (("config_dir", config.model_config),
                            ("prediction_type", config.prediction_type)) if v}


def build(config: RunConfig, *, mesh=None, workdir=None, progress: bool = False) -> Run:
  """Loads the base, builds the method, the data and the optimizer of a run. Missing class
  images (prior preservation) are generated here, into `data.class_dir` or WORKDIR/class_images."""
  model_dir = resolve_model(config.model)
  pipe = load_model(model_dir, **single_file_options(config))  # a method's own folder by its loader
  compute = jnp.bfloat16 if resolve_mixed_precision(config.mixed_precision) == "bf16" else jnp.float32
  method = make_method(config.method_name, config.method_options, pipe.params, pipe.tokenizer_dir,
                       pipe.unet_config)
  text_2 = (CLIPTextModel(dataclasses.replace(pipe.text_encoder_2_config, dtype=compute))
            if pipe.is_sdxl else None)
  models = SDModels(
      UNet2DConditionModel(dataclasses.replace(pipe.unet_config, dtype=compute, remat=config.remat,
                                               addons=method.unet)),
      CLIPTextModel(dataclasses.replace(pipe.text_encoder_config, dtype=compute)),
      pipe.vae, text_2)
  tokenizers = tokenizers_with_tokens(pipe.tokenizer_dirs, method.tokens.added)

  components = method.components() if method.components is not None else {}
  base = {**pipe.params, **components}
  existing, rest = tree.split(base, method.params.select)
  new = method.params.init(jax.random.PRNGKey(config.seed + 1), base)
  trainable = tree.merge(jax.tree.map(lambda x: x.astype(jnp.float32), existing), new)
  if not tree.flatten(trainable):
    raise ConfigError(f"method {config.method_name} selects no trainable parameters")

  mesh = mesh or mesh_lib.make_mesh(config.fsdp)
  built = data_sources.build(data_sources.DataRequest(
      config, pipe, method, models, tokenizers[0], tokenizers, trainable, workdir, progress,
      mesh_lib.process_block(mesh)))
  classes = built.classes
  if built.initialize is not None:     # new leaves set from the data (methods/spec.py DataBuild)
    trainable = built.initialize(trainable)
  frozen = {k: v for k, v in rest.items() if k in built.needed | set(components)}
  if compute != jnp.float32:
    frozen = jax.tree.map(lambda x: x.astype(compute), frozen)
  mesh_lib.check_batch_size(config.batch_size, mesh,
                            config.batch_size if classes is not None else 0)
  tx, schedule = make_optimizer(config.optim, trainable, total_steps=config.steps,
                                batch_size=config.batch_size, class_rows=classes is not None)
  objective = Objective(pipe.scheduler_config, pipe.vae_config.scaling_factor,
                        config.min_snr_gamma, config.offset_noise, config.prior_loss_weight)
  return Run(config, pipe, method, models, objective, tokenizers, frozen, trainable, tx, schedule,
             built.dataset, mesh, ckpt.base_fingerprint(model_dir), model_dir, components)


def jit_step(run: Run, state_shardings, frozen_shardings):
  """The train step compiled with its shardings; the state is donated."""
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  step = functools.partial(train_step, method=run.method, models=run.models,
                           objective=run.objective, tx=run.tx, ema_decay=run.config.optim.ema_decay)
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sh),
                 out_shardings=(state_shardings, mesh_lib.replicated(run.mesh)), donate_argnums=0)


def state_shardings(run: Run):
  """Shardings of the TrainState: trainable leaves (and their EMA, optimizer moments and
  accumulated gradients) placed by the sharding rules, everything else replicated."""
  c = run.config
  trainable_sh = infer_shardings(run.trainable, tuple(c.sharding), run.mesh)
  abstract = jax.eval_shape(functools.partial(init_state, tx=run.tx, seed=c.seed,
                                              ema=c.optim.ema_decay > 0), run.trainable)
  rep = mesh_lib.replicated(run.mesh)
  return TrainState(step=rep, trainable=trainable_sh,
                    opt_state=optimizer_shardings(run.tx, abstract.opt_state, trainable_sh, rep),
                    rng=rep, ema=trainable_sh if abstract.ema is not None else None)


def initial_state(run: Run, consume: bool = False) -> TrainState:
  """The step-0 state, created on the mesh with `state_shardings` (under jit, so a sharded
  optimizer state is never materialized whole on one device). With `consume`, the run's initial
  trainable arrays are donated to it (use `without_initial_params` on the run afterwards)."""
  c = run.config
  shardings = state_shardings(run)
  trainable = shard_like(run.trainable, shardings.trainable)
  return jax.jit(functools.partial(init_state, tx=run.tx, seed=c.seed, ema=c.optim.ema_decay > 0),
                 out_shardings=shardings, donate_argnums=0 if consume else ())(trainable)


def without_initial_params(run: Run) -> Run:
  """The run once the train state holds the trainable params: its initial trainable leaves, and
  the base leaves they were taken from (the same arrays: a DreamBooth run's whole UNet), become
  shapes, which is all later readers need (`pipe_frozen_all` leaves those paths out). Without it
  a full fine-tune holds the base UNet twice for the whole run: 10 GB in float32 for SDXL's.

  Under bf16 compute on an accelerator, the float32 base leaves whose bf16 copies the step reads
  (`frozen`) move to host memory too: only the sample grids and the result files read them.
  """
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)      # noqa: E731
  trainable_paths = set(tree.flatten(run.trainable))
  frozen = tree.flatten(run.frozen)
  offload = jax.default_backend() != "cpu"

  def keep(path, value):
    if path in trainable_paths:
      return shape(value)
    twin = frozen.get(path)
    if offload and twin is not None and twin is not value and isinstance(value, jax.Array):
      return np.asarray(jax.device_get(value))
    return value
  params = tree.unflatten({p: keep(p, v) for p, v in tree.flatten(run.pipe.params).items()})
  return dataclasses.replace(run, trainable=jax.tree.map(shape, run.trainable),
                             pipe=dataclasses.replace(run.pipe, params=params))


# Keys a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = frozenset({
    "log_every", "report_to", "checkpoint_every", "keep_checkpoints", "sample_every",
    "sample_prompts", "sample_negative_prompt", "sample_steps", "sample_guidance", "sample_images",
    "sample_seed"})


def _with_defaults(saved: dict) -> dict:
  """A saved config with today's keys and defaults (options added since the run started do not
  block its resume)."""
  from persona_jax.train.config import run_config, upgrade
  try:
    values = run_config(upgrade(saved)).to_dict()
  except PersonaError:
    return saved
  # compared with a resolved config: a file without the key (or with `auto`) means this backend's
  values["mixed_precision"] = resolve_mixed_precision(values["mixed_precision"])
  return values


# Keys `continue_with_changes` may also change (a run stopped on NaN or divergence, continued
# from its last good checkpoint): they change no shape of the state.
CONTINUE_CHANGES = frozenset({"steps", "optim/lr", "optim/schedule", "optim/warmup_steps"})
CHANGES_LOG = "config_changes.jsonl"


def _write_config(workdir: Path, config: RunConfig, continue_with_changes: bool = False) -> None:
  """Writes the resolved config; a resumed run must match it (up to RESUMABLE_CHANGES, and
  `steps` with a constant learning rate, so a finished run can be extended; with
  `continue_with_changes` also CONTINUE_CHANGES, each change logged and appended to
  WORKDIR/config_changes.jsonl). A workdir without a checkpoint (a start that failed, e.g. on a
  wrong flag) takes the new config."""
  path = workdir / "config.json"
  resolved = dict(config.to_dict(), mixed_precision=resolve_mixed_precision(config.mixed_precision))
  done = ckpt.finished_steps(workdir)
  if done and max(done) > config.steps * config.optim.grad_accum:
    raise ConfigError(f"steps: {workdir} has a checkpoint at step {max(done)}, past the "
                      f"{config.steps * config.optim.grad_accum} steps asked for; ask for at least "
                      "as many steps (or use a new workdir)")
  if path.is_file() and done:
    # Compared with defaults filled in, so options added since the run started do not block it.
    try:
      saved = tree.flatten(_with_defaults(json.loads(path.read_text())))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path}: damaged, not valid JSON ({e}); the checkpoints hold the run: "
                        "write the config back (persona-jax train --print-config with the run's "
                        "flags prints it) or start a new workdir") from None
    new = tree.flatten(resolved)
    diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    dotted = lambda keys: ", ".join(k.replace("/", ".") for k in keys)      # noqa: E731
    allowed = set(RESUMABLE_CHANGES) | ({"steps"} if config.optim.schedule == "constant" else set())
    if continue_with_changes:
      allowed |= CONTINUE_CHANGES
    blocking = [k for k in diff if k not in allowed]
    if blocking:
      hint = ("" if continue_with_changes or set(blocking) - CONTINUE_CHANGES else
              " (to continue this run from its last checkpoint with them, add "
              "--continue-with-changes)")
      raise ConfigError(f"{path}: this workdir was started with a different config (differs in "
                        f"{dotted(blocking[:5])}); resume with the same config or use a new "
                        f"workdir{hint}")
    distributed.sync("config checked")         # every process has read it before it changes
    if not diff:
      return
    log.info("%s: resuming with changed %s", path, dotted(diff))
    changed = {k.replace("/", "."): [saved.get(k), new.get(k)] for k in diff}
    if not distributed.is_main():
      return
    ckpt.write_json_atomic(path, resolved)
    if continue_with_changes:
      for k, (old, now) in changed.items():
        log.warning("%s: continuing with %s changed from %r to %r", workdir, k, old, now)
      record = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changed},
                          default=str)
      with _guard_write(workdir / CHANGES_LOG, open, workdir / CHANGES_LOG, "a",
                        encoding="utf-8") as f:
        _guard_write(workdir / CHANGES_LOG, _append_line, f, record)
    return
  distributed.sync("config checked")
  if distributed.is_main():
    ckpt.write_json_atomic(path, resolved)


def sample_grid(run: Run, trainable, step: int, workdir: Path, progress: bool = False) -> Path | None:
  """Samples the config's prompts with `trainable` (host arrays); writes samples/step_STEP.png.
  Every process calls it (the images are split over them); the first one writes."""
  c = run.config
  if not c.sample_prompts:
    return None
  options = SampleOptions(steps=c.sample_steps, guidance=c.sample_guidance, seed=c.sample_seed,
                          height=c.data.resolution, width=c.data.resolution, batch_size=4)
  method = run.method
  inputs = {}
  if method.conditioning.input_keys:   # e.g. E4T's image: the first training example's
    first = run.dataset[0]
    inputs = {k: np.asarray(first[k][:1]) for k in method.conditioning.input_keys}
  sampling = Sampling(run.full_params(trainable), run.tokenizer, method.conditioning,
                      method.tokens.expand, inputs, method.unet,
                      run.tokenizers[1] if len(run.tokenizers) > 1 else None,
                      getattr(method.conditioning, "prompt_length", None))
  images = text_to_image(run.pipe, list(c.sample_prompts), c.sample_negative_prompt,
                         c.sample_images, options, progress=progress, sampling=sampling)
  path = workdir / "samples" / f"step_{step:06d}.png"
  return save_png(grid(images, cols=c.sample_images), path) if distributed.is_main() else path


def _append_line(f, line: str) -> None:
  f.write(line + "\n")
  f.flush()


def _terminate_last_line(path: Path) -> None:
  """Ends the file with a newline if a killed run left its last line torn."""
  if path.is_file() and path.stat().st_size:
    with open(path, "rb+") as f:
      f.seek(-1, 2)
      if f.read(1) != b"\n":
        f.write(b"\n")


def _stop_diverged(found, manager, workdir: Path) -> None:
  """Moves the checkpoints from the divergence on to WORKDIR/diverged/ (a resume starts from
  the last good one) and raises DivergenceError naming the step, the leaf and that checkpoint."""
  manager.wait_until_finished()
  moved = [s for s in manager.all_steps() if s >= found.step]
  ckpt.move_aside(manager, moved, workdir / "diverged")
  last = manager.latest_step()
  kept = (f"the last good checkpoint is step {last} in {manager.directory}" if last is not None
          else "no checkpoint was written before it")
  if moved:
    kept += f"; the checkpoints of steps {', '.join(map(str, moved))} moved to {workdir / 'diverged'}"
  raise DivergenceError(f"training diverged: {found.message}; stopping with no result ({kept}). "
                        "Continue from that checkpoint at a lower lr (the same command with "
                        "--continue-with-changes --config.optim.lr=...), or check the data.")


def train(config: RunConfig, workdir, *, progress: bool = True, mesh=None,
          continue_with_changes: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir`, holding its lock (workdir_lock.py: a
  second run on the same workdir is refused). `continue_with_changes`: the run may resume with
  CONTINUE_CHANGES changed (its lr, schedule, steps), logged. Returns a summary dict: the
  final `state`, the `run` (its `trainable` and the base leaves it trained are shapes by then:
  `Run.base_pipeline()` gives the base whole), `outputs`, ..."""
  workdir = Path(workdir)
  with workdir_lock(workdir, hold=distributed.is_main()):
    distributed.sync("workdir locked")
    try:
      return _train(config, workdir, progress=progress, mesh=mesh,
                    continue_with_changes=continue_with_changes)
    except WriteFailed as e:
      raise WriteFailed(f"{e}; {_last_complete(workdir)}") from None


def _last_complete(workdir: Path) -> str:
  """'the last complete checkpoint is step N in DIR ...' (orbax's unfinished temporaries of
  the failed save removed)."""
  folder = workdir / "checkpoints"
  for tmp in folder.glob("*.orbax-checkpoint-tmp*") if distributed.is_main() else ():
    shutil.rmtree(tmp, ignore_errors=True)
  steps = ckpt.finished_steps(workdir)
  if not steps:
    return "no checkpoint was complete yet"
  return (f"the last complete checkpoint is step {steps[-1]} in {folder}; the same command "
          "resumes from it once the disk has room")


def _guard_write(path: Path, fn, *args, **kwargs):
  """fn(...), an OS error on the way (orbax's and tensorstore's wrapped ones too) as one
  WriteFailed naming `path` and the free space."""
  try:
    return fn(*args, **kwargs)
  except WriteFailed:
    raise
  except Exception as e:
    cause, seen = e, []
    while cause is not None and not isinstance(cause, OSError) and cause not in seen:
      seen.append(cause)
      cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
      raise write_failure(path, cause) from None
    if "No space left" in str(e):
      raise write_failure(path, OSError(errno.ENOSPC, "No space left on device")) from None
    raise


def _train(config: RunConfig, workdir: Path, *, progress: bool, mesh,
           continue_with_changes: bool) -> dict:
  if config.mixed_precision == "auto":         # resolved once: config.json records the choice
    config = dataclasses.replace(config, mixed_precision=resolve_mixed_precision("auto"))
    log.info("mixed_precision auto on %s: %s", jax.default_backend(), {
        "bf16": "bf16 compute, float32 trainable params", "no": "float32"}[config.mixed_precision])
  reporting.names(config.report_to)          # a missing writer fails before the model loads
  _write_config(workdir, config, continue_with_changes)
  run = build(config, mesh=mesh, workdir=workdir, progress=progress)
  c = config
  total = c.steps * c.optim.grad_accum            # micro-steps
  state = initial_state(run, consume=True)
  run = without_initial_params(run)
  guard = Guard(state.trainable, lambda step: float(run.schedule(optimizer_step(step - 1,
                                                                                c.optim.grad_accum))))
  st_sh = jax.tree.map(lambda x: x.sharding, state)
  fr_sh = infer_shardings(run.frozen, tuple(c.sharding), run.mesh)
  frozen = shard_like(run.frozen, fr_sh)
  manager = ckpt.make_manager(workdir, c.keep_checkpoints)
  iterator = data.make_iterator(run.dataset)
  meta = {"base_path": str(run.model_dir), "base_fingerprint": run.fingerprint,
          "method": c.method_name, "config": c.to_dict()}
  restored = ckpt.restore_latest(manager, ckpt.abstract_of(state, st_sh), iterator,
                                 run.fingerprint, workdir)
  start = 0
  if restored is not None:
    state, start = restored
    log.info("resuming %s from step %d", workdir, start)
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.trainable))
  log.info("training %s: %d trainable params in %d leaves (%s), %d steps of batch %d on %d device(s)",
           c.method_name, n_trainable, len(tree.flatten(run.trainable)),
           ", ".join(tree.paths(run.trainable)[:4]) + (" ..." if len(tree.flatten(run.trainable)) > 4 else ""),
           c.steps, c.batch_size, run.mesh.size)
  step_fn = jit_step(run, st_sh, fr_sh)
  main = distributed.is_main()           # writes the metrics and shows progress
  blocks = mesh_lib.process_block(run.mesh)[1]
  metrics_path = workdir / "metrics.jsonl"
  metrics_file = None
  if main:
    _guard_write(metrics_path, _terminate_last_line, metrics_path)   # a killed run's torn line
    metrics_file = _guard_write(metrics_path, open, metrics_path, "a", encoding="utf-8")
  reporters = (reporting.open_reporters(c.report_to, workdir, config=c.to_dict(), start=start)
               if main else reporting.Reporters())
  bar = tqdm(total=total, initial=start, desc=f"train {c.method_name}", unit="step",
             disable=not (progress and main), dynamic_ncols=True)
  failed = True
  shapes = set()                   # batch shapes seen: the step compiles once per shape (bucket)
  compiled_shapes = 0
  pending, pending_from, last_log_time, last_log_step = [], start, time.perf_counter(), start
  try:
    for step in range(start, total):
      batch = next(iterator)
      shape = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
      if shape not in shapes:
        shapes.add(shape)
        if c.data.buckets:
          h, w = (int(v) for v in batch[TIME_IDS][0, 4:])     # the target size: the bucket's
          log.info("step %d: compiling the step for bucket %dx%d (%d batch shape(s) so far)",
                   step + 1, w, h, len(shapes))
      rows = len(next(iter(batch.values()))) * blocks          # this process loads its block
      batch = mesh_lib.global_batch(run.mesh, batch, rows)
      state, metrics = step_fn(state, frozen, batch)
      if len(shapes) > compiled_shapes:      # the step compiled: return the compiler's memory
        compiled_shapes = len(shapes)
        release_freed_memory()
      pending.append(metrics)
      done = step + 1
      bar.update(1)
      at_log = done % c.log_every == 0 or done == total
      at_ckpt = done % c.checkpoint_every == 0 or done == total
      if at_log or at_ckpt:
        found = guard.check(pending, pending_from + 1)
        if found is not None:
          _stop_diverged(found, manager, workdir)
        now = time.perf_counter()
        last = jax.device_get(pending[-1])
        record = {"step": done, **{k: float(v) for k, v in last.items() if k != "leaf_max"},
                  "lr": float(run.schedule(optimizer_step(done - 1, c.optim.grad_accum))),
                  **optimizer_metrics(state.opt_state),
                  "steps_per_sec": (done - last_log_step) / max(now - last_log_time, 1e-9)}
        if main:
          _guard_write(metrics_path, _append_line, metrics_file, json.dumps(record))
        reporters.scalars(done, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        pending, pending_from, last_log_time, last_log_step = [], done, now, done
      if at_ckpt:
        _guard_write(workdir / "checkpoints" / str(done), ckpt.save, manager, done, state,
                     iterator, meta)
      if c.sample_every and done % c.sample_every == 0 and done != total:
        reporters.image(done, "samples", sample_grid(
            run, distributed.to_host(evaluation_params(state)), done, workdir))
    _guard_write(workdir / "checkpoints" / str(total), manager.wait_until_finished)
    failed = False
  finally:
    bar.close()
    if metrics_file is not None:
      metrics_file.close()
    if failed:
      reporters.close()
    try:
      manager.close()
    except Exception:          # a failed save's error: already being raised as one line
      if not failed:
        raise
  try:       # the result, written and sampled: the EMA or schedule-free's averaged params if on
    final = distributed.to_host(evaluation_params(state))
    outputs = write_outputs(run, final, workdir, step=total) if main else []
    distributed.sync("outputs written")        # the others wait while the first one writes
    grid_path = sample_grid(run, final, total, workdir, progress=progress and main)
    reporters.image(total, "samples", grid_path)
  finally:
    reporters.close()
  return {"workdir": str(workdir), "steps": total, "state": state, "run": run, "outputs": outputs,
          "samples": str(grid_path) if grid_path else None, "batch_shapes": len(shapes)}


def write_outputs(run: Run, trainable, workdir: Path, step: int | None = None) -> list[str]:
  """The method's result files (Textual Inversion's embeddings, DreamBooth's model folder);
  with `step`, each records it and WORKDIR/result.json too (methods/result_file.py). Called on
  the first process only."""
  if run.method.save is None:
    return []
  context = ResultContext(Path(workdir), run.pipe, run.model_dir, run.config, run.full_params,
                          step)
  outputs = list(run.method.save(trainable, context))
  if step is not None:
    result_file.write_record(workdir, step, outputs)
  return outputs
