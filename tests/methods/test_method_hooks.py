"""The shared training path's hooks for image-conditioned methods: a conditioning may hand the
UNet extra streams, and a method may add loss terms from the cross-attention maps of the same
forward (methods/base.py: apply_unet, method_loss)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.diffusion.losses import Objective
from persona_jax.models.components import SDModels
from persona_jax.methods.base import CONTEXT, LATENT_LOGVAR, LATENT_MEAN, Method, method_loss
from persona_jax.models.extra_conditioning import ExtraConditioning
from persona_jax.models.unet import UNet2DConditionModel, init_added_params


@dataclasses.dataclass(frozen=True)
class FixedStreams:
  """A conditioning that passes the batch's context and image tokens at a fixed IP scale."""
  scale: float
  input_keys: tuple = ("ip_tokens",)

  def prepare(self, models, params, batch):
    return {"context": batch[CONTEXT], "ip_tokens": batch["ip_tokens"]}

  def context(self, models, params, state, noisy, t):
    extra = ExtraConditioning(ip_tokens=state["ip_tokens"], ip_scale=jnp.float32(self.scale))
    return {"encoder_hidden_states": state["context"], "extra": extra}, {"seen": jnp.float32(1.0)}


def test_streams_and_attention_terms_reach_the_loss(pipes):
  pipe = pipes["sd1"]
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  batch = {LATENT_MEAN: latents, LATENT_LOGVAR: np.full_like(latents, -30.0),
           CONTEXT: rng.standard_normal((2, 77, 32)).astype(np.float32),
           "ip_tokens": rng.standard_normal((2, 4, 32)).astype(np.float32)}
  config = dataclasses.replace(pipe.unet_config, ip_adapter=True, attention_maps=("MID",))
  unet = UNet2DConditionModel(config)
  added = init_added_params(unet, jax.random.key(1), ExtraConditioning(ip_tokens=batch["ip_tokens"]))
  params = dict(pipe.params, unet=tree.merge(pipe.params["unet"], added))
  models = SDModels(unet, pipe.text_encoder, pipe.vae)
  objective = Objective(pipe.scheduler_config, pipe.vae_config.scaling_factor)
  seen_maps = {}

  def terms(maps, b):
    seen_maps.update({k: v.shape for k, v in maps.items()})
    return {"map_mass": sum(jnp.mean(jnp.sum(m, -1)) for m in maps.values())}

  def loss_of(scale, attention_terms=None):
    method = Method("probe", latent_conditioning=FixedStreams(scale), attention_terms=attention_terms)
    return jax.jit(lambda p, b: method_loss(method, models, objective, p, {}, b, jax.random.key(0)))(
        params, batch)

  off, m_off = loss_of(0.0)
  on, m_on = loss_of(1.0)
  assert float(m_on["denoising_loss"]) != float(m_off["denoising_loss"])   # the streams arrive
  with_maps, m_maps = loss_of(1.0, terms)
  assert seen_maps == {"mid_block/attentions_0/transformer_blocks_0/attn2": (2, 4, 4, 77)}
  # Probabilities over the 77 tokens: each map sums to 1 per pixel, added once to the loss.
  np.testing.assert_allclose(m_maps["map_mass"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(with_maps, on + m_maps["map_mass"], rtol=1e-6)
  assert m_maps["denoising_loss"] == m_on["denoising_loss"] and m_on["seen"] == 1.0
