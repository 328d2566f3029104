"""The sampler with the UNet add-ons' streams: scales and the delay step are traced (no
recompilation), delayed subject conditioning switches at its step, streams at scale 0 are the
base model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.diffusion.conditioning import TextConditioning, delayed
from persona_jax.diffusion.sampling import generate
from persona_jax.models.addons import DecoupledCrossAttention, GatedAdapter
from persona_jax.models.components import SDModels
from persona_jax.models.unet import UNet2DConditionModel, init_added_params
from persona_jax.tokenizer import tokenize
from persona_jax.verify import compare

STEPS = 4


def test_delayed_conditioning_switches_at_the_start_step():
  cond = {"encoder_hidden_states": jnp.ones((2, 3, 4)),
          "streams": {"ip_tokens": jnp.ones((2, 1, 4)), "ip_scale": jnp.full((2,), 0.7)}}
  before = jax.tree.map(jnp.zeros_like, cond)
  at = jax.jit(lambda step, start: delayed(step, start, before, cond))
  for start in (0, 2, STEPS):
    for step in range(STEPS):
      want = cond if step >= start else before
      assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, at(step, start), want)))
  # Per image: image 0 switches at step 1, image 1 at step 3.
  c = at(2, jnp.array([1, 3]))
  np.testing.assert_array_equal(c["encoder_hidden_states"][:, 0, 0], [1.0, 0.0])
  np.testing.assert_array_equal(c["streams"]["ip_scale"], np.float32([0.7, 0.0]))


@dataclasses.dataclass(frozen=True)
class Streams:
  """The text plus both add-ons' streams from the inputs (scales, start: traced), the
  unconditional half at scale 0; the conditional half has them from step `start` on."""
  input_keys = ("ip_tokens", "adapter_tokens", "ip_scale", "adapter_scale", "start")
  cacheable = False

  def prepare(self, models, params, inputs):
    text = TextConditioning().prepare(models, params, inputs)
    b = inputs["ids"].shape[0]
    scale = lambda k: jnp.broadcast_to(jnp.asarray(inputs[k], jnp.float32), (b,))
    streams = {"ip_tokens": inputs["ip_tokens"], "ip_scale": scale("ip_scale"),
               "adapter_tokens": inputs["adapter_tokens"], "adapter_scale": scale("adapter_scale")}
    off = {**streams, "ip_scale": jnp.zeros((b,)), "adapter_scale": jnp.zeros((b,))}
    return {**text, "streams": streams, "off": off, "start": inputs["start"]}

  def at(self, models, params, state, noisy, t, step):
    kwargs = lambda s: {"encoder_hidden_states": state["context"], "streams": state[s]}
    return delayed(step, state["start"], kwargs("off"), kwargs("streams")), {}

  def negative(self, models, params, state):
    return {"encoder_hidden_states": state["negative"], "streams": state["off"]}


@pytest.fixture(scope="module")
def streams_setup(pipes):
  """sd1 with both add-ons (gamma 0.5, so the adapter acts), and its sampling inputs."""
  pipe = pipes["sd1"]
  rng = np.random.default_rng(0)
  tokens = dict(ip_tokens=rng.standard_normal((1, 4, 32)).astype(np.float32),
                adapter_tokens=rng.standard_normal((1, 5, 24)).astype(np.float32))
  unet = UNet2DConditionModel(dataclasses.replace(
      pipe.unet_config, addons=(DecoupledCrossAttention(), GatedAdapter())))
  added = init_added_params(unet, jax.random.key(2), tokens)
  added = tree.map_with_path(lambda p, v: jnp.full_like(v, 0.5) if p.endswith("gamma") else v, added)
  params = {**pipe.params, "unet": tree.merge(pipe.params["unet"], added)}
  models = SDModels(unet, pipe.text_encoder, pipe.vae)
  text = {"ids": tokenize(pipe.tokenizer, ["a dog"]), "negative_ids": tokenize(pipe.tokenizer, [""])}
  return dict(pipe=pipe, params=params, models=models, text=text, tokens=tokens)


def sample(s, inputs, conditioning=Streams(), models=None, params=None):
  return generate(params or s["params"], inputs, 0, np.arange(1), 7.5, 0.0, 0.0,
                  models=models or s["models"], scheduler=s["pipe"].scheduler_config,
                  num_steps=STEPS, latent_shape=(16, 16, 4), conditioning=conditioning,
                  decode=False)


def test_scales_and_delay_are_traced_and_switch_the_conditioning(streams_setup):
  s = streams_setup
  inputs = lambda ip, beta, start: {**s["text"], **s["tokens"], "ip_scale": np.float32(ip),
                                    "adapter_scale": np.float32(beta), "start": np.int32(start)}
  first = sample(s, inputs(0.7, 1.0, 0))
  n = generate._cache_size()
  late = sample(s, inputs(0.7, 1.0, 2))
  off = sample(s, inputs(0.0, 0.0, 1))
  never = sample(s, inputs(0.5, 0.3, STEPS))
  jax.block_until_ready((first, late, off, never))
  assert generate._cache_size() == n, "changing a stream scale or the delay step recompiled"

  # Streams off (scale 0, or delayed past the last step) = the base UNet with text alone.
  base = sample(s, s["text"], TextConditioning(),
                models=SDModels(s["pipe"].unet, s["pipe"].text_encoder, s["pipe"].vae),
                params=s["pipe"].params)
  assert jnp.array_equal(off, base) and jnp.array_equal(never, base)
  # Streams from step 0 or from step 2: both differ from the base and from each other.
  assert compare("on", first, base).max_rel > 1e-3
  assert compare("late", late, first).max_rel > 1e-3 and compare("late", late, base).max_rel > 1e-3
