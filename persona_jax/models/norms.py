"""Normalization layers written for speed and for parity with PyTorch.

flax's `nn.GroupNorm` is several times slower than torch's on CPU (reference/cpu_perf_notes.md);
`group_norm` here reduces in an order XLA's CPU backend does well and has a hand-written backward
(two group reductions instead of autodiff's chain), about 3x faster forward and backward at the
SD UNet's shapes (BENCHMARKS.md). `LayerNorm` uses the two-pass variance torch uses.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _group_stats(h, num_groups: int, epsilon: float):
  """Two-pass group statistics of h: [B, S, C] float32 -> (mean, rstd), each [B, 1, C].

  Reduces over the spatial axis first (contiguous in channels-last) and then within each group
  of C / G channels: on XLA's CPU backend this is several times faster than one reduction over
  a [B, S, G, C/G] view.
  """
  b, _, c = h.shape
  cg = c // num_groups
  per_group = lambda t: jnp.repeat(t.reshape(b, num_groups, cg).mean(-1), cg, axis=1)[:, None, :]
  mean = per_group(h.mean(axis=1))
  var = per_group(jnp.square(h - mean).mean(axis=1))
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, num_groups: int, epsilon: float):
  """Group normalization over the last (channel) axis of a channels-last array.

  Args:
    x: [B, ..., C]; groups are contiguous channel ranges, as in torch.
    scale, bias: [C].
  Returns:
    [B, ..., C] in x.dtype. Statistics and arithmetic are float32.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  b, c = x.shape[0], x.shape[-1]
  h = x.reshape(b, -1, c).astype(jnp.float32)                       # [B, S, C]
  mean, rstd = _group_stats(h, num_groups, epsilon)
  y = (h - mean) * rstd
  out = y * scale.astype(jnp.float32).reshape(1, 1, c) + bias.astype(jnp.float32).reshape(1, 1, c)
  return out.reshape(x.shape).astype(x.dtype), (x, scale, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, res, dout):
  """dx = rstd * (g - mean_G(g) - y * mean_G(g * y)) with g = dout * scale (means over groups)."""
  x, scale, mean, rstd = res
  b, c = x.shape[0], x.shape[-1]
  cg = c // num_groups
  per_group = lambda t: jnp.repeat(t.reshape(b, num_groups, cg).mean(-1), cg, axis=1)[:, None, :]
  y = (x.reshape(b, -1, c).astype(jnp.float32) - mean) * rstd        # [B, S, C]
  do = dout.reshape(b, -1, c).astype(jnp.float32)
  g = do * scale.astype(jnp.float32).reshape(1, 1, c)
  dx = rstd * (g - per_group(g.mean(axis=1)) - y * per_group((g * y).mean(axis=1)))
  dscale = jnp.sum(do * y, axis=(0, 1)).astype(scale.dtype)
  dbias = jnp.sum(do, axis=(0, 1)).astype(scale.dtype)
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


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
