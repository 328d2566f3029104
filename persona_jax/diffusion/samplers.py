"""The samplers SDXL users pick, beside DDIM, as diffusers' schedulers compute them.

  "ddim"             DDIMScheduler
  "euler"            EulerDiscreteScheduler (s_churn 0, linear interpolation, final sigma 0)
  "euler_ancestral"  EulerAncestralDiscreteScheduler
  "dpmpp_2m"         DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                     solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
  "dpmpp_2m_karras"  the same with use_karras_sigmas=True

Each is built from a `SchedulerConfig` as `XScheduler.from_config(config)` builds it: the config's
schedule, prediction type, timestep spacing and steps_offset; keys the class does not have
(`clip_sample` for Euler, say) are not read. The sigma schedulers set the last alpha_bar to
2**-24 when rescaling to zero terminal SNR, so the first sigma is about 4096, not infinite.

Everything a step needs that depends only on the step index (timesteps, sigmas, the solver's
coefficients) is computed once on the host, in float32 with the operations diffusers performs on
its scalars, so that the traced step is the same tensor arithmetic as diffusers' `step`. A step
reads its row of these tables with a traced index: the whole loop runs in `lax.fori_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from persona_jax.diffusion.schedules import SchedulerConfig, alphas_cumprod, inference_timesteps
from persona_jax.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")


# ----------------------------------------------------------------------------------------------
# DDIM.


class DDIMArrays(NamedTuple):
  """The schedule of one sampling run: per step, the timestep and alpha_bar now and next."""
  timesteps: np.ndarray     # [S] int32, descending
  alpha: np.ndarray         # [S] float32, alpha_bar[t]
  alpha_prev: np.ndarray    # [S] float32, alpha_bar[t - T // S] (or the final alpha)


def ddim_arrays(config: SchedulerConfig, num_steps: int) -> DDIMArrays:
  """As diffusers' DDIMScheduler: prev = t - T // S, final alpha 1 if set_alpha_to_one else ab[0]."""
  ab = alphas_cumprod(config)
  t = inference_timesteps(config, num_steps)
  prev = t - config.num_train_timesteps // num_steps
  final = np.float32(1.0) if config.set_alpha_to_one else ab[0]
  alpha_prev = np.where(prev >= 0, ab[np.clip(prev, 0, None)], final).astype(np.float32)
  return DDIMArrays(t.astype(np.int32), ab[t], alpha_prev)


def predict_x0_and_eps(prediction_type: str, model_output, sample, alpha):
  """(x0, eps) from the model output of any prediction type; alpha = alpha_bar_t (scalar)."""
  sa, sb = jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha)
  if prediction_type == "epsilon":
    return (sample - sb * model_output) / sa, model_output
  if prediction_type == "sample":
    return model_output, (sample - sa * model_output) / sb
  if prediction_type == "v_prediction":
    return sa * sample - sb * model_output, sa * model_output + sb * sample
  raise ValueError(f"unknown prediction_type {prediction_type}")


def threshold_sample(config: SchedulerConfig, x0):
  """Dynamic thresholding (Imagen): clip each sample to its `ratio` quantile of |x0|, then rescale."""
  b = x0.shape[0]
  flat = x0.reshape(b, -1).astype(jnp.float32)
  s = jnp.quantile(jnp.abs(flat), config.dynamic_thresholding_ratio, axis=1, keepdims=True)
  s = jnp.clip(s, 1.0, config.sample_max_value)
  return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def ddim_step(config: SchedulerConfig, model_output, sample, alpha, alpha_prev, eta, noise):
  """One DDIM step, equal to diffusers' `DDIMScheduler.step(..., variance_noise=noise)`.

  Args:
    model_output, sample, noise: [B, ...]; alpha, alpha_prev, eta: scalars (traced).
  Returns:
    (prev_sample, pred_original_sample).
  """
  x0, eps = predict_x0_and_eps(config.prediction_type, model_output, sample, alpha)
  if config.thresholding:
    x0 = threshold_sample(config, x0)
  elif config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  variance = (1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(1.0 - alpha_prev - std ** 2) * eps
  prev = jnp.sqrt(alpha_prev) * x0 + direction
  prev = jnp.where(eta > 0, prev + std * noise, prev)
  return prev.astype(sample.dtype), x0


# ----------------------------------------------------------------------------------------------
# The sigma schedules (host side, numpy), as the schedulers' __init__ and set_timesteps.

_F1 = np.float32(1.0)


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
  """sqrt((1 - ab) / ab) at every training timestep [T], float32, ascending in t.

  With rescale_betas_zero_snr the last alpha_bar is 2**-24 instead of 0 (Euler, Euler ancestral
  and DPM-Solver all do this), so the last sigma is about 4096.
  """
  ab = alphas_cumprod(config).copy()
  if config.rescale_betas_zero_snr:
    ab[-1] = np.float32(2.0 ** -24)
  return np.sqrt((_F1 - ab) / ab)


def _euler_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """EulerDiscreteScheduler.set_timesteps' timesteps [S], float32 (fractional with linspace)."""
  n = config.num_train_timesteps
  if config.timestep_spacing == "linspace":
    return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
  if config.timestep_spacing == "leading":
    t = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].copy().astype(np.float32)
    return t + np.float32(config.steps_offset)
  # For some S (61, 103, 121, ... of 1000) this float arange has S + 1 elements, the last a
  # timestep -1 that diffusers samples at too; we keep the first S, as DDIM's loop does.
  t = np.arange(n, 0, -n / num_steps).round().copy().astype(np.float32)
  return t[:num_steps] - _F1


def _dpm_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """DPMSolverMultistepScheduler.set_timesteps' timesteps [S], int64 (lambda_min_clipped -inf).

  Not DDIM's: "linspace" and "leading" space S + 1 points and drop the last.
  """
  n = config.num_train_timesteps
  if config.timestep_spacing == "linspace":
    return np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
  if config.timestep_spacing == "leading":
    ratio = n // (num_steps + 1)
    t = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
    return t + config.steps_offset
  # The first S only, as in _euler_timesteps.
  return np.arange(n, 0, -n / num_steps).round().copy().astype(np.int64)[:num_steps] - 1


def _sigma_to_t(sigma, log_sigmas: np.ndarray):
  """The fractional timestep of one sigma, interpolating log sigma (diffusers' `_sigma_to_t`)."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def _karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
  """Karras et al. 2022 (rho 7) from sigma_max down to sigma_min, float64 [S]."""
  rho = 7.0
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho = sigma_min ** (1 / rho)
  max_inv_rho = sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _input_scale_and_v(sigmas: np.ndarray) -> dict[str, np.ndarray]:
  """The Euler schedulers' scalars of sigma [S] (float32): scale_model_input divides by
  sqrt(sigma^2 + 1); the v-prediction x0 is out * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1).
  """
  s2p1 = sigmas * sigmas + _F1
  root = np.sqrt(s2p1)
  return {"input_scale": root, "v_out": -sigmas / root, "v_skip": s2p1}


def _euler_tables(config: SchedulerConfig, num_steps: int, ancestral: bool) -> dict:
  t = _euler_timesteps(config, num_steps)
  sig = train_sigmas(config)
  sigmas = np.interp(t, np.arange(0, len(sig)), sig)
  sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)            # final_sigmas_type "zero"
  s, s_next = sigmas[:-1], sigmas[1:]
  tables = {"timesteps": t, "sigmas": sigmas, **_input_scale_and_v(s)}
  if ancestral:
    sigma_up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    sigma_down = np.sqrt(s_next ** 2 - sigma_up ** 2)
    tables.update(sigma_up=sigma_up, dt=sigma_down - s)
  else:
    tables.update(dt=s_next - s)                              # s_churn 0: sigma_hat = sigma
  return tables


def _dpm_tables(config: SchedulerConfig, num_steps: int, karras: bool) -> dict:
  t = _dpm_timesteps(config, num_steps)
  sig = train_sigmas(config)
  log_sigmas = np.log(sig)
  if karras:
    s = _karras_sigmas(sig[0].item(), sig[-1].item(), num_steps)
    t = np.array([_sigma_to_t(x, log_sigmas) for x in s])
    if config.beta_schedule != "squaredcos_cap_v2":
      t = t.round()
    t = t.astype(np.int64)                                              # truncates, as torch's .to
  else:
    s = np.interp(t, np.arange(0, len(sig)), sig)
  sigmas = np.concatenate([s, [0]]).astype(np.float32)                  # final_sigmas_type "zero"
  # _sigma_to_alpha_sigma_t, and lambda = log(alpha) - log(sigma): +inf at the final sigma 0.
  alpha = _F1 / np.sqrt(sigmas * sigmas + _F1)
  sigma = sigmas * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)
  steps = np.arange(num_steps)
  h = lam[1:] - lam[:-1]                                                # lambda_t - lambda_s0
  coef = alpha[1:] * (np.exp(-h) - _F1)
  # The first step is first order (no previous x0), and so is the last (final sigma 0); the
  # steps between are second order (midpoint). lower_order_final's second-to-last rule gives
  # order 2 there too, so it changes nothing for solver_order 2.
  second = (steps >= 1) & (steps < num_steps - 1)
  h0 = np.zeros_like(h)
  h0[1:] = lam[1:-1] - lam[:-2]                                         # lambda_s0 - lambda_s1
  with np.errstate(divide="ignore", invalid="ignore"):
    inv_r0 = _F1 / (h0 / h)
  return {"timesteps": t.astype(np.int32), "sigmas": sigmas,
          "alpha": alpha[:-1], "sigma": sigma[:-1], "ratio": sigma[1:] / sigma[:-1], "coef": coef,
          "coef_d1": np.where(second, np.float32(0.5) * coef, 0).astype(np.float32),
          "inv_r0": np.where(second, inv_r0, 0).astype(np.float32)}


@functools.lru_cache(maxsize=64)
def _tables(name: str, config: SchedulerConfig, num_steps: int) -> dict[str, np.ndarray]:
  if name == "ddim":
    tables = ddim_arrays(config, num_steps)._asdict()
  elif name in ("euler", "euler_ancestral"):
    tables = _euler_tables(config, num_steps, ancestral=name == "euler_ancestral")
  else:
    tables = _dpm_tables(config, num_steps, karras=name == "dpmpp_2m_karras")
  tables = {k: a if k == "sigmas" else a[:num_steps] for k, a in tables.items()}  # DDIM's S + 1
  for a in tables.values():
    a.setflags(write=False)
  return tables


# ----------------------------------------------------------------------------------------------
# The sampler.


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One sampler, schedule and step count: hashable, a static argument of jitted functions.

  The loop: x = N(0, I) * init_noise_sigma, state = init_state(x); for i in 0..S-1:
  out = model(scale_model_input(x, i), arrays()["timesteps"][i]); x, state = step(out, x, i, ...).
  """
  name: str
  config: SchedulerConfig
  num_steps: int

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise ConfigError(f"unknown sampler '{self.name}' (one of {', '.join(SAMPLERS)})")
    n = self.config.num_train_timesteps
    if not 0 < self.num_steps <= n:
      raise ConfigError(f"{self.name}: the number of steps must be in 1..{n}, got {self.num_steps}")
    if self.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
      raise ConfigError(f"{self.name}: prediction_type '{self.config.prediction_type}' is not "
                        "supported (epsilon, v_prediction, sample)")
    if self.name == "euler_ancestral" and self.config.prediction_type == "sample":
      raise ConfigError("euler_ancestral does not support prediction_type 'sample' (neither does "
                        "diffusers' EulerAncestralDiscreteScheduler); pick another sampler")

  def arrays(self) -> dict[str, np.ndarray]:
    """The per-step tables (read-only numpy, computed once per sampler).

    "timesteps" [S] is what the UNet sees: int32 for ddim and the DPM-Solvers (integers in
    diffusers too), float32 for euler and euler_ancestral (fractional with linspace spacing).
    The sigma samplers also have "sigmas" [S + 1], ending in 0.
    """
    return dict(_tables(self.name, self.config, self.num_steps))

  @property
  def init_noise_sigma(self) -> float:
    """x_T = N(0, I) * init_noise_sigma: the largest sigma for Euler (sqrt(sigma^2 + 1) with
    leading spacing), 1 for DDIM and DPM-Solver (which work on the variance-preserving x)."""
    if self.name not in ("euler", "euler_ancestral"):
      return 1.0
    top = self.arrays()["sigmas"].max()
    if self.config.timestep_spacing in ("linspace", "trailing"):
      return float(top)
    return float(np.sqrt(top * top + _F1))

  def init_state(self, x):
    """The loop's carry besides x: DPM-Solver's previous x0 prediction (zeros), else ()."""
    if self.name.startswith("dpmpp"):
      return jnp.zeros(x.shape, jnp.float32)
    return ()

  def _at(self, key: str, i):
    return jnp.asarray(self.arrays()[key])[i]

  def scale_model_input(self, x, i):
    """The UNet's input at step i (traced int32): x / sqrt(sigma^2 + 1) for Euler, else x."""
    if self.name in ("euler", "euler_ancestral"):
      return x / self._at("input_scale", i)
    return x

  def step(self, model_output, x, i, state, noise, eta):
    """x_{i+1} from x_i and the model output at step i (as diffusers' `scheduler.step`).

    Args:
      model_output, x, noise: [B, ...]; noise is N(0, I), read by DDIM with eta > 0 and by
        Euler ancestral. i: traced int32 step index; state: the carry (init_state);
        eta: traced float scalar, read by DDIM only.
    Returns:
      (x_prev [B, ...] float32, state).
    """
    model_output = model_output.astype(jnp.float32)
    x = x.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    if self.name == "ddim":
      prev, _ = ddim_step(self.config, model_output, x, self._at("alpha", i),
                          self._at("alpha_prev", i), eta, noise)
      return prev, state
    if self.name in ("euler", "euler_ancestral"):
      return self._euler_step(model_output, x, i, noise), state
    return self._dpm_step(model_output, x, i, state)

  def _euler_step(self, model_output, x, i, noise):
    sigma = self._at("sigmas", i)
    prediction = self.config.prediction_type
    if prediction == "sample":
      x0 = model_output
    elif prediction == "epsilon":
      x0 = x - sigma * model_output
    else:
      x0 = model_output * self._at("v_out", i) + x / self._at("v_skip", i)
    derivative = (x - x0) / sigma
    prev = x + derivative * self._at("dt", i)
    if self.name == "euler_ancestral":
      prev = prev + noise * self._at("sigma_up", i)
    return prev

  def _dpm_step(self, model_output, x, i, previous_x0):
    prediction = self.config.prediction_type
    if prediction == "sample":
      x0 = model_output
    elif prediction == "epsilon":
      x0 = (x - self._at("sigma", i) * model_output) / self._at("alpha", i)
    else:
      x0 = self._at("alpha", i) * x - self._at("sigma", i) * model_output
    if self.config.thresholding:
      x0 = threshold_sample(self.config, x0)
    d1 = self._at("inv_r0", i) * (x0 - previous_x0)
    prev = self._at("ratio", i) * x - self._at("coef", i) * x0 - self._at("coef_d1", i) * d1
    return prev, x0


def make_sampler(name: str, config: SchedulerConfig, num_steps: int) -> Sampler:
  """The sampler `name` (one of SAMPLERS) for this schedule and step count, its tables built.

  As diffusers' `XScheduler.from_config(folder config)`: a timestep_spacing the file leaves out
  is the sampler class's default (linspace for Euler and DPM-Solver, leading for DDIM).
  """
  if name != "ddim" and not config.spacing_given:
    config = dataclasses.replace(config, timestep_spacing="linspace", spacing_given=True)
  sampler = Sampler(name, config, num_steps)
  sampler.arrays()
  return sampler


# What euler computes with; a folder's Euler config that says otherwise is warned about.
_EULER_DEFAULTS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                       timestep_type="discrete", interpolation_type="linear",
                       final_sigmas_type="zero")

# What dpmpp_2m computes with; a folder's DPM-Solver++ 2M config that says otherwise is logged.
_DPM_DEFAULTS = dict(solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                     final_sigmas_type="zero", use_lu_lambdas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, use_flow_sigmas=False, variance_type=None,
                     lambda_min_clipped=-float("inf"))


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  """A warning about the folder's scheduler config, once per process (not once per batch)."""
  log.warning(message)


def folder_default_sampler(raw_scheduler_config: dict) -> str:
  """The sampler a folder's scheduler/scheduler_config.json names (ddim for the ones we lack)."""
  raw = raw_scheduler_config
  class_name = raw.get("_class_name", "DDIMScheduler")
  if class_name == "DDIMScheduler":
    return "ddim"
  if class_name == "EulerDiscreteScheduler":
    options = [f"{k}={raw[k]!r}" for k, plain in _EULER_DEFAULTS.items()
               if raw.get(k, plain) not in (plain, None)]
    if options:
      _warn_once(f"scheduler config: EulerDiscreteScheduler with {', '.join(options)}; "
                 "persona_jax samples with plain Euler sigmas (diffusers would follow the config)")
    return "euler"
  if class_name == "EulerAncestralDiscreteScheduler":
    if raw.get("prediction_type") == "sample":
      log.info("scheduler config: EulerAncestralDiscreteScheduler cannot sample a 'sample' "
               "prediction model; sampling with ddim")
      return "ddim"
    return "euler_ancestral"
  if class_name == "DPMSolverMultistepScheduler":
    algorithm = raw.get("algorithm_type", "dpmsolver++")
    order = raw.get("solver_order", 2)
    if algorithm != "dpmsolver++" or order != 2:
      log.warning("scheduler config: DPMSolverMultistepScheduler %s of order %s is not available; "
               "sampling with ddim (--scheduler picks one of %s)", algorithm, order,
               ", ".join(SAMPLERS))
      return "ddim"
    other = sorted(k for k, v in _DPM_DEFAULTS.items() if k in raw and raw[k] != v)
    if other:
      log.warning("scheduler config: sampling with DPM-Solver++ 2M's defaults, not the config's %s",
               ", ".join(f"{k}={raw[k]!r}" for k in other))
    return "dpmpp_2m_karras" if raw.get("use_karras_sigmas") else "dpmpp_2m"
  log.info("scheduler config: %s is not available; sampling with ddim (--scheduler picks one of "
           "%s)", class_name, ", ".join(SAMPLERS))
  return "ddim"
