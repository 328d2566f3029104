"""Multi-head attention: the `Attention` layer of diffusers and the kernels it runs on.

The kernel is chosen explicitly, never left to a library default (DESIGN.md section 2);
`choose_kernel` resolves `auto` by backend, dtype, head size and lengths:
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` on a CUDA GPU of compute
    capability >= 8.0 (cuDNN's fused flash attention starts at Ampere) for float16/bfloat16 with
    a head size that is a multiple of 8 and <= 128 (<= 256 from Hopper, 9.0): the conditions of
    jax 0.10's `jax/_src/cudnn/fused_attention_stablehlo.py` (check_layout,
    check_is_flash_attention). Without a bias or padding mask it asks nothing of the lengths,
    so cross-attention over 77 text tokens qualifies, and causal masking is cuDNN's own;
  * `splash`: on a single TPU chip, JAX's Pallas splash (flash) kernel
    (models/splash_attention.py) for long non-causal attention: both lengths >=
    SPLASH_MIN_TOKENS and multiples of 128. Not on a multi-device mesh: XLA's partitioner cannot
    split a Pallas call, so a batch-sharded step would gather q/k/v onto every device (the
    kernel needs a shard_map over the batch axis there, not written yet);
  * `blocked`: on CPU, query blocks with a recomputing backward (models/blocked_attention.py);
  * `xla`: `jax.nn.dot_product_attention(implementation="xla")` everywhere else;
  * `einsum`: a plain reference written out below, used by the tests.
An explicit `blocked` or `splash` runs where it applies (non-causal; lengths that fit) and XLA
elsewhere, so one setting serves a whole model. Logits and softmax are float32 in every kernel.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax.models import splash_attention as splash
from persona_jax.models.attention_maps import ATTENTION_MAPS, head_mean_probs
from persona_jax.models.blocked_attention import blocked_attention
from persona_jax.models.norms import GroupNorm

log = logging.getLogger(__name__)

KERNELS = ("auto", "einsum", "xla", "cudnn", "blocked", "splash")

# `auto` on TPU takes the splash kernel from this many tokens on both sides: where XLA's
# attention holds the [B, N, T, S] logits and probabilities in HBM for the backward. libtpu's
# plan for one v5e chip (forward + backward, bf16, batch 2, 8 heads; `jax_cases.plan_target`)
# of XLA's attention: no temporaries at 1024 tokens (its fusions keep them on chip), 384 MB at
# 2048, 1536 MB at 4096 (SD's 64x64 latents) against the kernel's 33 MB. Below the threshold
# memory gives no reason, and the kernel's speed against XLA's is not measured yet (no TPU was
# lent): SD 1.5 at 512 px and SDXL at 1024 px take the kernel at their 4096-token level only.
SPLASH_MIN_TOKENS = 2048

CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


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
def _cuda_capability() -> tuple[int, int] | None:
  """(major, minor) compute capability of the first device on a CUDA GPU, else None."""
  device = jax.devices()[0]
  try:
    major, minor = (int(x) for x in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):                    # not CUDA (ROCm reports gfx names)
    return None
  return major, minor


def cudnn_supports(dtype, head_dim: int) -> bool:
  """cuDNN's fused attention on this GPU for q/k/v of `dtype` and head size `head_dim`."""
  capability = _cuda_capability()
  if capability is None or capability < (8, 0) or jnp.dtype(dtype) not in CUDNN_DTYPES:
    return False
  return head_dim % 8 == 0 and head_dim <= (256 if capability >= (9, 0) else 128)


def choose_kernel(requested: str, dtype, head_dim: int, *, q_len: int = 0, kv_len: int = 0) -> str:
  """Resolves `auto` to a concrete kernel for the default backend, the dtype of q/k/v, the head
  size and the query and key lengths (0: unknown, never long)."""
  if requested not in KERNELS:
    raise ValueError(f"unknown attention kernel '{requested}' (choose from {', '.join(KERNELS)})")
  if requested != "auto":
    return requested
  backend = jax.default_backend()
  if backend == "gpu" and cudnn_supports(dtype, head_dim):
    return "cudnn"
  if (backend == "tpu" and jax.device_count() == 1 and min(q_len, kv_len) >= SPLASH_MIN_TOKENS
      and splash.fits(q_len, kv_len)):
    return "splash"
  if backend == "cpu":
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
  kernel = choose_kernel(kernel, q.dtype, q.shape[-1], q_len=q.shape[1], kv_len=k.shape[1])
  if kernel == "einsum":
    return einsum_attention(q, k, v, scale=scale, causal=causal)
  if kernel == "blocked":
    if not causal:
      return blocked_attention(q, k, v, scale=scale)
    kernel = "xla"        # causal attention is the text encoder's 77 tokens: small
  if kernel == "splash":
    if not causal and splash.fits(q.shape[1], k.shape[1]):
      return splash.splash_attention(q, k, v, scale=scale)
    kernel = "xla"        # cross-attention over text tokens, the text encoder's causal 77

  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=kernel)


def detach_prefix(x, n: int):
  """x [B, S, ...] with rows :n cut from the gradient (values unchanged)."""
  return jnp.concatenate([jax.lax.stop_gradient(x[:, :n]), x[:, n:]], axis=1)


class Attention(nn.Module):
  """diffusers `Attention`: to_q/to_k/to_v (+ optional bias), to_out_0, optional GroupNorm input.

  Self-attention when `context` is None, cross-attention otherwise. With `norm_num_groups` set
  (the VAE's mid-block attention), the input is [B, H, W, C], group-normalized first and added
  back at the end (`residual_connection`).

  Options the UNet's add-ons set on attn2 (models/addons.py), all off by default:
    * `detach_context_tokens`: keys and values of the first N context tokens carry no gradient;
    * `attention_maps`: sow the head-averaged softmax over the context into the ATTENTION_MAPS
      collection (models/attention_maps.py), only when that collection is mutable;
    * `branches` (a call argument): added attentions that share this layer's queries and output
      projection, each `branch(q) -> [B, T, N, Dh]` added before to_out_0 and run in this
      layer's scope, so its params are this layer's children (models/adapters.py).
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
  def __call__(self, x, context=None, branches=()):
    """x: [B, T, C] (or [B, H, W, C] with a group norm); context: [B, S, D] or None;
    branches: callables (q [B, T, N, Dh]) -> [B, T, N, Dh] (see above)."""
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
    for branch in branches:
      h = h + branch(q)                                                          # [B, T, N, Dh]
    h = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="to_out_0")(h.reshape(b, -1, inner))            # [B, T, C]
    h = h.reshape(in_shape)
    return h + residual if self.residual_connection else h
