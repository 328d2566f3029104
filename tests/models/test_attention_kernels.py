"""Attention kernels: the `auto` rule on each backend (faked on CPU), and the TPU splash kernel's
numerics in Pallas interpret mode against the einsum reference, forward and gradients."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.models import attention
from persona_jax.models.attention import choose_kernel, dot_product_attention, einsum_attention


@pytest.fixture
def backend(monkeypatch):
  """fake(name, capability): `jax.default_backend()` returns name; a GPU's compute capability
  is `capability` ((major, minor), or None for a GPU that is not CUDA)."""
  def fake(name, capability=None):
    monkeypatch.setattr(jax, "default_backend", lambda: name)
    monkeypatch.setattr(attention, "_cuda_capability", lambda: capability)
  return fake


@pytest.mark.parametrize("capability,dtype,head_dim,want", [
    ((8, 0), jnp.bfloat16, 40, "cudnn"),      # SD 1.5's first level (320 / 8 heads)
    ((8, 6), jnp.float16, 64, "cudnn"),
    ((8, 0), jnp.bfloat16, 128, "cudnn"),
    ((8, 0), jnp.bfloat16, 160, "xla"),       # SD 1.5's last level: > 128 before Hopper
    ((9, 0), jnp.bfloat16, 160, "cudnn"),
    ((9, 0), jnp.float16, 256, "cudnn"),
    ((9, 0), jnp.bfloat16, 264, "xla"),       # > 256
    ((8, 0), jnp.bfloat16, 36, "xla"),        # not a multiple of 8
    ((8, 0), jnp.float32, 64, "xla"),         # cuDNN's fused attention is fp16/bf16 only
    ((7, 5), jnp.float16, 64, "xla"),         # before Ampere
    (None, jnp.bfloat16, 64, "xla"),          # a GPU without CUDA (ROCm)
])
def test_gpu_takes_cudnn_where_it_applies(backend, capability, dtype, head_dim, want):
  backend("gpu", capability)
  assert choose_kernel("auto", dtype, head_dim, q_len=4096, kv_len=4096) == want
  # cross-attention over 77 text tokens: cuDNN asks nothing of the lengths without a bias
  assert choose_kernel("auto", dtype, head_dim, q_len=4096, kv_len=77) == want


@pytest.mark.parametrize("q_len,kv_len,want", [
    (4096, 4096, "splash"), (2304, 2304, "splash"),     # SD at 512 px, 768 px (48x48)
    (1024, 1024, "xla"),                      # short: below SPLASH_MIN_TOKENS
    (4096, 77, "xla"),                        # cross-attention
    (4100, 4100, "xla"),                      # long but not a multiple of 128
    (0, 0, "xla"),                            # lengths unknown
])
def test_tpu_takes_splash_for_long_attention(backend, monkeypatch, q_len, kv_len, want):
  backend("tpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert choose_kernel("auto", jnp.bfloat16, 64, q_len=q_len, kv_len=kv_len) == want
  monkeypatch.setattr(jax, "device_count", lambda: 4)     # a mesh: a Pallas call is not split
  assert choose_kernel("auto", jnp.bfloat16, 64, q_len=q_len, kv_len=kv_len) == "xla"


def test_cpu_and_explicit_choices(backend):
  backend("cpu")
  assert choose_kernel("auto", jnp.float32, 40, q_len=4096, kv_len=4096) == "blocked"
  backend("gpu", (9, 0))
  for kernel in ("einsum", "xla", "cudnn", "blocked", "splash"):
    assert choose_kernel(kernel, jnp.float32, 160) == kernel
  with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
    choose_kernel("flash", jnp.bfloat16, 64)


def test_compute_capability_is_read_from_the_device(monkeypatch):
  read = attention._cuda_capability.__wrapped__
  for reported, want in (("8.6", (8, 6)), ("9.0", (9, 0)), ("gfx90a", None)):
    monkeypatch.setattr(jax, "devices", lambda r=reported: [types.SimpleNamespace(compute_capability=r)])
    assert read() == want
  monkeypatch.setattr(jax, "devices", lambda: [object()])       # CPU and TPU devices have none
  assert read() is None


def _inputs(dtype, t, s, b, n, h=16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, s, n, h)), dtype) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)          # cotangent of the output
  return q, k, v, w


def _splash_and_reference(q, k, v, w):
  """(output, (dq, dk, dv) for cotangent w) of the splash kernel, and of the reference on the
  same values in float32."""
  def one(f, *args):
    out, vjp = jax.vjp(f, *args[:3])
    return out, vjp(args[3])
  f32 = [a.astype(jnp.float32) for a in (q, k, v, w)]
  return (one(lambda q, k, v: dot_product_attention(q, k, v, kernel="splash"), q, k, v, w),
          one(lambda q, k, v: einsum_attention(q, k, v, scale=q.shape[-1] ** -0.5), *f32))


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("dtype,batch,heads,tol", [(jnp.float32, 1, 2, 2e-6),
                                                   (jnp.bfloat16, 2, 1, 1e-2)])
def test_splash_matches_reference_with_gradients(dtype, batch, heads, tol, monkeypatch):
  """256 tokens, blocks of 128: the online softmax across key blocks and the backward's sums
  across query blocks (Pallas interpret mode on CPU), against the float32 reference. float32
  agrees to rounding (4e-7 measured); bf16 output and gradients to bf16's precision (3e-3:
  closer than the reference computed in bf16, 4e-3)."""
  calls = []
  kernel = attention.splash.splash_attention
  monkeypatch.setattr(attention.splash, "splash_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  q, k, v, w = _inputs(dtype, 256, 256, batch, heads)
  (out, grads), (ref, ref_grads) = jax.jit(_splash_and_reference)(q, k, v, w)
  assert calls                                               # the kernel ran, not a fallback
  assert out.dtype == dtype and out.shape == q.shape
  assert _rel(out, ref) < tol
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.dtype == dtype and _rel(g, r) < tol, name


def test_splash_falls_back_to_xla_off_its_blocks():
  """Lengths that are not multiples of 128 (a 200-token sequence, cross-attention over 77
  tokens) and causal attention run through XLA instead, with the reference's results."""
  @functools.partial(jax.jit, static_argnums=3)
  def splash_and_reference(q, k, v, causal):
    return (dot_product_attention(q, k, v, kernel="splash", causal=causal),
            einsum_attention(q, k, v, scale=16 ** -0.5, causal=causal))
  for t, s, causal in ((200, 200, False), (256, 77, False), (128, 128, True)):
    q, k, v, _ = _inputs(jnp.float32, t, s, 2, 2)
    assert "pallas_call" not in str(jax.make_jaxpr(splash_and_reference, static_argnums=3)(q, k, v, causal))
    assert _rel(*splash_and_reference(q, k, v, causal)) < 1e-5
  with pytest.raises(ValueError, match="multiples of 128"):
    attention.splash.splash_attention(q[:, :100], k, v, scale=0.25)
