"""The shared training path's hooks for image-conditioned methods: a conditioning may hand the
UNet add-ons' streams and return loss terms as values, and a method's loss terms may read the
cross-attention maps of the same forward (methods/base.py: apply_unet, method_loss)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.data.batch import CONTEXT, LATENT_LOGVAR, LATENT_MEAN
from persona_jax.diffusion.losses import Objective
from persona_jax.methods.base import Method, method_loss
from persona_jax.models.addons import AttentionMaps, DecoupledCrossAttention
from persona_jax.models.components import SDModels
from persona_jax.models.unet import UNet2DConditionModel, init_added_params


@dataclasses.dataclass(frozen=True)
class FixedStreams:
  """A conditioning that passes the batch's context and image tokens at a fixed IP scale."""
  scale: float
  input_keys: tuple = ("ip_tokens",)
  cacheable = False

  def prepare(self, models, params, batch):
    return {"context": batch[CONTEXT], "ip_tokens": batch["ip_tokens"]}

  def at(self, models, params, state, noisy, t, step):
    streams = {"ip_tokens": state["ip_tokens"], "ip_scale": jnp.float32(self.scale)}
    return ({"encoder_hidden_states": state["context"], "streams": streams},
            {"seen": jnp.float32(1.0)})


def test_streams_and_attention_terms_reach_the_loss(pipes):
  pipe = pipes["sd1"]
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  batch = {LATENT_MEAN: latents, LATENT_LOGVAR: np.full_like(latents, -30.0),
           CONTEXT: rng.standard_normal((2, 77, 32)).astype(np.float32),
           "ip_tokens": rng.standard_normal((2, 4, 32)).astype(np.float32)}
  addons = (DecoupledCrossAttention(), AttentionMaps(("MID",)))
  unet = UNet2DConditionModel(dataclasses.replace(pipe.unet_config, addons=addons))
  added = init_added_params(unet, jax.random.key(1), {"ip_tokens": batch["ip_tokens"]})
  params = dict(pipe.params, unet=tree.merge(pipe.params["unet"], added))
  models = SDModels(unet, pipe.text_encoder, pipe.vae)
  objective = Objective(pipe.scheduler_config, pipe.vae_config.scaling_factor)
  seen_maps = {}

  def map_mass(params, trainable, b, aux):
    seen_maps.update({k: v.shape for k, v in aux["maps"].items()})
    return {"map_mass": sum(jnp.mean(jnp.sum(m, -1)) for m in aux["maps"].values())}

  def loss_of(scale, losses=()):
    method = Method("probe", conditioning=FixedStreams(scale), unet=addons, losses=losses)
    return jax.jit(lambda p, b: method_loss(method, models, objective, p, {}, b, jax.random.key(0)))(
        params, batch)

  off, m_off = loss_of(0.0)
  on, m_on = loss_of(1.0)
  assert float(m_on["denoising_loss"]) != float(m_off["denoising_loss"])   # the streams arrive
  with_maps, m_maps = loss_of(1.0, (map_mass,))
  assert seen_maps == {"mid_block/attentions_0/transformer_blocks_0/attn2": (2, 4, 4, 77)}
  # Probabilities over the 77 tokens: each map sums to 1 per pixel, added once to the loss.
  np.testing.assert_allclose(m_maps["map_mass"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(with_maps, on + m_maps["map_mass"], rtol=1e-6)
  # The conditioning's term is returned as a value and added: loss = denoising + seen (+ mass).
  np.testing.assert_allclose(on, m_on["denoising_loss"] + 1.0, rtol=1e-6)
  assert m_maps["denoising_loss"] == m_on["denoising_loss"] and m_on["seen"] == 1.0
