"""Low-rank paths beside frozen layers: a small LoRA update survives a bf16 forward (where a
merge into the bf16 kernel loses it), and the path through the UNet and the text encoder equals
the float32 merge."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.methods import lora
from persona_jax.models import low_rank
from persona_jax.models.text_encoder import CLIPTextModel
from persona_jax.models.unet import UNet2DConditionModel


def slope(change, reference):
  """Least-squares slope of an output change against the float32 change (1: kept on average)."""
  return float((change * reference).sum() / (reference * reference).sum())


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_small_update_survives_bf16(kind):
  """A rank-4 update of 1e-4 of |W| (what a few early LoRA steps make): merged into the bf16
  kernel (the old transform), ~98% of the kernel's elements round back to W and the layer's
  output change is ~0 of the float32 change; on the low-rank path the output change is the
  float32 one on average (slope 1), rounded once."""
  rng = np.random.default_rng(0)
  if kind == "dense":
    w, x = rng.normal(0, 0.05, (320, 320)), rng.normal(size=(8, 64, 320))
    layer = nn.Dense(320, dtype=jnp.bfloat16)
  else:
    w, x = rng.normal(0, 0.05, (3, 3, 32, 32)), rng.normal(size=(4, 16, 16, 32))
    layer = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
  w, x = w.astype(np.float32), x.astype(np.float32)
  bias = rng.normal(0, 0.1, w.shape[-1]).astype(np.float32)
  a = rng.normal(0, 0.25, (int(np.prod(w.shape[:-1])), 4)).astype(np.float32)
  b = rng.normal(size=(4, w.shape[-1])).astype(np.float32)
  b *= 1e-4 * np.linalg.norm(w) / np.linalg.norm(a @ b)
  delta = (a @ b).reshape(w.shape)

  def out(params, dtype=jnp.bfloat16):
    with low_rank.low_rank_paths():
      return np.asarray(layer.clone(dtype=dtype).apply({"params": params}, x), np.float32)
  reference = out({"kernel": w + delta, "bias": bias}, jnp.float32) - out({"kernel": w, "bias": bias}, jnp.float32)
  w16 = jnp.asarray(w, jnp.bfloat16)
  merged16 = (w16.astype(jnp.float32) + delta).astype(jnp.bfloat16)
  assert np.mean(np.asarray(merged16 == w16)) > 0.95
  merged = out({"kernel": merged16, "bias": bias}) - out({"kernel": w16, "bias": bias})
  beside = {"kernel": w16, "bias": bias, "lora_a": a, "lora_scale": np.float32(1)}
  path = out({**beside, "lora_b": b}) - out({**beside, "lora_b": 0 * b})
  assert abs(slope(merged, reference)) < 0.2
  assert 0.9 < slope(path, reference) < 1.1


def test_path_through_the_models_equals_the_float32_merge(pipes):
  """LoRA (kohya set, LoCon convs, text encoder) on the sd1 random model: factors beside the
  kernels give the UNet's and the text encoder's outputs of the merged float32 weights."""
  pipe = pipes["sd1"]
  config = lora.LoRAConfig(rank=2, conv_rank=2, text_encoder=True, targets=("kohya",))
  chosen = lora.targets(config, pipe.params, pipe.unet_config)
  rng = np.random.default_rng(1)
  base = {k: pipe.params[k] for k in ("unet", "text_encoder")}
  merged, beside = tree.flatten(base), tree.flatten(base)
  for t in chosen:
    a = rng.normal(0, 0.3, (int(np.prod(t.shape[:-1])), t.rank)).astype(np.float32)
    b = rng.normal(0, 0.3, (t.rank, t.shape[-1])).astype(np.float32)
    merged[t.kernel] = merged[t.kernel] + t.scale * (a @ b).reshape(t.shape)
    low_rank.attach(beside, t.kernel, a, b, t.scale)
  assert {t.kernel.split("/")[0] for t in chosen} == {"unet", "text_encoder"}
  assert any(t.kernel.endswith("conv1/kernel") for t in chosen)
  merged, beside = tree.unflatten(merged), tree.unflatten(beside)
  unet, text = UNet2DConditionModel(pipe.unet_config), CLIPTextModel(pipe.text_encoder_config)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 77)))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 77, pipe.unet_config.cross_attention_dim))
  for model, inputs, component in ((unet, (x, jnp.array([10, 500]), ctx), "unet"),
                                   (text, (ids,), "text_encoder")):
    run = jax.jit(lambda p: jax.tree.leaves(model.apply({"params": p}, *inputs))[0])
    want, got, plain = (np.asarray(run(p[component])) for p in (merged, beside, base))
    assert not np.allclose(want, plain, atol=1e-3)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
