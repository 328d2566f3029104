"""Query-blocked attention with a recomputing backward (the flash-attention idea, in plain JAX).

XLA's CPU attention materializes the [B, N, T, S] logits and passes over them about six times;
at T = S = 1024 that is 64 MB per pass on a machine with a few GB/s of memory bandwidth, and it
was 80% of a reduced-width SD train step (BENCHMARKS.md). Here the queries are processed in
blocks small enough that a block's logits stay in cache: the forward keeps only the output and
the per-query log-sum-exp, and the backward recomputes each block's probabilities from them.
The arithmetic is the same as the reference (exact exp, float32 softmax statistics), so results
agree with it to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Target size of one block of logits (float32 elements): 4M, 16 MB. Measured at the reduced UNet's
# first level ([4, 1024, 8, 8], forward + backward, quiet 2-core Intel Xeon, 2026-12-06;
# BENCHMARKS.md): 512K 193 ms, 1M 157, 2M 166, 4M 125, 8M 144 (the forward alone: 30-35 ms from
# 1M to 4M). Smaller blocks pay the loop's per-iteration cost, larger ones leave the caches.
# (With other processes on the cores, 1M measured twice as fast as 4M: measure on a quiet machine.)
BLOCK_ELEMENTS = 1 << 22


def block_size(bn: int, t: int, s: int) -> int:
  """The largest divisor of t whose [bn, block, s] logits fit BLOCK_ELEMENTS (at least 1)."""
  want = max(1, BLOCK_ELEMENTS // max(1, bn * s))
  best = 1
  for c in range(1, t + 1):
    if t % c == 0 and c <= want:
      best = c
  return best


def _blocks(x, c):
  """[BN, T, H] -> [T/c, BN, c, H]."""
  bn, t, h = x.shape
  return x.reshape(bn, t // c, c, h).transpose(1, 0, 2, 3)


def _unblocks(x):
  """[T/c, BN, c, H] -> [BN, T, H]."""
  nb, bn, c, h = x.shape
  return x.transpose(1, 0, 2, 3).reshape(bn, nb * c, h)


def _forward(q, k, v, scale, c):
  """q: [BN, T, H]; k, v: [BN, S, H] -> (out [BN, T, H], lse [BN, T] float32)."""
  kf = k.astype(jnp.float32)

  def one(qb):                                                      # qb: [BN, c, H]
    logits = jnp.einsum("bqh,bsh->bqs", qb.astype(jnp.float32), kf) * scale   # [BN, c, S]
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bqs,bsh->bqh", p.astype(v.dtype), v) / denom.astype(v.dtype)
    return out.astype(q.dtype), (m + jnp.log(denom))[..., 0]
  out, lse = jax.lax.map(one, _blocks(q, c))
  return _unblocks(out), lse.transpose(1, 0, 2).reshape(q.shape[0], q.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale, c):
  return _forward(q, k, v, scale, c)[0]


def _attention_fwd(q, k, v, scale, c):
  out, lse = _forward(q, k, v, scale, c)
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, c, res, dout):
  q, k, v, out, lse = res
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # [BN, T]
  bn, t, h = q.shape
  lse_b = lse.reshape(bn, t // c, c).transpose(1, 0, 2)                            # [T/c, BN, c]
  delta_b = delta.reshape(bn, t // c, c).transpose(1, 0, 2)

  def one(carry, xs):
    dk, dv = carry
    qb, dob, lb, db = xs
    qb, dob = qb.astype(jnp.float32), dob.astype(jnp.float32)
    p = jnp.exp(jnp.einsum("bqh,bsh->bqs", qb, kf) * scale - lb[..., None])       # [BN, c, S]
    dv = dv + jnp.einsum("bqs,bqh->bsh", p, dob)
    ds = p * (jnp.einsum("bqh,bsh->bqs", dob, vf) - db[..., None])
    dq = jnp.einsum("bqs,bsh->bqh", ds, kf) * scale
    dk = dk + jnp.einsum("bqs,bqh->bsh", ds, qb) * scale
    return (dk, dv), dq
  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(one, (zeros, zeros),
                              (_blocks(q, c), _blocks(dout, c), lse_b, delta_b))
  return _unblocks(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q, k, v, *, scale: float):
  """Non-causal attention. q: [B, T, N, H]; k, v: [B, S, N, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  s = k.shape[1]
  fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)          # [BN, L, H]
  c = block_size(b * n, t, s)
  out = _attention(fold(q), fold(k), fold(v), scale, c)                            # [BN, T, H]
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)
