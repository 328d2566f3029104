"""Noise schedules from a checkpoint's `scheduler/scheduler_config.json`.

Whatever scheduler class the folder names (real SD 1.5 names PNDM), its config is read for the
noise schedule and prediction type, as `DDIMScheduler.from_config` does; keys that only
configure another sampler (`skip_prk_steps`, `use_karras_sigmas`, ...) are ignored with a log line.
"""

from __future__ import annotations

import dataclasses
import logging

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
    return dataclasses.replace(config, class_name=class_name)

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
