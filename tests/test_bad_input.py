"""Bad model folders stop with an error that names the file (and key) and says what to do."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persona_jax import ConfigError, ModelFileError, PickleRefusedError, load_pipeline

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(model_dirs, tmp_path):
  """A private copy of the sd1 random model to break."""
  return shutil.copytree(model_dirs["sd1"], tmp_path / "model")


def edit_weights(path, fn):
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path)


def edit_json(path, fn):
  obj = json.loads(path.read_text())
  fn(obj)
  path.write_text(json.dumps(obj))


def test_missing_folder_and_model_index(tmp_path, folder):
  with pytest.raises(ModelFileError, match="model folder not found"):
    load_pipeline(tmp_path / "nope")
  (folder / "model_index.json").unlink()
  with pytest.raises(ModelFileError, match="model_index.json"):
    load_pipeline(folder)


def test_missing_weights_file(folder):
  (folder / UNET).unlink()
  with pytest.raises(ModelFileError, match=r"unet: no weights file: expected diffusion_pytorch_model\.safetensors"):
    load_pipeline(folder)


def test_missing_config(folder):
  (folder / "vae/config.json").unlink()
  with pytest.raises(ModelFileError, match=r"vae/config.json: file not found"):
    load_pipeline(folder)


def test_missing_key(folder):
  edit_weights(folder / UNET, lambda t: t.pop("conv_in.bias"))
  with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model.safetensors: 1 weight\(s\) missing, e.g. 'conv_in.bias'"):
    load_pipeline(folder)


def test_unexpected_key(folder):
  edit_weights(folder / UNET, lambda t: t.__setitem__("extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(ModelFileError, match=r"unexpected tensor\(s\), e.g. 'extra.weight'"):
    load_pipeline(folder)


def test_shape_mismatch(folder):
  edit_weights(folder / UNET, lambda t: t.__setitem__("conv_in.bias", np.zeros(5, np.float32)))
  with pytest.raises(ModelFileError, match=r"tensor 'conv_in.bias' has shape \(5,\), the config needs \(32,\)"):
    load_pipeline(folder)


def test_truncated_safetensors(folder):
  data = (folder / UNET).read_bytes()
  (folder / UNET).write_bytes(data[: len(data) // 2])
  with pytest.raises(ModelFileError, match="cannot read safetensors file"):
    load_pipeline(folder)


def test_pickle_refused_with_opt_in_hint(folder):
  (folder / UNET).unlink()
  (folder / "unet/diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(PickleRefusedError, match="--allow-pickle"):
    load_pipeline(folder)


def test_pickle_loads_when_allowed(model_dirs, folder):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in load_file(folder / UNET).items()}
  torch.save(state, folder / "unet/diffusion_pytorch_model.bin")
  (folder / UNET).unlink()
  pipe = load_pipeline(folder, allow_pickle=True)
  want = load_file(model_dirs["sd1"] / UNET)["conv_in.weight"]
  np.testing.assert_array_equal(pipe.params["unet"]["conv_in"]["kernel"], want.transpose(2, 3, 1, 0))


def test_unsupported_config_value_names_key(folder):
  edit_json(folder / "unet/config.json", lambda c: c.update(class_embed_type="timestep"))
  with pytest.raises(ConfigError, match=r"unet/config.json: config key 'class_embed_type' = 'timestep' is not supported"):
    load_pipeline(folder)


def test_default_valued_unsupported_keys_are_accepted(folder):
  edit_json(folder / "unet/config.json", lambda c: c.update(class_embed_type=None, dropout=0.0,
                                                            num_attention_heads=None))
  load_pipeline(folder)


def test_config_typo_is_an_error(folder):
  edit_json(folder / "unet/config.json", lambda c: c.update(layers_per_blok=3))
  with pytest.raises(ConfigError, match=r"unknown config key 'layers_per_blok' = 3"):
    load_pipeline(folder)


def test_unsupported_block_type(folder):
  edit_json(folder / "unet/config.json",
            lambda c: c.update(down_block_types=["AttnDownBlock2D", "DownBlock2D"]))
  with pytest.raises(ConfigError, match="down block type 'AttnDownBlock2D' is not supported"):
    load_pipeline(folder)


def test_malformed_json(folder):
  (folder / "text_encoder/config.json").write_text("{not json")
  with pytest.raises(ModelFileError, match=r"text_encoder/config.json: not valid JSON"):
    load_pipeline(folder)


def test_text_encoder_dropout_unsupported(folder):
  edit_json(folder / "text_encoder/config.json", lambda c: c.update(dropout=0.1))
  with pytest.raises(ConfigError, match="'dropout' = 0.1"):
    load_pipeline(folder)


def test_text_encoder_2_listed_without_its_folder(folder):
  edit_json(folder / "model_index.json",
            lambda c: c.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]))
  with pytest.raises(ModelFileError, match="component 'tokenizer_2' is missing \\(an SDXL "
                                           "pipeline needs both tokenizers\\)"):
    load_pipeline(folder)


def test_wrong_component_class(folder):
  edit_json(folder / "model_index.json", lambda c: c.update(vae=["diffusers", "AutoencoderTiny"]))
  with pytest.raises(ModelFileError, match="vae is a AutoencoderTiny"):
    load_pipeline(folder)


def test_missing_tokenizer_files(folder):
  (folder / "tokenizer/merges.txt").unlink()
  with pytest.raises(ModelFileError, match="tokenizer: not a tokenizer folder"):
    load_pipeline(folder)


def test_unused_components_are_ignored_with_a_log_line(folder, caplog):
  edit_json(folder / "model_index.json",
            lambda c: c.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                               feature_extractor=["transformers", "CLIPImageProcessor"]))
  with caplog.at_level("INFO"):
    load_pipeline(folder)
  assert "ignoring component 'safety_checker'" in caplog.text


@pytest.mark.parametrize("kind", ["lora", "embedding", "ip_adapter"])
def test_non_finite_adapter_values_are_refused_naming_the_tensor(kind, tmp_path):
  """A LoRA factor full of NaN used to sample an all-black image; every adapter, embedding and
  result file is now checked at load."""
  from persona_jax.convert import embedding_formats as ef
  from persona_jax.convert import ip_adapter_files
  from persona_jax.convert import lora_formats as lf
  bad = np.ones((4, 8), np.float32)
  bad[1, 2] = np.nan
  path = tmp_path / f"{kind}.safetensors"
  name, read = {
      "lora": ("lora_unet_x.lora_down.weight", lf.read_lora_tensors),
      "embedding": ("<t>", ef.read_embedding_file),
      "ip_adapter": ("image_proj.proj.weight", ip_adapter_files.read_official)}[kind]
  save_file({name: bad, "other": np.zeros(3, np.float32)}, str(path))
  with pytest.raises(ModelFileError, match=rf"{path}: tensor {name} holds 1 non-finite value"):
    read(path)


def test_integer_weights_in_a_model_folder_are_refused(model_dirs, tmp_path):
  """An integer tensor where a weight belongs was cast silently; now it names file and tensor
  (integer buffers such as position_ids stay allowed)."""
  model = shutil.copytree(model_dirs["sd1"], tmp_path / "model")
  f = model / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = load_file(f)
  tensors["conv_in.bias"] = np.round(tensors["conv_in.bias"] * 100).astype(np.int32)
  save_file(tensors, str(f))
  with pytest.raises(ModelFileError, match=rf"{f}: tensor conv_in.bias is int32, not floating point"):
    load_pipeline(model)


def test_pickle_messages_name_each_commands_opt_in_and_a_broken_pickle_is_one_line(tmp_path):
  """The refusal names the opt-in as each command spells it; under the opt-in, a pickle torch's
  safe unpickler refuses (an arbitrary object) is one line naming the file."""
  import pickle

  from persona_jax.convert.files import read_weights
  folder = tmp_path / "unet"
  folder.mkdir()
  with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
    pickle.dump({"conv_in.weight": ConfigError("not a tensor")}, f)
  with pytest.raises(PickleRefusedError, match=r"--allow-pickle for sample, verify and "
                                               r"import-fastcomposer; --config.method.allow_pickle"):
    read_weights(folder, "diffusion_pytorch_model")
  with pytest.raises(ModelFileError, match=rf"{folder / 'diffusion_pytorch_model.bin'}: cannot read "
                                           r"this pickle even with the opt-in \(\w+"):
    read_weights(folder, "diffusion_pytorch_model", allow_pickle=True)
