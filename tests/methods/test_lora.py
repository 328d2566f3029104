"""LoRA / LoCon on the training core: the method test bar, block ranks, merge transform."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import ConfigError, tree
from persona_jax.train import loop
from tests.runs import fixed_batch_trajectory, lora_config, one_device_mesh

ATTENTION_TARGETS = {"attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out_0", "attn2/to_q",
                     "attn2/to_k", "attn2/to_v", "attn2/to_out_0"}
KOHYA_TARGETS = ATTENTION_TARGETS | {"ff/net_0/proj", "ff/net_2", "proj_in", "proj_out"}
VARIANTS = {
    "attention": {},
    "locon+text+blocks": dict(method=dict(name="lora", rank=2, conv_rank=2, text_encoder=True,
                                          targets=("kohya",), block_ranks={"IN01": 0, "OUT03": 3},
                                          block_alphas={"MID": 1.0})),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, model_dirs):
  return loop.build(lora_config(model_dirs["sd1"], **VARIANTS[request.param]), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run)


def factor_keys(run):
  return sorted({p.rsplit("/", 1)[0] for p in tree.paths(run.trainable)})


def test_trainable_set_is_literal(run):
  keys = factor_keys(run)
  assert all(p.startswith("lora/") for p in tree.paths(run.trainable))
  assert {p.rsplit("/", 1)[1] for p in tree.paths(run.trainable)} == {"a", "b"}
  attention = [k for k in keys if "/transformer_blocks_0/" in k or k.endswith(("proj_in", "proj_out"))]
  suffixes = {k.split("/transformer_blocks_0/")[-1] if "/transformer_blocks_0/" in k
              else k.rsplit("/", 1)[1] for k in attention}
  if run.config.method_options.get("conv_rank"):
    assert suffixes == KOHYA_TARGETS
    # IN01 (down_blocks_0 layer 0) is skipped; 6 transformers minus IN01's = 5 x 12 attention
    # targets; convs: 12 resnets x (conv1, conv2) + 7 shortcuts + 2 samplers - IN01's 2 = 31.
    assert not [k for k in keys if "down_blocks_0/attentions_0/" in k or "down_blocks_0/resnets_0/" in k]
    assert len(attention) == 5 * 12
    convs = [k for k in keys if "/resnets_" in k or "samplers_0" in k]
    assert len(convs) == 31
    assert len([k for k in keys if k.startswith("lora/text_encoder/")]) == 3 * 6   # 3 layers
    assert run.trainable["lora"]["unet"]["up_blocks_1"]["attentions_0"]["proj_in"]["a"].shape[1] == 3
    conv = run.trainable["lora"]["unet"]["down_blocks_0"]["resnets_1"]["conv1"]["a"]
    assert conv.shape == (3 * 3 * 32, 2)
    assert set(run.frozen) == {"unet", "text_encoder"}
  else:
    assert suffixes == ATTENTION_TARGETS
    assert len(keys) == 6 * 8                    # 6 transformers in the sd1 random model
    assert set(run.frozen) == {"unet"}          # text contexts and VAE moments are cached


def test_step_zero_reproduces_the_base(run):
  params = run.method.params.apply(run.frozen, run.trainable)
  for name in run.frozen:
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(run.frozen[name])):
      assert np.array_equal(np.asarray(a), np.asarray(b))


def test_merge_is_w_plus_scaled_product(run):
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), run.trainable)
  params = tree.flatten(run.method.params.apply(run.frozen, trained))
  f, w0 = tree.flatten(trained), tree.flatten(run.frozen)
  blocks = bool(run.config.method_options.get("block_alphas"))
  # alpha defaults to the rank (scale 1); the block variant sets MID's alpha to 1 at rank 2.
  for key, scale in (("up_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k", 1.0),
                     ("mid_block/attentions_0/transformer_blocks_0/attn2/to_k", 0.5 if blocks else 1.0)):
    a, b = f[f"lora/unet/{key}/a"], f[f"lora/unet/{key}/b"]
    np.testing.assert_allclose(params[f"unet/{key}/kernel"], w0[f"unet/{key}/kernel"] + scale * (a @ b),
                               rtol=1e-5, atol=1e-5)


def test_learning_rate_zero_moves_nothing(run, trajectory):
  for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_every_factor_gets_a_gradient_and_the_loss_falls(run, trajectory):
  # Weight decay is 0, so a factor moves iff it got a non-zero gradient. (`a` gets none while
  # `b` is still 0: it moves from the second lr > 0 step on.)
  init = tree.flatten(run.trainable)
  still = [p for p, v in tree.flatten(trajectory["trained"]).items() if np.array_equal(v, init[p])]
  assert not still, f"{len(still)} factors never got a gradient, e.g. {still[:3]}"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


@pytest.mark.parametrize("targets", [(), ("kohya",)])
def test_target_sets_are_the_official_recipes(model_dirs, pipes, targets):
  """The default targets are the PEFT target_modules of diffusers' train_dreambooth_lora.py
  (suffix match on to_k/to_q/to_v/to_out.0); the "kohya" set is kohya's networks/lora.py
  selection (every Linear and 1x1 Conv2d inside a Transformer2DModel). Both are applied to the
  torch UNet of the same random model and compared by module name."""
  import torch
  from diffusers import UNet2DConditionModel

  from persona_jax.convert.lora_formats import module_names
  from persona_jax.methods import lora
  unet = UNet2DConditionModel.from_pretrained(model_dirs["sd1"] / "unet")
  if not targets:
    official = {name for name, _ in unet.named_modules()
                if name.split(".")[-1] in ("to_k", "to_q", "to_v") or name.endswith("to_out.0")}
  else:
    official = {f"{tname}.{cname}" for tname, t in unet.named_modules()
                if type(t).__name__ == "Transformer2DModel" for cname, c in t.named_modules()
                if isinstance(c, torch.nn.Linear)
                or (isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1))}
  params = pipes["sd1"].params
  config = lora.LoRAConfig(**({"targets": targets} if targets else {}))
  names = module_names(params)
  ours = {names[t.kernel][len("unet."):] for t in lora.targets(config, params, pipes["sd1"].unet_config)}
  assert ours == official and len(ours) == 6 * (8 if not targets else 12)
  if targets:                        # the lora:kohya config: this set plus LoCon convs
    from persona_jax.train.config import load_config
    method = load_config("lora:kohya").method
    assert tuple(method.targets) == ("kohya",) and method.conv_rank == 4


def test_unknown_block_is_an_error(model_dirs):
  with pytest.raises(ConfigError, match="method.block_ranks: block 'OUT12' does not exist"):
    loop.build(lora_config(model_dirs["sd1"], method=dict(name="lora", block_ranks={"OUT12": 4})),
               mesh=one_device_mesh())


def test_result_file_holds_the_factors(run, trajectory, tmp_path):
  from safetensors import safe_open
  trained = tree.flatten(trajectory["trained"])
  assert loop.write_outputs(run, trajectory["trained"], tmp_path) == [str(tmp_path / "lora.safetensors")]
  with safe_open(tmp_path / "lora.safetensors", "np") as f:
    assert f.metadata()["format"] == "persona_jax-lora"
    factors = [p[len("lora/"):] for p in trained]
    alphas = [p[:-len("/a")] + "/alpha" for p in factors if p.endswith("/a")]
    assert sorted(f.keys()) == sorted(factors + alphas)
    key = "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_v/b"
    np.testing.assert_array_equal(f.get_tensor(key), trained["lora/" + key])
    # alpha: the rank 2 by default; the block variant sets MID's to 1.
    blocks = bool(run.config.method_options.get("block_alphas"))
    alpha = f.get_tensor(key[:-len("/b")] + "/alpha")
    assert alpha.shape == () and alpha.dtype == np.float32 and float(alpha) == (1.0 if blocks else 2.0)
  assert np.any(trained["lora/" + key])


def test_trained_lora_survives_a_kohya_round_trip(run, trajectory, tmp_path):
  """Trained factors -> our file -> kohya file (what A1111/ComfyUI read) -> read back: the merged
  weights, hence every sample, are the same: bit-identical where a module's alpha is the file's
  common one, else to float32 rounding (the kohya writer gives every module one alpha and folds
  the rest into the up factor, for diffusers' loader)."""
  from safetensors.numpy import save_file

  from persona_jax.convert import lora_formats as lf
  from persona_jax.convert.lora_formats import load_lora_file
  from persona_jax.methods.lora_compose import apply_loras
  from persona_jax.models import block_names
  loop.write_outputs(run, trajectory["trained"], tmp_path)
  base = run.pipe.params
  ours = load_lora_file(tmp_path / "lora.safetensors", base)
  tensors, metadata = lf.kohya_state_dict(ours, base, base_version="sd_v1")
  save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata=metadata)
  back = lf.read_lora_file(tmp_path / "kohya.safetensors", base)
  ones = np.ones((1, len(block_names.all_blocks(run.pipe.unet_config))), np.float32)
  a = tree.flatten(apply_loras(base, [ours], ones, run.pipe.unet_config))
  b = tree.flatten(apply_loras(base, [back], ones, run.pipe.unet_config))
  assert any(not np.array_equal(a[p], base_v) for p, base_v in tree.flatten(base).items() if p in ours)
  alpha = {p: float(np.float32(f.scale) * f.a.shape[1]) for p, f in ours.items()}
  assert len({float(np.float32(f.scale) * f.a.shape[1]) for f in back.values()}) == 1
  for p in ours:
    if np.array_equal(back[p].b, ours[p].b):        # the file's common alpha: kept as is
      assert float(np.float32(back[p].scale) * back[p].a.shape[1]) == alpha[p]
      np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))
    else:
      np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b[p]), rtol=1e-5, atol=1e-7)
