"""Long self-attention on TPU through JAX's shipped Pallas splash-attention kernel.

`jax.experimental.pallas.ops.tpu.splash_attention` is a flash-attention kernel: it walks the keys
in blocks with an online softmax (running max and sum in float32, logits in float32 whatever the
input dtype), so the [T, S] logits never reach HBM, and its backward (separate dq and dkv kernels)
recomputes each block from the saved log-sum-exp. Off TPU it runs in Pallas interpret mode (slow,
exact), which is how the tests check our wrapper on CPU.

The kernel's blocks are multiples of 128 tokens (TPU lanes) and must divide both lengths; a
shape that does not fit (cross-attention over 77 text tokens, a 200-token sequence) is not its
business: `fits` says so and the caller (models/attention.py) uses XLA instead, as it does for
causal attention (the text encoder's 77 tokens: the kernel's causal mask is left unused).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LANES = 128                      # the kernel's block sizes are multiples of this
BLOCKS = (512, 256, LANES)       # tried largest first: fewer grid steps, the same numerics


def fits(q_len: int, kv_len: int) -> bool:
  """Whether both lengths are multiples of the kernel's smallest block."""
  return q_len % LANES == 0 and kv_len % LANES == 0


def block_size(q_len: int, kv_len: int) -> int:
  """The largest of BLOCKS dividing both lengths (which `fits`)."""
  return next(b for b in BLOCKS if q_len % b == 0 and kv_len % b == 0)


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  """The non-causal kernel for [N, T, H] x [N, S, H] (one example), forward and backward."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b = block_size(q_len, kv_len)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
  # The kernel holds its mask's block tables as arrays: made eagerly, so a kernel cached while
  # one function was traced holds no tracer of it.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, *, scale: float, interpret: bool | None = None):
  """Non-causal attention through the splash kernel (lengths must `fit`).

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H], one dtype.
    scale: the logits' factor (applied to q in float32 before the kernel, which takes none).
    interpret: Pallas interpret mode; default: everywhere but TPU.
  Returns:
    [B, T, N, H] in q.dtype.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  if not fits(t, s):
    raise ValueError(f"splash attention needs lengths that are multiples of {LANES}, got {t} and {s}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  kernel = _kernel(n, t, s, interpret)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)                   # [B, L, N, H] -> [B, N, L, H]
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))           # [B, N, T, H]
  return heads_major(out).astype(q.dtype)
