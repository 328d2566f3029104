"""Multi-head attention: the `Attention` layer of diffusers and the kernels it runs on.

The kernel is chosen explicitly, never left to a library default (DESIGN.md section 2):
  * `xla`: `jax.nn.dot_product_attention(implementation="xla")`, on CPU and TPU, and on GPU
    where cuDNN does not apply;
  * `cudnn`: on GPU for float16/bfloat16 with a head size cuDNN supports (<= 128 before Hopper,
    <= 256 on Hopper and later);
  * `einsum`: a plain reference written out below, used by the tests.
Logits and softmax are float32 in every kernel.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax.models.attention_maps import ATTENTION_MAPS, head_mean_probs
from persona_jax.models.blocked_attention import blocked_attention
from persona_jax.models.extra_conditioning import per_example
from persona_jax.models.norms import GroupNorm

log = logging.getLogger(__name__)

KERNELS = ("auto", "einsum", "xla", "cudnn", "blocked")


def einsum_attention(q, k, v, *, scale: float, causal: bool = False):
  """Reference attention. q: [B, T, N, H], k/v: [B, S, N, H] -> [B, T, N, H]."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    t, s = logits.shape[-2:]
    mask = jnp.tril(jnp.ones((1, 1, t, s), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)                       # [B, N, T, S]
  return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


@functools.lru_cache(maxsize=None)
def _cudnn_head_limit() -> int:
  try:
    major = int(str(jax.devices()[0].compute_capability).split(".")[0])
  except (AttributeError, ValueError, IndexError):
    return 128
  return 256 if major >= 9 else 128


def choose_kernel(requested: str, dtype, head_dim: int) -> str:
  """Resolves `auto` to a concrete kernel for the default backend, dtype and head size."""
  if requested not in KERNELS:
    raise ValueError(f"unknown attention kernel '{requested}' (choose from {', '.join(KERNELS)})")
  if requested != "auto":
    return requested
  if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim <= _cudnn_head_limit() and head_dim % 8 == 0):
    return "cudnn"
  if jax.default_backend() == "cpu":
    return "blocked"
  return "xla"


def dot_product_attention(q, k, v, *, kernel: str = "auto", causal: bool = False):
  """Scaled dot-product attention with an explicitly chosen kernel.

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H].
    kernel: one of KERNELS.
    causal: mask position t from attending to s > t.
  Returns:
    [B, T, N, H] in q.dtype.
  """
  scale = q.shape[-1] ** -0.5
  kernel = choose_kernel(kernel, q.dtype, q.shape[-1])
  if kernel == "einsum":
    return einsum_attention(q, k, v, scale=scale, causal=causal)
  if kernel == "blocked":
    if not causal:
      return blocked_attention(q, k, v, scale=scale)
    kernel = "xla"        # causal attention is the text encoder's 77 tokens: small

  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=kernel)


def detach_prefix(x, n: int):
  """x [B, S, ...] with rows :n cut from the gradient (values unchanged)."""
  return jnp.concatenate([jax.lax.stop_gradient(x[:, :n]), x[:, n:]], axis=1)


class Attention(nn.Module):
  """diffusers `Attention`: to_q/to_k/to_v (+ optional bias), to_out_0, optional GroupNorm input.

  Self-attention when `context` is None, cross-attention otherwise. With `norm_num_groups` set
  (the VAE's mid-block attention), the input is [B, H, W, C], group-normalized first and added
  back at the end (`residual_connection`).

  Two default-off hooks of the UNet's attn2 (models/extra_conditioning.py):
    * `ip_context` (IP-Adapter's decoupled cross-attention, diffusers' IPAdapterAttnProcessor2_0):
      `Attn(Q, K, V) + ip_scale * Attn(Q, K_ip, V_ip)` before the shared to_out_0, with new
      `to_k_ip`/`to_v_ip` (no bias) on the image tokens, created in this layer's subtree
      (`.../attn2/to_k_ip/kernel` [D, inner] is `ip_adapter.{id}.to_k_ip.weight` transposed);
    * `attention_maps`: sow the head-averaged softmax over the context into the ATTENTION_MAPS
      collection (models/attention_maps.py), only when that collection is mutable.
  """
  heads: int
  dim_head: int
  qkv_bias: bool = False
  upcast_attention: bool = False
  norm_num_groups: int | None = None
  norm_eps: float = 1e-5
  residual_connection: bool = False
  detach_context_tokens: int = 0     # cross-attention: K/V of the first N context tokens get no gradient
  kernel: str = "auto"
  attention_maps: bool = False       # sow [B, T, S] probabilities when ATTENTION_MAPS is mutable
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, ip_context=None, ip_scale=None):
    """x: [B, T, C] (or [B, H, W, C] with a group norm); context: [B, S, D] or None;
    ip_context: [B, N, D] image tokens or None; ip_scale: scalar or [B] (None: 1)."""
    residual, in_shape = x, x.shape
    if self.norm_num_groups is not None:
      x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype,
                    name="group_norm")(x)
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, -1, c)                                          # [B, T, C]
    cross = context is not None
    context = context if cross else x
    inner = self.heads * self.dim_head
    dense = functools.partial(nn.Dense, inner, use_bias=self.qkv_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    q = dense(name="to_q")(x).reshape(b, -1, self.heads, self.dim_head)          # [B, T, N, Dh]
    k = dense(name="to_k")(context).reshape(b, -1, self.heads, self.dim_head)    # [B, S, N, Dh]
    v = dense(name="to_v")(context).reshape(b, -1, self.heads, self.dim_head)    # [B, S, N, Dh]
    if self.detach_context_tokens and cross:
      k, v = (detach_prefix(a, self.detach_context_tokens) for a in (k, v))
    if self.upcast_attention:
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if self.attention_maps and self.is_mutable_collection(ATTENTION_MAPS):
      self.sow(ATTENTION_MAPS, "probs", head_mean_probs(q, k, scale=self.dim_head ** -0.5),
               init_fn=lambda: None, reduce_fn=lambda _, new: new)
    h = dot_product_attention(q, k, v, kernel=self.kernel).astype(self.dtype)    # [B, T, N, Dh]
    if ip_context is not None:
      ip_dense = functools.partial(nn.Dense, inner, use_bias=False, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
      k_ip = ip_dense(name="to_k_ip")(ip_context).reshape(b, -1, self.heads, self.dim_head)
      v_ip = ip_dense(name="to_v_ip")(ip_context).reshape(b, -1, self.heads, self.dim_head)
      if self.upcast_attention:
        k_ip, v_ip = k_ip.astype(jnp.float32), v_ip.astype(jnp.float32)
      h_ip = dot_product_attention(q, k_ip, v_ip, kernel=self.kernel).astype(self.dtype)
      h = h + per_example(ip_scale, b, 4, self.dtype) * h_ip                     # [B, T, N, Dh]
    h = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="to_out_0")(h.reshape(b, -1, inner))            # [B, T, C]
    h = h.reshape(in_shape)
    return h + residual if self.residual_connection else h
