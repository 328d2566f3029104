"""Load -> save -> load is bit-exact, names and layouts map both ways, variants and dtypes."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from persona_jax import load_pipeline, save_pipeline
from persona_jax.convert.diffusers import key_table, torch_name
from persona_jax.models.components import abstract_params

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_round_trip_is_bit_exact(preset, model_dirs, pipes, tmp_path):
  src = model_dirs[preset]
  out = save_pipeline(pipes[preset], tmp_path / "copy")
  for f in WEIGHT_FILES:
    a, b = load_file(src / f), load_file(out / f)
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (f, k)
  for f in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json", "model_index.json", "tokenizer/vocab.json",
            "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"):
    assert (src / f).read_bytes() == (out / f).read_bytes(), f
  again = load_pipeline(out)
  for x, y in zip(jax.tree.leaves(pipes[preset].params), jax.tree.leaves(again.params)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_text_encoder_saved_with_text_model_prefix(model_dirs):
  keys = load_file(model_dirs["sd1"] / "text_encoder/model.safetensors").keys()
  assert all(k.startswith("text_model.") for k in keys)
  assert "text_model.embeddings.token_embedding.weight" in keys


def test_name_mapping():
  assert torch_name(("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn2", "to_out_0",
                     "kernel")) == "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight"
  assert torch_name(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
  assert torch_name(("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj",
                     "kernel")) == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
  assert torch_name(("encoder", "layers_11", "layer_norm1", "scale")) == "encoder.layers.11.layer_norm1.weight"


def test_key_table_matches_a_diffusers_state_dict(pipes):
  """Every key and shape of a diffusers UNet's state dict is in our table (and nothing else)."""
  pytest.importorskip("diffusers")
  from diffusers import UNet2DConditionModel
  pipe = pipes["sd2"]
  ref = UNet2DConditionModel.from_config(pipe.raw_configs["unet"])
  table = key_table(abstract_params("unet", pipe.unet_config))
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert {k: e.torch_shape() for k, e in table.items()} == want


def test_fp16_variant_and_bfloat16_load(pipes, tmp_path):
  out = save_pipeline(pipes["sd1"], tmp_path / "half", dtype=np.float16, variant="fp16")
  assert (out / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
  assert not (out / "unet/diffusion_pytorch_model.safetensors").exists()
  half = load_pipeline(out, variant="fp16")
  ref = pipes["sd1"].params["unet"]["conv_in"]["kernel"]
  got = half.params["unet"]["conv_in"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, np.asarray(ref).astype(np.float16).astype(np.float32))
  bf = load_pipeline(out, variant="fp16", dtype=ml_dtypes.bfloat16)
  assert bf.params["vae"]["encoder"]["conv_in"]["kernel"].dtype == ml_dtypes.bfloat16
  assert bf.unet_config.dtype == ml_dtypes.bfloat16


def test_save_refuses_to_clobber_and_replaces_atomically(pipes, tmp_path):
  from persona_jax import ModelFileError
  out = save_pipeline(pipes["sd1"], tmp_path / "m")
  with pytest.raises(ModelFileError, match="not empty"):
    save_pipeline(pipes["sd1"], out)
  save_pipeline(pipes["sd2"], out, overwrite=True)
  assert json.loads((out / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
  assert [p.name for p in tmp_path.iterdir()] == ["m"]          # no temporary folders left


def _copy(model_dirs, tmp_path):
  import shutil
  return shutil.copytree(model_dirs["sd1"], tmp_path / "m")


def test_sharded_weights_load(model_dirs, pipes, tmp_path):
  """diffusers' sharded layout: *.safetensors.index.json with a weight_map over shard files."""
  from safetensors.numpy import save_file
  folder = _copy(model_dirs, tmp_path)
  tensors = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
  keys = sorted(tensors)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, folder / "unet" / name)
  (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
  (folder / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  sharded = load_pipeline(folder)
  for x, y in zip(jax.tree.leaves(pipes["sd1"].params["unet"]), jax.tree.leaves(sharded.params["unet"])):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_text_encoder_without_prefix_and_old_vae_attention_layout(model_dirs, pipes, tmp_path):
  """transformers >= 5.6 writes text-encoder keys without `text_model.`; old VAEs name the
  attention query/key/value/proj_attn and LDM conversions keep (C, C, 1, 1) weights."""
  from safetensors.numpy import save_file
  folder = _copy(model_dirs, tmp_path)
  te = load_file(folder / "text_encoder/model.safetensors")
  save_file({k.removeprefix("text_model."): v for k, v in te.items()},
            folder / "text_encoder/model.safetensors")
  vae = load_file(folder / "vae/diffusion_pytorch_model.safetensors")
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for k, v in vae.items():
    for new, was in old.items():
      tag = f".attentions.0.{new}."
      if tag in k:
        k = k.replace(tag, f".attentions.0.{was}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    renamed[k] = v
  assert any(".query.weight" in k for k in renamed)
  save_file(renamed, folder / "vae/diffusion_pytorch_model.safetensors")
  loaded = load_pipeline(folder)
  for name in ("text_encoder", "vae"):
    for x, y in zip(jax.tree.leaves(pipes["sd1"].params[name]), jax.tree.leaves(loaded.params[name])):
      assert np.array_equal(np.asarray(x), np.asarray(y))
