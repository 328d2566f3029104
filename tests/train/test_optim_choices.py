"""optim.optimizer: Prodigy against its reference package (prodigyopt, torch), schedule-free AdamW
against optax's own schedule_free_adamw, the combinations each refuses; a tiny run with each
trains, writes its evaluation params, reports to TensorBoard and resumes bitwise."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from persona_jax.errors import ConfigError
from persona_jax.train import loop
from persona_jax.train.config import run_config
from persona_jax.train.optim import (OptimConfig, ProdigyConfig, evaluation_params, make_optimizer,
                                     optimizer_metrics)
from persona_jax.train.state import init_state
from tests.markers import slow
from tests.runs import one_device_mesh, ti_config
from tests.train.test_loop import _final_state

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(4, 3)).astype(np.float32), "b": RNG.normal(size=(3,)).astype(np.float32)}
TARGET = {"w": RNG.normal(size=(4, 3)).astype(np.float32) * 3, "b": RNG.normal(size=(3,)).astype(np.float32) * 3}


def quadratic_grads(params):
  """Gradients of 0.5 |params - TARGET|^2 (a scale per leaf, so D must adapt)."""
  return {k: {"w": 2.0, "b": 0.5}[k] * (v - TARGET[k]) for k, v in params.items()}


def quadratic_loss(params):
  return float(sum(np.sum((np.asarray(params[k]) - TARGET[k]) ** 2) for k in params))


def run_ours(config, steps):
  tx, _ = make_optimizer(config, PARAMS, total_steps=steps, batch_size=1)
  params, state = jax.tree.map(jnp.asarray, PARAMS), tx.init(PARAMS)
  ds, update = [], jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(quadratic_grads(params), state, params)
    params = optax.apply_updates(params, updates)
    ds.append(optimizer_metrics(state)["prodigy_d"])
  return jax.device_get(params), ds


@pytest.mark.parametrize("prodigy, weight_decay, warmup", [
    (ProdigyConfig(), 0.0, 0),
    (ProdigyConfig(use_bias_correction=False, d0=1e-3), 1e-2, 0),
    (ProdigyConfig(safeguard_warmup=True, d_coef=2.0, beta3=0.99, d0=1e-4), 1e-2, 0),
    # lr 0 at step 0: prodigyopt skips a step whose gradient sum is zero (optax would make D NaN)
    (ProdigyConfig(use_bias_correction=False, d0=1e-3), 0.0, 1)], ids=["default", "no_bias_correction", "safeguard", "warmup"])
def test_prodigy_follows_prodigyopt(prodigy, weight_decay, warmup):
  """Our Prodigy (optax.contrib's, with the run's options) takes prodigyopt's steps: the same
  params and the same step-size estimate D, which grows from d0."""
  torch = pytest.importorskip("torch")
  prodigyopt = pytest.importorskip("prodigyopt")
  steps = 12
  config = OptimConfig(optimizer="prodigy", lr=1.0, weight_decay=weight_decay, clip_grad_norm=0.0,
                       warmup_steps=warmup, prodigy=prodigy)
  ours, ds = run_ours(config, steps)
  ref = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in PARAMS.items()}
  opt = prodigyopt.Prodigy(list(ref.values()), lr=1.0, betas=(0.9, 0.999),
                           beta3=prodigy.beta3 or None, weight_decay=weight_decay,
                           use_bias_correction=prodigy.use_bias_correction,
                           safeguard_warmup=prodigy.safeguard_warmup, d0=prodigy.d0,
                           d_coef=prodigy.d_coef)
  ref_ds = []
  for k in range(steps):
    opt.param_groups[0]["lr"] = 0.0 if k < warmup else 1.0
    grads = quadratic_grads({n: t.detach().numpy() for n, t in ref.items()})
    for n, t in ref.items():
      t.grad = torch.tensor(grads[n])
    opt.step()
    ref_ds.append(opt.param_groups[0]["d"])
  # prodigyopt sums D's numerator in float64 (Python floats), optax in float32: 2e-4 apart at most
  np.testing.assert_allclose(ds, ref_ds, rtol=1e-3)
  assert ds[-1] > 2 * prodigy.d0
  for n, t in ref.items():
    np.testing.assert_allclose(ours[n], t.detach().numpy(), rtol=1e-3, atol=1e-6)
  assert quadratic_loss(ours) < quadratic_loss(PARAMS)


def test_prodigy_groups_estimate_their_own_step_size():
  """With lr groups each group has its own D (prodigyopt refuses different group lrs); a group's
  lr scales its steps, and a stopped group gets none."""
  config = OptimConfig(optimizer="prodigy", lr=1.0, clip_grad_norm=0.0, weight_decay=0.0,
                       lr_groups=(("b", 0.5, 0.5),))
  tx, _ = make_optimizer(config, PARAMS, total_steps=4, batch_size=1)
  params, state, update = jax.tree.map(jnp.asarray, PARAMS), tx.init(PARAMS), jax.jit(tx.update)
  moved = []
  for _ in range(4):
    updates, state = update(quadratic_grads(params), state, params)
    params = optax.apply_updates(params, updates)
    moved.append(float(jnp.abs(updates["b"]).max()))
  assert sorted(optimizer_metrics(state)) == ["prodigy_d/default", "prodigy_d/group0"]
  assert moved[0] > 0 and moved[1] > 0 and moved[2] == moved[3] == 0.0


def test_schedule_free_is_optax_schedule_free_adamw_and_saves_its_averaged_params():
  """Without groups our schedule-free AdamW is optax.contrib.schedule_free_adamw, bitwise; with
  groups each group steps as that optimizer at the group's lr (one average: its weights depend on
  the lr only up to a constant factor). `evaluation_params` is schedule_free_eval_params, found
  under clipping and accumulation, and the loss falls there."""
  base = OptimConfig(optimizer="schedule_free_adamw", lr=0.05, warmup_steps=2, weight_decay=1e-3,
                     clip_grad_norm=0.0)

  def trajectory(tx, steps=6, params=PARAMS):
    params, state, update = jax.tree.map(jnp.asarray, params), tx.init(params), jax.jit(tx.update)
    for _ in range(steps):
      updates, state = update(quadratic_grads(params), state, params)
      params = optax.apply_updates(params, updates)
    return params, state
  ours, _ = trajectory(make_optimizer(base, PARAMS, total_steps=6, batch_size=1)[0])
  theirs, _ = trajectory(optax.contrib.schedule_free_adamw(0.05, warmup_steps=2, weight_decay=1e-3))
  for k in PARAMS:
    np.testing.assert_array_equal(ours[k], theirs[k])

  grouped = dataclasses.replace(base, lr_groups=(("b", 0.2),))
  ours, _ = trajectory(make_optimizer(grouped, PARAMS, total_steps=6, batch_size=1)[0])
  for k, lr in (("w", 0.05), ("b", 0.2)):
    sole = optax.contrib.schedule_free_adamw(lr, warmup_steps=2, weight_decay=1e-3)
    alone, _ = trajectory(sole, params={k: PARAMS[k]})
    np.testing.assert_allclose(ours[k], alone[k], rtol=1e-5, atol=1e-7)

  tx, _ = make_optimizer(dataclasses.replace(base, clip_grad_norm=1.0, grad_accum=2), PARAMS,
                         total_steps=6, batch_size=1)
  y, opt_state = trajectory(tx, steps=12)
  state = init_state(PARAMS, tx, seed=0).replace(trainable=y, opt_state=opt_state)
  found = opt_state.inner_opt_state[1]                 # MultiSteps(chain(clip, schedule_free))
  assert isinstance(found, optax.contrib.ScheduleFreeState)
  x = evaluation_params(state)
  expected = optax.contrib.schedule_free_eval_params(found, y)
  for k in PARAMS:
    np.testing.assert_array_equal(x[k], expected[k])
    assert not np.allclose(x[k], y[k])
  assert quadratic_loss(x) < quadratic_loss(PARAMS)


def _values(**optim):
  return {"method": {"name": "textual_inversion", "placeholder": "<t>", "initializer": "ball"},
          "optim": optim}


@pytest.mark.parametrize("optim, message", [
    (dict(optimizer="lion"), r"optim.optimizer: 'lion' is not one of adamw, prodigy, schedule_free_adamw"),
    (dict(optimizer="prodigy"), r"optim.lr=0.0001 with optim.optimizer=prodigy: .* set optim.lr=1.0"),
    (dict(optimizer="prodigy", lr=1.0, lr_groups=(("tokens", 5e-3),)), r"optim.lr_groups 'tokens'=0.005"),
    (dict(optimizer="prodigy", lr=1.0, scale_lr=True), r"optim.scale_lr .* set optim.scale_lr=False"),
    (dict(optimizer="schedule_free_adamw", schedule="cosine"), r"set optim.schedule=constant"),
    (dict(optimizer="schedule_free_adamw", ema_decay=0.99), r"set optim.ema_decay=0"),
    (dict(prodigy=dict(d_coef=2.0)), r"optim.prodigy.d_coef: an option of optim.optimizer=prodigy, "
                                     r"but the optimizer is adamw"),
    (dict(optimizer="prodigy", lr=1.0, schedule_free=dict(weight_lr_power=1.0)),
     r"optim.schedule_free.weight_lr_power: an option of optim.optimizer=schedule_free_adamw")])
def test_unsupported_combinations_are_one_line_errors(optim, message):
  with pytest.raises(ConfigError, match=message) as e:
    run_config(_values(**optim))
  assert "\n" not in str(e.value)


def test_supported_combinations_build():
  """Prodigy with EMA, groups and accumulation; schedule-free with groups, warmup, clipping."""
  for optim in (dict(optimizer="prodigy", lr=1.0, ema_decay=0.99, grad_accum=2,
                     lr_groups=(("tokens", 0.5),), prodigy=dict(safeguard_warmup=True)),
                dict(optimizer="schedule_free_adamw", lr=1e-3, warmup_steps=10, grad_accum=2,
                     lr_groups=(("tokens", 5e-3),))):
    config = run_config(_values(**optim)).optim
    make_optimizer(config, {"tokens": jnp.zeros((1, 4))}, total_steps=10, batch_size=1)


@pytest.mark.parametrize("optimizer", ["schedule_free_adamw", pytest.param("prodigy", marks=slow)])
def test_tiny_run_saves_its_evaluation_params_reports_and_resumes_bitwise(model_dirs, tmp_path,
                                                                          monkeypatch, optimizer):
  """A tiny Textual Inversion run with the optimizer: its result is `evaluation_params`
  (schedule-free: the averaged x, not the y the gradients were taken at), moved from the
  initializer; TensorBoard holds metrics.jsonl's loss and lr (and Prodigy's D); resumed from its
  step-2 checkpoint, the run ends bitwise where it ended and TensorBoard shows each step once.
  (The resumed run reuses the built run and its compiled step, to save a second trace: the resume
  in a fresh process is test_loop's SIGKILL test.) Slow (Prodigy): also sample grids as images."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  lr = {"schedule_free_adamw": 5e-3, "prodigy": 1.0}[optimizer]
  sampling = (dict(sample_prompts=("a photo of <my-toy>",), sample_every=2, sample_steps=2,
                   sample_images=1) if optimizer == "prodigy" else {})
  config = ti_config(model_dirs["sd1"], optim=dict(optimizer=optimizer, lr=lr, warmup_steps=1),
                     report_to="tensorboard", keep_checkpoints=5, **sampling)
  built, compiled = [], []             # (run, its initial trainable on the host); the step
  real_build, real_jit = loop.build, loop.jit_step

  def build_once(*args, **kwargs):      # the step donates the initial trainable: a fresh copy
    if not built:
      run = real_build(*args, **kwargs)
      built.append((run, jax.device_get(run.trainable)))
    run, initial = built[0]
    return dataclasses.replace(run, trainable=jax.tree.map(jnp.asarray, initial))
  monkeypatch.setattr(loop, "build", build_once)
  monkeypatch.setattr(loop, "jit_step", lambda *a: compiled[0] if compiled else
                      compiled.append(real_jit(*a)) or compiled[0])
  a, b = tmp_path / "a", tmp_path / "b"
  result = loop.train(config, a, progress=False, mesh=one_device_mesh())
  state = result["state"]
  saved = load_file(a / "learned_embeds.safetensors")["<my-toy>"]
  np.testing.assert_array_equal(saved, np.asarray(evaluation_params(state)["tokens"]))
  assert not np.array_equal(saved, built[0][1]["tokens"])
  if optimizer == "schedule_free_adamw":
    assert not np.allclose(saved, np.asarray(state.trainable["tokens"]), rtol=0, atol=1e-6)

  def events(workdir):
    acc = EventAccumulator(str(workdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc
  records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
  tags = ["loss", "lr"] + (["prodigy_d"] if optimizer == "prodigy" else [])
  for tag in tags:
    logged = [(e.step, e.value) for e in events(a).Scalars(tag)]
    assert logged == [(r["step"], np.float32(r[tag])) for r in records], tag

  shutil.copytree(a, b, ignore=shutil.ignore_patterns("4", "learned_embeds.safetensors", "result.json"))
  loop.train(config, b, progress=False, mesh=one_device_mesh())
  assert len(built) == len(compiled) == 1
  final_a, final_b = _final_state(a, 4), _final_state(b, 4)
  assert final_a.keys() == final_b.keys() and len(final_a) > 3
  for k in final_a:
    np.testing.assert_array_equal(final_a[k], final_b[k], err_msg=k)
  np.testing.assert_array_equal(load_file(b / "learned_embeds.safetensors")["<my-toy>"], saved)
  resumed = events(b)
  assert [e.step for e in resumed.Scalars("loss")] == [1, 2, 3, 4]
  if sampling:
    import io

    from PIL import Image
    images = resumed.Images("samples")
    assert [i.step for i in images] == [2, 4]
    for image in images:                 # the grids of WORKDIR/samples, pixel for pixel
      grid = np.asarray(Image.open(b / "samples" / f"step_{image.step:06d}.png").convert("RGB"))
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                    grid)
