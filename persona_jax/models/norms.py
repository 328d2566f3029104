"""Normalization layers written for speed and for parity with PyTorch.

flax's `nn.GroupNorm` is several times slower than torch's on CPU (reference/cpu_perf_notes.md);
this one takes float32 statistics over a [B, S, G, C/G] view in one pass and lets XLA fuse the
affine and any following activation. `LayerNorm` uses the two-pass variance torch uses.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def group_norm(x, scale, bias, num_groups: int, epsilon: float):
  """Group normalization over the last (channel) axis of a channels-last array.

  Args:
    x: [B, ..., C]; groups are contiguous channel ranges, as in torch.
    scale, bias: [C].
  Returns:
    [B, ..., C] in x.dtype.
  """
  b, c = x.shape[0], x.shape[-1]
  h = x.reshape(b, -1, num_groups, c // num_groups).astype(jnp.float32)   # [B, S, G, C/G]
  mean = h.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(h - mean).mean(axis=(1, 3), keepdims=True)
  h = (h - mean) * jnp.reciprocal(jnp.sqrt(var + epsilon))
  affine_shape = (1,) * (x.ndim - 1) + (c,)
  h = (h.reshape(x.shape) * scale.astype(jnp.float32).reshape(affine_shape)
       + bias.astype(jnp.float32).reshape(affine_shape))
  return h.astype(x.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-last inputs; params `scale` and `bias` ([C])."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon)


def LayerNorm(epsilon: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
  """torch.nn.LayerNorm over the last axis: float32 statistics, two-pass variance."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)
