"""Parity of our networks with diffusers/transformers PyTorch on the same random weights.

Both sides float32 on CPU at the highest matmul precision; batch 2, non-square latents,
norm scales and biases randomized. Reached: about 1e-6 relative; asserted: 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.verify import compare, nchw
from tests.torch_reference import require_torch

TOL = 1e-5
PRESETS = ("sd1", "sd2")


@pytest.fixture(scope="module")
def torch_models(model_dirs):
  require_torch()
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel
  out = {}
  for preset, d in model_dirs.items():
    out[preset] = dict(
        unet=UNet2DConditionModel.from_pretrained(d / "unet").eval(),
        vae=AutoencoderKL.from_pretrained(d / "vae").eval(),
        text=CLIPTextModel.from_pretrained(d / "text_encoder").eval())
  return out


@pytest.mark.parametrize("preset,hw", [("sd1", (16, 24)), ("sd2", (16, 24)), ("sd1", (9, 7))])
def test_unet_matches_diffusers(preset, hw, pipes, torch_models):
  """(9, 7) is not divisible by the downsampling factor: diffusers' upsample_size path."""
  import torch
  pipe, ref = pipes[preset], torch_models[preset]["unet"]
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
  t = np.array([3, 917])
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
  with jax.default_matmul_precision("highest"):
    got = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx)
  assert got.shape == (2, *hw, 4)
  assert compare("unet", nchw(got), want).max_rel < TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_text_encoder_matches_transformers_by_ids_and_by_embeddings(preset, pipes, torch_models):
  import torch
  pipe, ref = pipes[preset], torch_models[preset]["text"]
  ids = pipe.tokenizer(["a photo of a dog", "a red ball on a blue background, studio light"],
                       padding="max_length", max_length=77, return_tensors="np").input_ids
  with torch.no_grad():
    want = ref(torch.from_numpy(ids), output_hidden_states=True)
  apply = jax.jit(pipe.text_encoder.apply)
  with jax.default_matmul_precision("highest"):
    got = apply({"params": pipe.params["text_encoder"]}, ids)
  assert compare("last", got.last_hidden_state, want.last_hidden_state.numpy()).max_rel < TOL
  assert compare("pooled", got.pooled, want.pooler_output.numpy()).max_rel < TOL
  assert len(got.hidden_states) == len(want.hidden_states) == 4
  for a, b in zip(got.hidden_states, want.hidden_states):
    assert compare("hidden", a, b.numpy()).max_rel < TOL

  # Driven by embeddings (how methods inject new tokens): perturbed rows at two positions, fed to
  # transformers through a hook on its token embedding.
  table = np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
  embeds = table[ids].copy()
  embeds[:, 2] += np.random.default_rng(0).standard_normal(embeds[:, 2].shape).astype(np.float32)
  hook = ref.embeddings.token_embedding.register_forward_hook(
      lambda mod, inp, out: torch.from_numpy(embeds))
  try:
    with torch.no_grad():
      want_e = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
  finally:
    hook.remove()
  with jax.default_matmul_precision("highest"):
    got_e = apply({"params": pipe.params["text_encoder"]}, ids, embeds)
  assert compare("embeds", got_e.last_hidden_state, want_e).max_rel < TOL
  assert np.abs(np.asarray(got_e.last_hidden_state) - np.asarray(got.last_hidden_state)).max() > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_vae_encode_decode_match_diffusers(preset, pipes, torch_models):
  import torch
  pipe, ref = pipes[preset], torch_models[preset]["vae"]
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  z = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(nchw(images))).latent_dist
    dec = ref.decode(torch.from_numpy(nchw(z))).sample.numpy()
  vae = {"params": pipe.params["vae"]}
  with jax.default_matmul_precision("highest"):
    moments = jax.jit(functools.partial(pipe.vae.apply, method="encode"))(vae, images)
    image = jax.jit(functools.partial(pipe.vae.apply, method="decode"))(vae, z)
  assert moments.mean.shape == (2, 8, 12, 4)
  assert compare("mean", nchw(moments.mean), post.mean.numpy()).max_rel < TOL
  assert compare("logvar", nchw(moments.logvar), post.logvar.numpy()).max_rel < TOL
  assert compare("decode", nchw(image), dec).max_rel < TOL


def test_attention_kernels_agree():
  """The XLA kernel and the einsum reference give the same result (with and without causal mask)."""
  from persona_jax.models.attention import dot_product_attention
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
  for causal in (False, True):
    a = dot_product_attention(q, k, v, kernel="einsum", causal=causal)
    b = dot_product_attention(q, k, v, kernel="xla", causal=causal)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,s", [(64, 64), (77, 77), (96, 77)])
def test_blocked_attention_matches_reference_with_gradients(t, s, monkeypatch):
  """The CPU kernel (query blocks, recomputing backward) against the einsum reference."""
  import persona_jax.models.blocked_attention as blocked
  from persona_jax.models.attention import dot_product_attention
  monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 3 * 4 * 16 * s)     # force several blocks
  assert blocked.block_size(12, t, s) < t or t == 77
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((3, t, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((3, s, 4, 8)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((3, t, 4, 8)), jnp.float32)
  loss = lambda kernel: lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, kernel=kernel) * w)
  np.testing.assert_allclose(dot_product_attention(q, k, v, kernel="blocked"),
                             dot_product_attention(q, k, v, kernel="einsum"), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_group_norm_gradient_matches_autodiff():
  """The hand-written GroupNorm backward against autodiff of a plain implementation."""
  from persona_jax.models.norms import group_norm
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 16)) * 2 + 0.5, jnp.float32)
  scale, bias = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def plain(x, scale, bias):
    h = x.reshape(2, -1, 4, 4)
    m = h.mean(axis=(1, 3), keepdims=True)
    v = jnp.square(h - m).mean(axis=(1, 3), keepdims=True)
    return ((h - m) / jnp.sqrt(v + 1e-5)).reshape(x.shape) * scale[None, None, None] + bias[None, None, None]
  ours = lambda x, s, b: jnp.sum(group_norm(x, s, b, 4, 1e-5) * w)
  ref = lambda x, s, b: jnp.sum(plain(x, s, b) * w)
  np.testing.assert_allclose(group_norm(x, scale, bias, 4, 1e-5), plain(x, scale, bias), atol=1e-5)
  for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias),
                  jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_kernel_choice_is_explicit():
  from persona_jax.models.attention import choose_kernel
  assert choose_kernel("auto", jnp.float32, 64) == "blocked"      # CPU
  assert choose_kernel("einsum", jnp.bfloat16, 160) == "einsum"
  with pytest.raises(ValueError):
    choose_kernel("flash", jnp.float32, 64)
