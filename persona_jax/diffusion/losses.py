"""The denoising objective every method trains with, and its weightings.

`Objective.per_example_loss` turns a batch into the [B] mean squared errors between the UNet's
output and the training target of the scheduler's `prediction_type`, with optional
min-SNR-gamma weighting, offset noise and per-pixel masks (Custom Diffusion's zoom augmentation);
`reduce` averages them, or, with class examples in the batch (prior preservation, DreamBooth's
recipe), mean(instance losses) + prior_loss_weight * mean(class losses).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from persona_jax.diffusion.schedules import (SchedulerConfig, add_noise, alphas_cumprod,
                                             training_target)


def snr(alphas_cumprod, t):
  """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t: [B]."""
  ab = jnp.take(alphas_cumprod, t)
  return ab / (1.0 - ab)


def min_snr_weights(snr_t, gamma: float, prediction_type: str):
  """Min-SNR-gamma loss weights (Hang et al. 2023), finite at SNR 0 and SNR infinity.

  epsilon: min(snr, gamma) / snr = min(1, gamma / snr)   (1 at SNR 0, 0 at SNR inf)
  v:       min(snr, gamma) / (snr + 1)                     (0 at SNR 0 and at SNR inf)
  sample:  min(snr, gamma)
  """
  if prediction_type == "epsilon":
    return jnp.where(snr_t > 0, jnp.minimum(1.0, gamma / jnp.maximum(snr_t, 1e-38)), 1.0)
  if prediction_type == "v_prediction":
    return jnp.where(jnp.isfinite(snr_t), jnp.minimum(snr_t, gamma) / (snr_t + 1.0), 0.0)
  return jnp.minimum(snr_t, gamma)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The diffusion objective of a training run (a static argument of the jitted step)."""
  scheduler: SchedulerConfig
  vae_scaling_factor: float
  min_snr_gamma: float = 0.0           # 0: off
  offset_noise: float = 0.0            # 0: off (0.05-0.1 is the usual value)
  prior_loss_weight: float = 1.0       # lambda of the class examples' loss (`reduce`)

  def draw(self, rng, shape):
    """The noise [B, h, w, c] (with offset noise, if on) and timesteps [B] of one batch."""
    noise_rng, offset_rng, t_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    if self.offset_noise:
      noise = noise + self.offset_noise * jax.random.normal(
          offset_rng, (shape[0], 1, 1, shape[-1]), jnp.float32)
    t = jax.random.randint(t_rng, (shape[0],), 0, self.scheduler.num_train_timesteps)
    return noise, t

  def per_example_loss(self, latents, predict, rng, mask=None, weights=None):
    """The denoising loss of each example of a batch.

    Args:
      latents: [B, h, w, c] clean latents (already scaled by the VAE's scaling factor).
      predict: (noisy latents [B, h, w, c], timesteps [B]) -> (model output [B, h, w, c], aux):
        aux is returned as the third value.
      rng: key for noise and timesteps (`draw`).
      mask: optional [B, h, w, 1] weights >= 0: each example's loss is the weighted mean (in
        {0, 1}: only masked positions count; `data.mask_loss_weight`: 1 + w * subject).
      weights: optional [B, h, w, 1] weights >= 0 applied to prediction and target, the loss
        still the mean over the whole latent: mean((w * pred - w * target)^2) (FastComposer).
    Returns:
      ([B] losses, min-SNR weighted if on; metrics dict of scalars; aux).
    """
    ab = jnp.asarray(alphas_cumprod(self.scheduler))
    latents = latents.astype(jnp.float32)
    noise, t = self.draw(rng, latents.shape)
    noisy = add_noise(ab, latents, noise, t)
    target = training_target(self.scheduler.prediction_type, ab, latents, noise, t)
    pred, aux = predict(noisy, t)
    pred = pred.astype(jnp.float32)
    err = jnp.square(pred - target)                                       # [B, h, w, c]
    weighted = err if weights is None else err * jnp.square(weights.astype(jnp.float32))
    if mask is None:
      per_example = weighted.mean(axis=(1, 2, 3))
    else:
      m = jnp.broadcast_to(mask.astype(jnp.float32), err.shape)
      per_example = (weighted * m).sum(axis=(1, 2, 3)) / jnp.maximum(m.sum(axis=(1, 2, 3)), 1.0)
    if self.min_snr_gamma:
      per_example = per_example * min_snr_weights(snr(ab, t), self.min_snr_gamma,
                                                   self.scheduler.prediction_type)
    metrics = {"mse": err.mean(), "timestep_mean": t.astype(jnp.float32).mean()}
    return per_example, metrics, aux

  def reduce(self, per_example, prior=None):
    """The batch loss of [B] per-example losses: their mean, or with `prior` [B] (1 on class
    examples) mean(instance losses) + prior_loss_weight * mean(class losses), one forward for
    both (DreamBooth's prior preservation). Returns (loss, metrics)."""
    if prior is None:
      return per_example.mean(), {}
    prior = prior.astype(jnp.float32)
    instance_loss = jnp.sum(per_example * (1.0 - prior)) / jnp.maximum(jnp.sum(1.0 - prior), 1.0)
    prior_loss = jnp.sum(per_example * prior) / jnp.maximum(jnp.sum(prior), 1.0)
    return (instance_loss + self.prior_loss_weight * prior_loss,
            {"instance_loss": instance_loss, "prior_loss": prior_loss})
