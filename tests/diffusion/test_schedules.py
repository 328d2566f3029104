"""Schedules, DDIM steps and training targets equal diffusers' DDIMScheduler, option by option."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.diffusion import sampling, samplers, schedules
from persona_jax.diffusion.schedules import SchedulerConfig
from tests.torch_reference import require_torch

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=tuple(np.linspace(1e-4, 0.03, 1000).tolist())),
]


def ddim(**kw):
  from diffusers import DDIMScheduler
  return DDIMScheduler(**kw)


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda k: k.get("beta_schedule", "trained") +
                         ("_zsnr" if k.get("rescale_betas_zero_snr") else ""))
def test_alphas_cumprod(kw):
  require_torch()
  ref = ddim(**kw).alphas_cumprod.numpy()
  ours = schedules.alphas_cumprod(SchedulerConfig(**kw))
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-7)
  if kw.get("rescale_betas_zero_snr"):
    assert ours[-1] == 0


@pytest.mark.parametrize("spacing,steps,offset", [
    ("leading", 50, 1), ("leading", 7, 0), ("trailing", 10, 0), ("trailing", 7, 0),
    ("linspace", 13, 0), ("leading", 1000, 0)])
def test_inference_timesteps(spacing, steps, offset):
  require_torch()
  ref = ddim(timestep_spacing=spacing, steps_offset=offset)
  ref.set_timesteps(steps)
  ours = schedules.inference_timesteps(SchedulerConfig(timestep_spacing=spacing, steps_offset=offset), steps)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())


STEP_CASES = [case for case in itertools.product(
    ["epsilon", "v_prediction", "sample"],
    [dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=0.5),
     dict(thresholding=True, sample_max_value=1.5, clip_sample=False)],
    [dict(set_alpha_to_one=False, steps_offset=1), dict(set_alpha_to_one=True, timestep_spacing="trailing"),
     dict(timestep_spacing="linspace", rescale_betas_zero_snr=True)],
    [0.0, 0.7])
    # Zero terminal SNR with epsilon prediction divides by alpha_bar = 0 (in diffusers too).
    if not (case[0] == "epsilon" and case[2].get("rescale_betas_zero_snr"))]


@pytest.mark.parametrize("prediction,clip,spacing,eta", STEP_CASES)
def test_ddim_step_matches_diffusers(prediction, clip, spacing, eta):
  torch = require_torch()
  kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type=prediction, **clip, **spacing)
  ref = ddim(**kw)
  steps = 10
  ref.set_timesteps(steps)
  config = SchedulerConfig(**kw)
  arrays = samplers.ddim_arrays(config, steps)
  np.testing.assert_array_equal(arrays.timesteps, ref.timesteps.numpy())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
  for i, t in enumerate(ref.timesteps):
    out = rng.standard_normal(x.shape).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                    variance_noise=torch.from_numpy(noise))
    got, x0 = samplers.ddim_step(config, jnp.asarray(out), jnp.asarray(x), arrays.alpha[i],
                                 arrays.alpha_prev[i], jnp.float32(eta), jnp.asarray(noise))
    np.testing.assert_allclose(x0, want.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
    x = want.prev_sample.numpy()


def test_add_noise_and_training_targets():
  torch = require_torch()
  kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  ref = ddim(**kw)
  ab = jnp.asarray(schedules.alphas_cumprod(SchedulerConfig(**kw)))
  rng = np.random.default_rng(1)
  x0, noise = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
  t = np.array([0, 500, 999])
  tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
  np.testing.assert_allclose(schedules.add_noise(ab, x0, noise, t), ref.add_noise(tx0, tn, tt).numpy(),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(schedules.training_target("v_prediction", ab, x0, noise, t),
                             ref.get_velocity(tx0, tn, tt).numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(schedules.training_target("epsilon", ab, x0, noise, t), noise)
  np.testing.assert_array_equal(schedules.training_target("sample", ab, x0, noise, t), x0)


def test_v_target_is_consistent_with_the_sampler():
  """Feeding the exact v target to the sampler's x0 formula recovers x0 (and eps)."""
  config = SchedulerConfig(prediction_type="v_prediction")
  ab = jnp.asarray(schedules.alphas_cumprod(config))
  rng = np.random.default_rng(2)
  x0, noise = (jnp.asarray(rng.standard_normal((1, 3, 3, 2)), jnp.float32) for _ in range(2))
  t = jnp.array([321])
  xt = schedules.add_noise(ab, x0, noise, t)
  v = schedules.training_target("v_prediction", ab, x0, noise, t)
  rx0, reps = samplers.predict_x0_and_eps("v_prediction", v, xt, ab[321])
  np.testing.assert_allclose(rx0, x0, atol=1e-5)
  np.testing.assert_allclose(reps, noise, atol=1e-5)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_rescale_matches_diffusers(rescale):
  torch = require_torch()
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  rng = np.random.default_rng(3)
  u, c = (rng.standard_normal((2, 4, 5, 3)).astype(np.float32) for _ in range(2))
  g = 7.5
  want = u + g * (c - u)
  if rescale:
    want = rescale_noise_cfg(torch.from_numpy(want), torch.from_numpy(c), rescale).numpy()
  got = sampling.guide(jnp.asarray(u), jnp.asarray(c), jnp.float32(g), jnp.float32(rescale))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A scale <= 1 means no guidance, as in diffusers: the conditional output alone.
  np.testing.assert_array_equal(sampling.guide(jnp.asarray(u), jnp.asarray(c), jnp.float32(1.0),
                                               jnp.float32(rescale)), c)


def test_pipeline_scheduler_fixes_outdated_configs_like_diffusers():
  """SD 1.x ships a PNDM config without clip_sample (DDIM's default would clip the latents)."""
  config = SchedulerConfig.from_dict({"_class_name": "PNDMScheduler", "steps_offset": 0,
                                      "skip_prk_steps": True})
  assert config.clip_sample and config.steps_offset == 0
  fixed = sampling.pipeline_scheduler(config)
  assert not fixed.clip_sample and fixed.steps_offset == 1
  assert sampling.pipeline_scheduler(fixed) == fixed
