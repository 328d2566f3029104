"""Noise schedules from a checkpoint's `scheduler/scheduler_config.json`.

Whatever scheduler class the folder names (real SD 1.5 names PNDM), its config is read for the
noise schedule and prediction type, as `DDIMScheduler.from_config` does; keys that only
configure another sampler (`skip_prk_steps`, `use_karras_sigmas`, ...) are ignored with a log line.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax.numpy as jnp
import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.models.configs import read_config

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The DDIM/DDPM schedule fields of a diffusers scheduler config (DDIMScheduler defaults)."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  clip_sample: bool = True
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = "epsilon"
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  clip_sample_range: float = 1.0
  sample_max_value: float = 1.0
  timestep_spacing: str = "leading"
  rescale_betas_zero_snr: bool = False
  class_name: str = dataclasses.field(default="DDIMScheduler", metadata={"runtime": True})
  # Whether the file gave timestep_spacing: diffusers' `from_config` of a file without it takes
  # the sampler class's default (DDIM "leading", Euler and DPM-Solver "linspace").
  spacing_given: bool = dataclasses.field(default=True, metadata={"runtime": True})

  @classmethod
  def from_dict(cls, raw, source="scheduler/scheduler_config.json") -> "SchedulerConfig":
    class_name = raw.get("_class_name", "DDIMScheduler")
    extra = set()
    if class_name != "DDIMScheduler":
      # Another sampler's config: read the schedule, ignore (and log) its sampler-only keys.
      fields = {f.name for f in dataclasses.fields(cls)}
      extra = {k for k in raw if not k.startswith("_") and k not in fields}
      if extra:
        log.info("%s: %s config; ignoring its sampler-only keys %s", source, class_name,
                 ", ".join(sorted(extra)))
    config = read_config(cls, raw, source=source, ignored=extra)
    return dataclasses.replace(config, class_name=class_name,
                               spacing_given="timestep_spacing" in raw)

  def validate(self, source: str) -> None:
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ConfigError(f"{source}: beta_schedule '{self.beta_schedule}' is not supported "
                        f"({', '.join(BETA_SCHEDULES)}, or trained_betas)")
    if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
      raise ConfigError(f"{source}: trained_betas has {len(self.trained_betas)} entries, "
                        f"num_train_timesteps is {self.num_train_timesteps}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ConfigError(f"{source}: prediction_type '{self.prediction_type}' is not supported "
                        f"({', '.join(PREDICTION_TYPES)})")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ConfigError(f"{source}: timestep_spacing '{self.timestep_spacing}' is not supported "
                        f"({', '.join(TIMESTEP_SPACINGS)})")


# ----------------------------------------------------------------------------------------------
# The schedule as arrays.


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """squaredcos_cap_v2: betas from alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR 0."""
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  ab = sqrt_ab ** 2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return 1.0 - alphas


def betas(config: SchedulerConfig) -> np.ndarray:
  """The training betas [T], float64 (diffusers computes them in float32; we round at the end)."""
  n = config.num_train_timesteps
  if config.trained_betas is not None:
    b = np.asarray(config.trained_betas, dtype=np.float64)
  elif config.beta_schedule == "linear":
    b = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
  elif config.beta_schedule == "scaled_linear":
    b = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float64) ** 2
  else:
    b = _cosine_betas(n)
  if config.rescale_betas_zero_snr:
    b = _rescale_zero_terminal_snr(b)
  return b


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), [T] float32."""
  return np.cumprod(1.0 - betas(config)).astype(np.float32)


def inference_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The sampler's timesteps [num_steps] (descending), per `timestep_spacing`, as diffusers."""
  n = config.num_train_timesteps
  if not 0 < num_steps <= n:
    raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
  if config.timestep_spacing == "linspace":
    t = np.linspace(0, n - 1, num_steps).round()[::-1]
  elif config.timestep_spacing == "leading":
    t = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + config.steps_offset
  else:  # trailing
    t = np.round(np.arange(n, 0, -n / num_steps)) - 1
  return t.astype(np.int64)


def _expand(a, x):
  """a: [B] -> broadcastable against x: [B, ...]."""
  return a.reshape(a.shape + (1,) * (x.ndim - 1))


def add_noise(alphas_cumprod, x0, noise, t):
  """DDPM forward noising q(x_t | x_0). alphas_cumprod: [T]; x0, noise: [B, ...]; t: [B] int."""
  ab = _expand(jnp.take(alphas_cumprod, t), x0).astype(x0.dtype)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def training_target(prediction_type: str, alphas_cumprod, x0, noise, t):
  """What the denoiser is trained to output: noise, v = sqrt(ab) eps - sqrt(1-ab) x0, or x0."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "sample":
    return x0
  if prediction_type == "v_prediction":
    ab = _expand(jnp.take(alphas_cumprod, t), x0).astype(x0.dtype)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
  raise ValueError(f"unknown prediction_type {prediction_type}")
