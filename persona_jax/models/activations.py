"""Activation functions by the names diffusers and transformers configs use."""

import jax
import jax.numpy as jnp


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact (erf) GELU, as torch.nn.functional.gelu."""
  return jax.nn.gelu(x, approximate=False)


def mish(x):
  return x * jnp.tanh(jax.nn.softplus(x))


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": mish,
    "gelu": gelu,
    "relu": jax.nn.relu,
    "quick_gelu": quick_gelu,
}


def get_activation(name: str):
  """The activation called `name` in a diffusers/transformers config."""
  return _ACTIVATIONS[name]
