"""LoRA / LoCon on an SDXL base (the tiny `sdxl` random model): the method bar with attention
targets, per-block ranks and alphas and both text encoders (kohya's wider set and LoCon convs: the
SD 1.x bar, tests/methods/test_lora.py; on SDXL: the target sets below and every-module files in
tests/convert/test_lora_formats_sdxl.py); which encoders `text_encoder` names; slow: a training
run whose exports diffusers' StableDiffusionXLPipeline loads."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import ConfigError, tree
from persona_jax.convert import lora_formats as lf
from persona_jax.methods import lora
from persona_jax.train import loop
from tests.convert.test_lora_formats_sdxl import torch_layout, torch_module
from tests.markers import slow
from tests.runs import fixed_batch_trajectory, lora_config, one_device_mesh

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
METHOD = dict(name="lora", rank=2, text_encoder=True, block_ranks={"IN04": 3, "OUT02": 0},
              block_alphas={"MID": 1.0})


@pytest.fixture(scope="module")
def run(sdxl_dir):
  return loop.build(lora_config(sdxl_dir, method=METHOD), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=4)


def factor_keys(run):
  return {p.rsplit("/", 1)[0] for p in tree.paths(run.trainable)}


def test_trainable_leaves_are_exactly_the_targets(run):
  """attn1/attn2 q/k/v/out of the 12 transformer blocks (2 in each of 6 attentions) but OUT02's
  (up_blocks_0/attentions_2: rank 0), and q/k/v/out/fc1/fc2 of both encoders' layers but the
  first encoder's last, which SDXL never reads (2 of its 3; the second's 2)."""
  keys = factor_keys(run)
  assert {p.rsplit("/", 1)[1] for p in tree.paths(run.trainable)} == {"a", "b"}
  unet = {k for k in keys if k.startswith("lora/unet/")}
  assert len(unet) == (12 - 2) * 8
  assert {k.split("/transformer_blocks_")[1].split("/", 1)[1] for k in unet} == {
      f"attn{i}/to_{n}" for i in (1, 2) for n in ("q", "k", "v", "out_0")}
  assert not [k for k in keys if "up_blocks_0/attentions_2/" in k]
  for encoder, layers in (("text_encoder", 2), ("text_encoder_2", 2)):
    assert len([k for k in keys if k.startswith(f"lora/{encoder}/")]) == layers * 6
  assert not [k for k in keys if k.startswith("lora/text_encoder/encoder/layers_2/")]
  # Ranks and alphas by block: IN04 (down_blocks_1 layer 0) rank 3; MID alpha 1 at rank 2.
  factors = run.trainable["lora"]["unet"]["down_blocks_1"]
  assert factors["attentions_0"]["transformer_blocks_1"]["attn2"]["to_k"]["a"].shape == (80, 3)
  assert factors["attentions_1"]["transformer_blocks_1"]["attn2"]["to_k"]["a"].shape == (80, 2)
  chosen = {t.kernel: t for t in lora.targets(lora.LoRAConfig(**{k: v for k, v in METHOD.items()
                                                                  if k != "name"}),
                                               run.pipe.params, run.pipe.unet_config)}
  assert {f"lora/{k[:-len('/kernel')]}" for k in chosen} == keys
  assert chosen["unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q/kernel"].scale == 0.5
  assert set(run.frozen) == {"unet", *TEXT_ENCODERS}


def test_method_bar(run, trajectory):
  """Step 0 is the base bit for bit; lr 0 moves nothing; every factor gets a gradient; the loss
  falls; the frozen UNet and both encoders stay bit-identical."""
  params = run.method.params.apply(run.frozen, run.trainable)
  for name in ("unet", *TEXT_ENCODERS):
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[name]),
                                                    jax.tree.leaves(run.frozen[name])))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]),
                                                  jax.tree.leaves(run.trainable)))
  init = tree.flatten(run.trainable)           # weight decay 0: a factor moves iff it got a gradient
  still = [p for p, v in tree.flatten(trajectory["trained"]).items() if np.array_equal(v, init[p])]
  assert not still, f"{len(still)} factors never got a gradient, e.g. {still[:3]}"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


def test_merge_is_w_plus_scaled_product_in_the_second_encoder(run):
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), run.trainable)
  params, f = tree.flatten(run.method.params.apply(run.frozen, trained)), tree.flatten(trained)
  key = "text_encoder_2/encoder/layers_1/mlp/fc2"
  np.testing.assert_allclose(params[f"{key}/kernel"], tree.flatten(run.frozen)[f"{key}/kernel"]
                             + f[f"lora/{key}/a"] @ f[f"lora/{key}/b"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, encoders", [
    (False, ()), (True, TEXT_ENCODERS), ("both", TEXT_ENCODERS), ("te1", ("text_encoder",)),
    ("te2", ("text_encoder_2",)), (("te2", "te1"), TEXT_ENCODERS), ("clip_g", ("text_encoder_2",))])
def test_text_encoder_names_the_encoders(sdxl_pipe, value, encoders):
  config = lora.LoRAConfig(text_encoder=value, targets=())
  if not encoders:
    with pytest.raises(ConfigError, match="selects no layers"):
      lora.targets(config, sdxl_pipe.params, sdxl_pipe.unet_config)
    return
  chosen = lora.targets(config, sdxl_pipe.params, sdxl_pipe.unet_config)
  assert {t.kernel.split("/")[0] for t in chosen} == set(encoders)


def test_text_encoder_on_one_encoder_bases(sdxl_pipe):
  """On a base with one encoder (SD 1.x/2.x), True and "te1" are it; the second is an error."""
  one = {k: v for k, v in sdxl_pipe.params.items() if k != "text_encoder_2"}
  for value in (True, "te1"):
    chosen = lora.targets(lora.LoRAConfig(text_encoder=value, targets=()), one, sdxl_pipe.unet_config)
    assert {t.kernel.split("/")[0] for t in chosen} == {"text_encoder"}
  for value, message in (("te2", "'te2': the model has one text encoder"),
                         ("both", "'te2': the model has one text encoder"),
                         ("clip_x", "'clip_x' is not a text encoder")):
    with pytest.raises(ConfigError, match=f"method.text_encoder: {message}"):
      lora.targets(lora.LoRAConfig(text_encoder=value), one, sdxl_pipe.unet_config)


@pytest.fixture(scope="module")
def run_folder(run, trajectory, sdxl_dir, tmp_path_factory):
  """The bar's trained factors as a run folder (its config.json and lora.safetensors)."""
  import json
  workdir = tmp_path_factory.mktemp("runs") / "xl_lora"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": str(sdxl_dir), "method": METHOD}))
  assert loop.write_outputs(run, trajectory["trained"], workdir) == [str(workdir / "lora.safetensors")]
  return workdir


@slow
def test_exports_load_in_diffusers_as_sample_merges_them(run_folder, sdxl_dir, sdxl_pipe, tmp_path):
  """The run's file exported as diffusers/PEFT and as kohya: each reads back to the run's
  factors and, loaded by StableDiffusionXLPipeline.load_lora_weights (UNet, both encoders, LoCon
  convs) and fused, holds the weights `sample --lora` merges. Per-block ranks at alpha = r give
  the kohya file mixed alphas, which its writer evens out for diffusers' loader. (Default:
  tests/convert/test_lora_formats_sdxl.py, every module, random factors.)"""
  check_exports(run_folder, sdxl_dir, sdxl_pipe, tmp_path, ("unet", *TEXT_ENCODERS))


def check_exports(workdir, sdxl_dir, pipe, tmp_path, components):
  from diffusers import StableDiffusionXLPipeline
  from persona_jax.export import export
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  ours = lf.read_lora_file(workdir / "lora.safetensors", pipe.params)
  assert {p.split("/")[0] for p in ours} == set(components)
  assert all(np.any(f.b) for f in ours.values())
  merged = tree.flatten(with_loras(pipe.params, [LoRASpec(workdir / "lora.safetensors")],
                                   pipe.unet_config))
  base, names = tree.flatten(pipe.params), lf.module_names(pipe.params)
  ref_base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
  for fmt, name in (("diffusers", lf.PEFT_FILE), ("kohya", f"{workdir.name}.safetensors")):
    assert (tmp_path / fmt / name) in export(workdir, fmt, tmp_path / fmt)
    back = lf.read_lora_file(tmp_path / fmt / name, pipe.params)
    assert set(back) == set(ours)
    ref = copy.deepcopy(ref_base)
    ref.load_lora_weights(str(tmp_path / fmt), weight_name=name)
    ref.fuse_lora()
    for p in ours:
      w = torch_module(ref, names[p]).base_layer.weight.detach().numpy()
      np.testing.assert_allclose(w, torch_layout(merged[p]), atol=1e-6, rtol=1e-5, err_msg=f"{fmt} {p}")
      assert not np.array_equal(w, torch_layout(base[p]))


@slow
def test_a_training_run_on_sdxl(sdxl_dir, sdxl_pipe, tmp_path):
  """`train` for 3 steps on the tiny SDXL base (attention targets, the second encoder only):
  its result exports and loads in diffusers as above."""
  workdir = tmp_path / "xl_run"
  out = loop.train(lora_config(sdxl_dir, method=dict(name="lora", rank=2, text_encoder="te2"),
                               steps=3), workdir, progress=False, mesh=one_device_mesh())
  assert out["outputs"] == [str(workdir / "lora.safetensors")]
  check_exports(workdir, sdxl_dir, sdxl_pipe, tmp_path, ("unet", "text_encoder_2"))
