"""DreamBooth (Ruiz et al. 2022): fine-tune the whole UNet (and optionally the text encoder) on a
few images captioned "a [identifier] [class noun]", with class-prior preservation.

Prior preservation is on when the run's data has class images (`data.num_class_images > 0`):
each step's batch holds `batch_size` instance examples and as many class examples (generated
from the base model by the same sampler as `make-class-images`, prompt "a [class noun]"), one
forward, and the loss is mean(instance) + `prior_loss_weight` * mean(class), as in diffusers'
train_dreambooth.py. The loss target follows the base's `prediction_type` (epsilon or v).

The result is a diffusers folder, WORKDIR/model, with the trained UNet (and text encoder).
"""

from __future__ import annotations

import dataclasses
import logging

from persona_jax.errors import ConfigError
from persona_jax.methods.base import Method

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
  train_text_encoder: bool = False
  text_encoder_lr: float = 0.0       # 0: the UNet's lr (optim.lr)
  prior_loss_weight: float = 1.0     # lambda; used when the data has class images


def select_rules(config: DreamBoothConfig):
  return (("unet/.*", True),) + ((("text_encoder/.*", True),) if config.train_text_encoder else ())


def save_result(run, trainable, workdir):
  """Writes WORKDIR/model: the base folder's components with the trained weights (float32)."""
  from persona_jax.pipeline import save_pipeline
  pipe = dataclasses.replace(run.pipe, params=run.full_params(trainable))
  out = save_pipeline(pipe, workdir / "model", overwrite=True)
  log.info("wrote the fine-tuned model to %s (a diffusers folder)", out)
  return [str(out)]


def make(config: DreamBoothConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  if config.prior_loss_weight < 0:
    raise ConfigError(f"method.prior_loss_weight must be >= 0, got {config.prior_loss_weight}")
  if config.text_encoder_lr < 0:
    raise ConfigError(f"method.text_encoder_lr must be >= 0, got {config.text_encoder_lr}")
  if config.text_encoder_lr and not config.train_text_encoder:
    raise ConfigError("method.text_encoder_lr is set but method.train_text_encoder is False")
  groups = ((("text_encoder/.*", config.text_encoder_lr),)
            if config.train_text_encoder and config.text_encoder_lr else ())
  return Method(name="dreambooth", select=select_rules(config),
                prior_loss_weight=config.prior_loss_weight, lr_groups=groups,
                save_result=save_result)
