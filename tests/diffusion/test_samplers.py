"""Every sampler equals its diffusers scheduler over whole trajectories, config by config."""

import dataclasses
import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.diffusion import samplers, schedules
from persona_jax.diffusion.samplers import SAMPLERS, folder_default_sampler, make_sampler
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.errors import ConfigError
from tests.torch_reference import require_torch

# diffusers' sigma schedulers call np.array on torch tensors, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
          set_alpha_to_one=False)
CONFIGS = {
    "sd1": dict(SD, steps_offset=1),                                    # epsilon, leading
    "sd2_v": dict(SD, steps_offset=1, prediction_type="v_prediction"),
    # The toy model: zero terminal SNR, v-prediction, trailing (sigma_max about 4096).
    "zsnr_v_trailing": dict(SD, prediction_type="v_prediction", timestep_spacing="trailing",
                            rescale_betas_zero_snr=True),
    "linspace": dict(SD, timestep_spacing="linspace"),
    # DPM-Solver thresholds the x0 prediction; Euler has no such option (from_config drops it).
    "sample_threshold": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                             thresholding=True, sample_max_value=1.5, timestep_spacing="linspace"),
}
CASES = [(name, config, steps) for name, config, steps in
         itertools.product(SAMPLERS, CONFIGS, [8, 15])
         # diffusers' Euler ancestral has no "sample" prediction (test_bad_sampler_names_...).
         if not (name == "euler_ancestral" and CONFIGS[config].get("prediction_type") == "sample")
         # DDIM's steps do not depend on their number (test_schedules.py tests DDIM further).
         and not (name == "ddim" and steps == 15)]
# Where the first step is the last (DPM-Solver's first order at both ends), or next to it.
CASES += [(name, "sd2_v", steps) for name in ("dpmpp_2m", "dpmpp_2m_karras") for steps in (1, 2, 3)]


def reference(name, config: SchedulerConfig):
  """diffusers' scheduler, from_config of the whole config as a loaded pipeline's config is."""
  import diffusers
  full = {k: v for k, v in dataclasses.asdict(config).items() if k != "class_name"}
  if name == "ddim":
    return diffusers.DDIMScheduler.from_config(full)
  if name == "euler":
    return diffusers.EulerDiscreteScheduler.from_config(full)
  if name == "euler_ancestral":
    return diffusers.EulerAncestralDiscreteScheduler.from_config(full)
  return diffusers.DPMSolverMultistepScheduler.from_config(
      full, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
      lower_order_final=True, use_karras_sigmas=name == "dpmpp_2m_karras")


def with_our_alpha_bar(ref, name, config: SchedulerConfig):
  """diffusers' scheduler computing from our alpha_bar (call set_timesteps after), as the sigma
  schedulers' __init__ does: the last one 2**-24 with zero terminal SNR, except for DDIM."""
  torch = require_torch()
  ab = schedules.alphas_cumprod(config).copy()
  if name != "ddim" and config.rescale_betas_zero_snr:
    ab[-1] = 2.0 ** -24
  ref.alphas_cumprod = torch.from_numpy(ab)
  if name == "ddim" and not config.set_alpha_to_one:
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
  return ref


def ulps_of(x) -> float:
  """A few float32 ulps of the largest |x|."""
  return 4 * float(np.finfo(np.float32).eps) * float(np.abs(x).max())


@pytest.mark.parametrize("name,config_name,steps", CASES)
def test_matches_diffusers(name, config_name, steps, monkeypatch):
  """The schedule, then every step of a whole diffusers trajectory.

  The schedule: timesteps exactly; sigmas and init_noise_sigma up to diffusers' float32
  alpha_bar, whose cumulative product drifts up to ~4e-5 from ours (float64 rounded once, the
  alpha_bar training uses too).

  The steps, with diffusers computing from our alpha_bar: given the same x, model output and
  noise, every UNet input and every step's result equal diffusers' (DPM-Solver's carry is ours,
  built from those x). Up to 1e-5, or a few float32 ulps of the step's x where |x| is large: at
  sigma 4096 (zero terminal SNR) or 20000 (cosine) the first Euler step cancels x ~ sigma N(0, 1)
  down to ~sigma_1, and XLA divides by sigma as a multiplication by 1 / sigma, an ulp off torch.
  """
  torch = require_torch()
  config = SchedulerConfig(**CONFIGS[config_name])
  sampler = make_sampler(name, config, steps)
  tables = sampler.arrays()
  ref = reference(name, config)
  ref.set_timesteps(steps)
  assert tables["timesteps"].dtype == (np.float32 if name.startswith("euler") else np.int32)
  np.testing.assert_array_equal(tables["timesteps"], ref.timesteps.numpy())
  np.testing.assert_allclose(sampler.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-5)
  if name != "ddim":
    np.testing.assert_allclose(tables["sigmas"], ref.sigmas.numpy(), rtol=5e-5)

  ref = with_our_alpha_bar(ref, name, config)
  ref.set_timesteps(steps)
  if hasattr(ref, "set_begin_index"):
    # Else diffusers starts at the second of two equal first timesteps (karras sigmas on the
    # cosine schedule all round to t = 998 at first).
    ref.set_begin_index(0)
  np.testing.assert_array_equal(tables["timesteps"], ref.timesteps.numpy())
  np.testing.assert_allclose(sampler.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
  rng = np.random.default_rng(steps)
  shape = (2, 4, 4, 3)
  x = (rng.standard_normal(shape) * np.float32(ref.init_noise_sigma)).astype(np.float32)
  eta = 0.6 if name == "ddim" else 0.0
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral
  state = sampler.init_state(jnp.asarray(x))
  for i, t in enumerate(ref.timesteps):
    out, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    monkeypatch.setattr(ancestral, "randn_tensor", lambda *a, **k: torch.from_numpy(noise))
    step = jnp.int32(i)
    np.testing.assert_allclose(sampler.scale_model_input(jnp.asarray(x), step),
                               ref.scale_model_input(torch.from_numpy(x), t).numpy(),
                               rtol=1e-5, atol=1e-5, err_msg=f"input of step {i}")
    kw = dict(eta=eta, variance_noise=torch.from_numpy(noise)) if name == "ddim" else {}
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), **kw).prev_sample.numpy()
    got, state = sampler.step(jnp.asarray(out), jnp.asarray(x), step, state, jnp.asarray(noise),
                              jnp.float32(eta))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=max(1e-5, ulps_of(x)),
                               err_msg=f"step {i} of {steps}")
    x = want


@functools.partial(jax.jit, static_argnames="sampler")
def jitted_loop(sampler, x, outputs, noises, eta):
  """x [B, ...] through the sampler's loop in `lax.fori_loop`, given the model outputs and noises
  [S, B, ...]: every step's UNet input and result, [S, B, ...] each."""
  def body(i, carry):
    x, state, inputs, results = carry
    inputs = inputs.at[i].set(sampler.scale_model_input(x, i))
    x, state = sampler.step(outputs[i], x, i, state, noises[i], eta)
    return x, state, inputs, results.at[i].set(x)
  init = (x, sampler.init_state(x), jnp.zeros_like(outputs), jnp.zeros_like(outputs))
  return jax.lax.fori_loop(0, sampler.num_steps, body, init)[2:]


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_loop_jits(name):
  """In `fori_loop` (a traced step index, eta traced) the sampler computes what it computes step
  by step, on the toy model's schedule (sigma_max 4096)."""
  sampler = make_sampler(name, SchedulerConfig(**CONFIGS["zsnr_v_trailing"]), 6)
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 4, 4, 3)) * sampler.init_noise_sigma).astype(np.float32)
  outputs, noises = (rng.standard_normal((6, 2, 4, 4, 3)).astype(np.float32) for _ in range(2))
  inputs, results = jitted_loop(sampler, jnp.asarray(x), jnp.asarray(outputs),
                                jnp.asarray(noises), jnp.float32(0.5))
  assert np.isfinite(results).all()
  state = sampler.init_state(jnp.asarray(x))
  for i in range(6):
    step = jnp.int32(i)
    np.testing.assert_allclose(inputs[i], sampler.scale_model_input(jnp.asarray(x), step),
                               rtol=1e-5, atol=1e-5)
    previous = x
    x, state = sampler.step(jnp.asarray(outputs[i]), jnp.asarray(x), step, state,
                            jnp.asarray(noises[i]), jnp.float32(0.5))
    np.testing.assert_allclose(results[i], x, rtol=1e-5, atol=max(1e-5, ulps_of(previous)))


def test_zero_terminal_snr_starts_at_sigma_4096():
  """Euler on the toy schedule: alpha_bar[-1] = 2**-24 instead of 0, so sigma_max is finite."""
  config = SchedulerConfig(**CONFIGS["zsnr_v_trailing"])
  euler = make_sampler("euler", config, 4)
  assert euler.arrays()["timesteps"][0] == 999
  np.testing.assert_allclose(euler.arrays()["sigmas"][0], 4096, rtol=1e-6)
  np.testing.assert_allclose(euler.init_noise_sigma, 4096, rtol=1e-6)
  assert euler.arrays()["sigmas"][-1] == 0
  assert make_sampler("dpmpp_2m", config, 4).init_noise_sigma == 1.0


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral", "dpmpp_2m"])
def test_trailing_spacing_keeps_its_first_steps(name):
  """With 61 steps, trailing spacing's float arange has 62 elements (a last timestep -1, which
  diffusers samples at): the samplers keep the first 61, ending at sigma 0. (Karras sigmas
  make their own timesteps.)"""
  require_torch()
  config = SchedulerConfig(**CONFIGS["zsnr_v_trailing"])
  tables = make_sampler(name, config, 61).arrays()
  ref = reference(name, config)
  ref.set_timesteps(61)
  assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
  assert all(len(a) == (62 if k == "sigmas" else 61) for k, a in tables.items())
  np.testing.assert_array_equal(tables["timesteps"], ref.timesteps.numpy()[:61])
  if name != "ddim":
    np.testing.assert_allclose(tables["sigmas"][:-1], ref.sigmas.numpy()[:61], rtol=5e-5)
    assert tables["sigmas"][-1] == 0


def test_samplers_are_static_arguments():
  config = SchedulerConfig(**CONFIGS["sd1"])
  assert make_sampler("euler", config, 8) == samplers.Sampler("euler", config, 8)
  assert hash(make_sampler("euler", config, 8)) == hash(samplers.Sampler("euler", config, 8))
  with pytest.raises(ValueError):
    make_sampler("euler", config, 8).arrays()["sigmas"][0] = 0.0      # the tables are read-only


def test_bad_sampler_names_and_options():
  from persona_jax.cli.sample import SCHEDULERS
  assert SCHEDULERS == SAMPLERS                       # the --scheduler choices are every sampler
  config = SchedulerConfig()
  with pytest.raises(ConfigError, match="unknown sampler 'heun'.*ddim, euler, euler_ancestral"):
    make_sampler("heun", config, 10)
  with pytest.raises(ConfigError, match="1..1000, got 0"):
    make_sampler("euler", config, 0)
  with pytest.raises(ConfigError, match="euler_ancestral does not support prediction_type 'sample'"):
    make_sampler("euler_ancestral", dataclasses.replace(config, prediction_type="sample"), 10)


@pytest.mark.parametrize("raw,want,logged", [
    ({"_class_name": "DDIMScheduler"}, "ddim", None),
    ({}, "ddim", None),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "ddim", "PNDMScheduler"),
    ({"_class_name": "LMSDiscreteScheduler"}, "ddim", "LMSDiscreteScheduler"),
    ({"_class_name": "EulerDiscreteScheduler"}, "euler", None),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler",
     "use_karras_sigmas"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_ancestral", None),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m", None),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
      "solver_order": 2, "use_karras_sigmas": True}, "dpmpp_2m_karras", None),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"}, "dpmpp_2m",
     "solver_type='heun'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "ddim",
     "sde-dpmsolver++"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "ddim", "order 3"),
])
def test_folder_default_sampler(raw, want, logged, caplog):
  with caplog.at_level(logging.INFO, logger=samplers.__name__):
    assert folder_default_sampler(raw) == want
  if logged:
    assert logged in caplog.text
  else:
    assert not caplog.text
