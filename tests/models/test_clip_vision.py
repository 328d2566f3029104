"""The CLIP image encoder against transformers: folders saved by transformers itself, outputs,
preprocessing (the PIL `CLIPImageProcessorPil`), saving, errors and `verify --image-encoder`.

Tiny models (hidden 32, 2 layers, 4 heads, 32x32 images in 8x8 patches) with randomized norm
weights and biases; float32 at the highest matmul precision. Reached: about 1e-7 relative;
asserted: 1e-5.
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from persona_jax.data.clip_images import (CLIPImageProcessorConfig, load_image_processor,
                                          preprocess)
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.image_encoder import load_image_encoder, save_image_encoder
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.verify import compare, nchw
from tests.torch_reference import randomize_affine_, require_torch

TOL = 1e-5
SIZE = 32


def _reference_processor(**kwargs):
  from transformers import CLIPImageProcessorPil
  return CLIPImageProcessorPil(**kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"proj": CLIPVisionModelWithProjection (quick_gelu, with preprocessor_config.json),
  "plain": CLIPVisionModel (gelu)} saved by transformers, with the torch models."""
  torch = require_torch()
  from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
  root = tmp_path_factory.mktemp("image_encoders")
  out = {}
  for i, (name, cls, act) in enumerate((("proj", CLIPVisionModelWithProjection, "quick_gelu"),
                                        ("plain", CLIPVisionModel, "gelu"))):
    torch.manual_seed(i)
    model = cls(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24,
                                 num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                                 patch_size=8, hidden_act=act)).eval()
    randomize_affine_(model, seed=i)
    model.save_pretrained(root / name)
    out[name] = (root / name, model)
  _reference_processor(size={"shortest_edge": SIZE},
                       crop_size={"height": SIZE, "width": SIZE}).save_pretrained(root / "proj")
  return out


def _run_both(folder, model, x):
  import torch
  config, params = load_image_encoder(folder)
  with torch.no_grad():
    want = model(torch.from_numpy(nchw(x)), output_hidden_states=True)
    tower = model.vision_model if hasattr(model, "visual_projection") else model
    pooled = tower(torch.from_numpy(nchw(x))).pooler_output
  with jax.default_matmul_precision("highest"):
    got = jax.jit(CLIPVisionModel(config).apply)({"params": params}, x)
  return config, params, got, want, pooled


@pytest.mark.parametrize("name", ["proj", "plain"])
def test_outputs_match_transformers(folders, name):
  folder, model = folders[name]
  x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  config, params, got, want, pooled = _run_both(folder, model, x)
  assert config.with_projection == (name == "proj")
  assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert "q_proj" in params["vision_model"]["encoder"]["layers_1"]["self_attn"]
  assert ("visual_projection" in params) == (name == "proj")
  assert got.last_hidden_state.shape == (2, 17, 32)
  assert compare("last", got.last_hidden_state, want.last_hidden_state.numpy()).max_rel < TOL
  assert len(got.hidden_states) == len(want.hidden_states) == 3
  for a, b in zip(got.hidden_states, want.hidden_states):
    assert compare("hidden", a, b.numpy()).max_rel < TOL
  assert compare("pooler", got.pooler_output, pooled.numpy()).max_rel < TOL
  if name == "proj":
    assert got.image_embeds.shape == (2, 24)
    assert compare("embeds", got.image_embeds, want.image_embeds.numpy()).max_rel < TOL
  else:
    assert got.image_embeds is None


def _odd_images():
  rng = np.random.default_rng(1)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  rgba = Image.fromarray(rng.integers(0, 256, (41, 30, 4), dtype=np.uint8), "RGBA")
  return [Image.fromarray(rgb(37, 53)), Image.fromarray(rgb(61, 29)), Image.fromarray(rgb(19, 19)),
          rgba, Image.fromarray(rgb(45, 70)).convert("L"), Image.fromarray(rgb(33, 47)).convert("P")]


@pytest.mark.parametrize("settings", [
    {},                                                                   # CLIP's defaults (224)
    {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}},
    {"size": 40, "crop_size": 36},                                        # old int forms
    {"size": {"height": 30, "width": 34}, "crop_size": {"height": 28, "width": 40}},  # zero pad
])
def test_preprocessing_equals_transformers_pil_processor(settings):
  require_torch()
  images = _odd_images()
  want = _reference_processor(**settings)(images=images, return_tensors="np").pixel_values
  got = preprocess(images, CLIPImageProcessorConfig.from_dict(settings))
  assert got.dtype == np.float32 and got.shape == want.transpose(0, 2, 3, 1).shape
  np.testing.assert_array_equal(nchw(got), want)


def test_preprocessing_config_from_folder_and_defaults(folders, tmp_path):
  assert load_image_processor(folders["proj"][0]).crop_size == (SIZE, SIZE)
  assert load_image_processor(tmp_path) == CLIPImageProcessorConfig()
  assert load_image_processor(tmp_path, image_size=SIZE).shortest_edge == SIZE
  with pytest.raises(ConfigError, match="do_pad"):
    CLIPImageProcessorConfig.from_dict({"do_pad": True}, "p.json")
  with pytest.raises(ConfigError, match="longest_edge"):
    CLIPImageProcessorConfig.from_dict({"size": {"longest_edge": 3}}, "p.json")


def test_loads_transformers_4_layout_and_saves_round_trip(folders, tmp_path):
  """The prefix-less keys transformers 5 writes for CLIPVisionModel, the `vision_model.` keys
  (with the old `position_ids` buffer) of 4.x; our saved folder loads in transformers."""
  from safetensors.numpy import load_file, save_file
  from transformers import CLIPVisionModel as RefPlain
  from transformers import CLIPVisionModelWithProjection as RefProj
  folder, _ = folders["plain"]
  config, params = load_image_encoder(folder)
  state = load_file(str(folder / "model.safetensors"))
  assert not any(k.startswith("vision_model.") for k in state)        # transformers 5 layout
  old = tmp_path / "old"
  old.mkdir()
  (old / "config.json").write_text((folder / "config.json").read_text())
  state = {"vision_model." + k: v for k, v in state.items()}
  state["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
  save_file(state, str(old / "model.safetensors"))
  _, params_old = load_image_encoder(old)
  jax.tree.map(np.testing.assert_array_equal, params_old, params)

  for name, ref_cls in (("plain", RefPlain), ("proj", RefProj)):
    config, params = load_image_encoder(folders[name][0])
    out = save_image_encoder(tmp_path / f"saved_{name}", config, params,
                             processor=load_image_processor(folders[name][0], SIZE))
    config2, params2 = load_image_encoder(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    x = np.random.default_rng(2).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    *_, got, want, _ = _run_both(out, ref_cls.from_pretrained(out).eval(), x)
    assert compare("last", got.last_hidden_state, want.last_hidden_state.numpy()).max_rel < TOL
    assert load_image_processor(out) == load_image_processor(folders[name][0], SIZE)
    with pytest.raises(ModelFileError, match="exists"):
      save_image_encoder(out, config, params)


def _copy(folder, dest, **config_changes):
  dest.mkdir()
  raw = json.loads((folder / "config.json").read_text())
  (dest / "config.json").write_text(json.dumps({**raw, **config_changes}))
  (dest / "model.safetensors").symlink_to(folder / "model.safetensors")
  return dest


def test_clear_errors(folders, tmp_path):
  folder, _ = folders["proj"]
  with pytest.raises(ConfigError, match=r"config.json: unknown config key 'spatial_merge' = 2"):
    load_image_encoder(_copy(folder, tmp_path / "a", spatial_merge=2))
  with pytest.raises(ConfigError, match=r"'dropout' = 0.1 is not supported"):
    load_image_encoder(_copy(folder, tmp_path / "b", dropout=0.1))
  with pytest.raises(ConfigError, match="model_type 'clip' is not a CLIP vision model"):
    load_image_encoder(_copy(folder, tmp_path / "c", model_type="clip"))
  with pytest.raises(ModelFileError, match=r"shape \(32, 3, 8, 8\), the config needs"):
    load_image_encoder(_copy(folder, tmp_path / "d", patch_size=4))
  with pytest.raises(ModelFileError, match="visual_projection.weight"):         # missing
    load_image_encoder(_copy(folders["plain"][0], tmp_path / "e",
                             architectures=["CLIPVisionModelWithProjection"]))
  with pytest.raises(ModelFileError, match="image encoder folder not found"):
    load_image_encoder(tmp_path / "nowhere")
  config, params = load_image_encoder(folder)
  with pytest.raises(ValueError, match=r"expects \[B, 32, 32, 3\] images"):
    CLIPVisionModel(config).apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32))


@pytest.fixture
def skip_pipeline(monkeypatch):
  """`verify` without the SD components (tests/test_verify.py covers those)."""
  import persona_jax.verify as verify_module
  monkeypatch.setattr(verify_module, "load_pipeline", lambda *a, **k: None)
  monkeypatch.setattr(verify_module, "compare_components", lambda *a, **k: [])


def test_verify_command_compares_image_encoder(folders, skip_pipeline, tmp_path, monkeypatch,
                                               capsys):
  from persona_jax import image_encoder
  from persona_jax.cli import main
  model = tmp_path / "model"
  model.mkdir()
  assert main(["verify", str(model), "--image-encoder", str(folders["proj"][0]),
               "--tolerance", "1e-5"]) == 0
  out = capsys.readouterr().out
  for name in ("preprocess", "last_hidden_state", "hidden_states[-2]", "pooler_output",
               "image_embeds"):
    assert f"image_encoder.{name}" in out
  assert out.strip().endswith("PASS")

  (model / "image_encoder").symlink_to(folders["plain"][0])           # the default location
  assert main(["verify", str(model)]) == 0
  out = capsys.readouterr().out
  assert "image encoder" in out.splitlines()[0] and "image_embeds" not in out

  load = image_encoder.load_image_encoder                             # one bias off: FAIL, exit 1
  def broken(*a, **k):
    config, params = load(*a, **k)
    post = params["vision_model"]["post_layernorm"]
    return config, {**params, "vision_model": {**params["vision_model"],
                                               "post_layernorm": {**post, "bias": post["bias"] + 1}}}
  monkeypatch.setattr(image_encoder, "load_image_encoder", broken)
  assert main(["verify", str(model)]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert [l for l in lines if l.startswith("image_encoder.pooler_output")][0].endswith("FAIL")
  assert main(["verify", str(model), "--image-encoder", str(tmp_path / "none")]) == 2
  assert "image encoder folder not found" in capsys.readouterr().err
