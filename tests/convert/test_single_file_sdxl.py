"""SDXL base single files (SGM layout: `model.diffusion_model.*` with `label_emb`,
`conditioner.embedders.0.transformer.*` CLIP ViT-L, `conditioner.embedders.1.model.*` OpenCLIP
ViT-bigG, `first_stage_model.*`), both ways: our export loads in diffusers'
`StableDiffusionXLPipeline.from_single_file` with the folder's exact weights; a file converted
independently (string replacements, as diffusers' scripts do) loads in persona_jax bit-exactly;
configs of the real SDXL base are inferred from shapes alone; the refiner and other SDXL
variants are refused naming the key.

The module's one tiny SDXL model is the `sdxl` preset with text_encoder_2 wider than
text_encoder (as in SDXL: 768 and 1280): diffusers' from_single_file tells CLIP ViT-L from
OpenCLIP by the positional embedding's width, and with equal widths loads CLIP-L's tensors into
text_encoder_2.
"""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persona_jax.convert import single_file as sf
from persona_jax.convert import single_file_layout as sfl
from persona_jax.convert.diffusers import params_to_state_dict
from persona_jax.convert.diffusers_folder import Pipeline, components_of, parse_configs
from persona_jax.convert.files import write_json
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.pipeline import load_pipeline, save_pipeline
from persona_jax.random_model import preset_configs, random_params
from persona_jax.tokenizer import load_tokenizer, write_tokenizer
from tests.convert.test_single_file import (assert_params_equal, configs_of, openclip_file_tensors,
                                            vae_file_tensors)

XL_TEXT = "conditioner.embedders.0.transformer.text_model."
XL_OPENCLIP = "conditioner.embedders.1.model."
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  """The tiny SDXL model as a diffusers folder, loaded, and as our single file."""
  root = tmp_path_factory.mktemp("sdxl")
  raw = preset_configs("sdxl")
  te, te2 = raw["text_encoder"], raw["text_encoder_2"]
  if te2["hidden_size"] == te["hidden_size"]:
    te2.update(hidden_size=te["hidden_size"] + 4 * te2["num_attention_heads"],
               intermediate_size=2 * (te["hidden_size"] + 4 * te2["num_attention_heads"]))
  raw["unet"]["cross_attention_dim"] = te["hidden_size"] + te2["hidden_size"]
  configs = parse_configs(raw)
  rng = np.random.default_rng(5)
  # sfl.cached_abstract_params: the shapes cached for the exporter too (the loaded configs are equal).
  params = {c.name: random_params(sfl.cached_abstract_params(c.name, configs[f"{c.name}_config"]), rng)
            for c in components_of(raw)}
  pipe = Pipeline(**configs, params=params, raw_configs=raw,
                  tokenizer_dir=write_tokenizer(root / "tok", "sd1"),
                  tokenizer_2_dir=write_tokenizer(root / "tok2", "sd2"))
  folder = save_pipeline(pipe, root / "folder")
  pipe = load_pipeline(folder)
  return SimpleNamespace(folder=folder, pipe=pipe,
                         file=sf.save_single_file(pipe, root / "sdxl.safetensors"))


# --- export -> diffusers' from_single_file ---------------------------------------------------


def test_diffusers_loads_our_sdxl_single_file(xl):
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionXLPipeline
  from diffusers.utils import logging as dlogging
  dlogging.set_verbosity_error()
  dlogging.disable_progress_bar()
  ours = StableDiffusionXLPipeline.from_single_file(str(xl.file), config=str(xl.folder),
                                                    local_files_only=True)
  ref = StableDiffusionXLPipeline.from_pretrained(str(xl.folder), local_files_only=True)
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
    assert a.keys() == b.keys(), name
    for k in b:
      assert not a[k].is_meta and torch.equal(a[k], b[k]), (name, k)
  assert type(ours.scheduler) is type(ref.scheduler)
  assert dict(ours.scheduler.config) == dict(ref.scheduler.config)
  # text_projection is OpenCLIP's P in `pooled @ P`: transformers' text_embeds are exactly that.
  p = load_file(str(xl.file))[XL_OPENCLIP + "text_projection"]
  ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407, 0, 0]])
  with torch.no_grad():
    out = ref.text_encoder_2(ids)
  pooled = out.last_hidden_state[0, 6].numpy()
  np.testing.assert_allclose(out.text_embeds[0].numpy(), pooled @ p, rtol=1e-5, atol=1e-6)


def test_sdxl_file_has_the_sgm_layout(xl):
  tensors = load_file(str(xl.file))
  te2 = xl.pipe.text_encoder_2_config
  # Level 0 has no attention; level 1's transformers are 2 deep; its upsampler follows attention.
  assert not any(k.startswith(f"{UNET}input_blocks.1.1.") for k in tensors)
  assert f"{UNET}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in tensors
  assert f"{UNET}output_blocks.2.2.conv.weight" in tensors
  assert f"{UNET}middle_block.1.transformer_blocks.1.norm3.weight" in tensors
  assert tensors[f"{UNET}label_emb.0.0.weight"].shape == (
      xl.pipe.unet_config.time_embed_dim, xl.pipe.unet_config.projection_class_embeddings_input_dim)
  assert tensors[XL_OPENCLIP + "text_projection"].shape == (te2.hidden_size, te2.projection_dim)
  assert tensors[XL_OPENCLIP + "transformer.resblocks.1.attn.in_proj_weight"].shape == (
      3 * te2.hidden_size, te2.hidden_size)
  assert not any(k.startswith(f"{XL_OPENCLIP}transformer.resblocks.{te2.num_hidden_layers}.")
                 for k in tensors)
  assert f"{XL_TEXT}final_layer_norm.weight" in tensors
  prefixes = {UNET, "conditioner.embedders.0.transformer.", XL_OPENCLIP, "first_stage_model."}
  assert all(k.startswith(tuple(prefixes)) for k in tensors)
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}


# --- import ----------------------------------------------------------------------------------


def test_import_of_our_sdxl_file_is_bit_exact(xl, tmp_path):
  got = sf.load_single_file(xl.file, config_dir=xl.folder)
  assert got.is_sdxl and got.extras == {}
  assert_params_equal(got.params, xl.pipe.params)
  assert got.raw_configs == xl.pipe.raw_configs
  assert got.text_encoder_2_config == xl.pipe.text_encoder_2_config
  assert (got.tokenizer_dir, got.tokenizer_2_dir) == (xl.folder / "tokenizer",
                                                      xl.folder / "tokenizer_2")
  again = sf.save_single_file(got, tmp_path / "again.safetensors")
  a, b = load_file(str(again)), load_file(str(xl.file))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  via = load_pipeline(xl.file, config_dir=xl.folder)
  assert isinstance(via, sf.SingleFilePipeline) and via.is_sdxl


def _sgm_convert(folder) -> dict:
  """The tiny model's diffusers files -> SGM names by string replacement (the logic of
  diffusers' scripts/convert_diffusers_to_original_sdxl.py at this model's two levels)."""
  unet = load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))
  vae = load_file(str(folder / "vae/diffusion_pytorch_model.safetensors"))
  text = load_file(str(folder / "text_encoder/model.safetensors"))
  text2 = load_file(str(folder / "text_encoder_2/model.safetensors"))
  out = {}
  fixed = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
           ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
           ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
  layers = [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
            ("mid_block.resnets.1.", "middle_block.2."),
            ("down_blocks.0.downsamplers.0.conv.", "input_blocks.3.0.op."),
            ("up_blocks.0.upsamplers.0.", "output_blocks.2.2.")]     # level 0 up has attention
  for i in range(2):
    for j in range(2):
      layers.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
      if i == 1:
        layers.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
    for j in range(3):
      layers.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
      if i == 0:
        layers.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
  resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
            ("conv_shortcut", "skip_connection")]
  for k, w in unet.items():
    v = k
    for hf, sd in fixed:
      v = sd + v[len(hf):] if v.startswith(hf) else v
    if "resnets" in v:
      for hf, sd in resnet:
        v = v.replace(hf, sd)
    for hf, sd in layers:
      v = v.replace(hf, sd)
    out[UNET + v] = w

  out.update(vae_file_tensors(vae, 2))
  out.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
  out.update(openclip_file_tensors(text2, XL_OPENCLIP))
  return out


def test_import_of_an_independently_converted_sdxl_file(xl, tmp_path):
  tensors = _sgm_convert(xl.folder)
  ours = sf.state_dict_to_single_file(
      {n: params_to_state_dict(xl.pipe.params[n]) for n in sfl.SDXL_COMPONENTS}, configs_of(xl.pipe))
  assert sorted(tensors) == sorted(ours)
  assert all(np.array_equal(tensors[k], ours[k]) for k in ours)
  extras = {XL_OPENCLIP + "logit_scale": np.array(4.6052, np.float32),
            XL_TEXT + "embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
            "denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32)}
  path = tmp_path / "sgm.safetensors"
  save_file({**tensors, **extras}, str(path))
  got = sf.load_single_file(path, config_dir=xl.folder)
  assert_params_equal(got.params, xl.pipe.params)
  assert sorted(got.extras) == sorted(extras)
  # Text-encoder extras go back out (from the loaded file, or from a base file); buffers do not.
  for pipe, base in ((got, None), (xl.pipe, path)):
    out = load_file(str(sf.save_single_file(pipe, tmp_path / "out.safetensors",
                                            base_single_file=base)))
    assert sorted(out) == sorted([*tensors, *list(extras)[:2]])
    assert all(np.array_equal(out[k], v) for k, v in {**tensors, **extras}.items() if k in out)


# --- config inference for the real SDXL base (shapes only) -----------------------------------


SDXL_BASE = {
    "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "cross_attention_dim": 2048, "use_linear_projection": True, "sample_size": 128,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "in_channels": 4},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                       "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "scaling_factor": 0.13025, "sample_size": 1024},
}


def test_infer_configs_of_the_sdxl_base():
  """A shapes-only SDXL base file (our layout of its configs, + OpenCLIP's logit_scale and
  CLIP's position_ids as sd_xl_base_1.0 has them: 2515 tensors) infers those configs."""
  base = {name: {k: v for k, v in c.items() if k not in ("scaling_factor", "sample_size")}
          for name, c in SDXL_BASE.items()}
  base["vae"].update(down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4)
  configs = parse_configs({**base, "scheduler": {}})
  tables = sfl.key_tables(configs)
  out = {}
  for name, slots in sfl.single_file_layout(configs, tables).items():
    for key, slot in slots.items():
      shape = tables[name][key].torch_shape()
      if slot.part is not None:
        shape = (3 * shape[0], *shape[1:])
      elif slot.conv1x1:
        shape = (*shape, 1, 1)
      elif slot.transposed:
        shape = shape[::-1]
      out[slot.key] = jax.ShapeDtypeStruct(shape, np.float32)
  out[XL_OPENCLIP + "logit_scale"] = jax.ShapeDtypeStruct((), np.float32)
  out[XL_TEXT + "embeddings.position_ids"] = jax.ShapeDtypeStruct((1, 77), np.int64)
  assert len(out) == 2515 and out[XL_OPENCLIP + "text_projection"].shape == (1280, 1280)
  raw = sf.infer_configs(out, "epsilon")
  for name, want in SDXL_BASE.items():
    for key, value in want.items():
      assert raw[name][key] == value, (name, key)
  assert raw["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
  assert raw["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
  assert raw["model_index"]["_class_name"] == "StableDiffusionXLPipeline"
  typed = parse_configs(raw)
  assert typed["text_encoder_2_config"].with_projection
  assert typed["unet_config"].down_transformer_layers == ((1, 1), (2, 2), (10, 10))


def test_inferred_sdxl_load_uses_our_tokenizers(xl, monkeypatch, tmp_path):
  """Without a config folder: CLIP's shipped tokenizer and the "!"-padded one for tokenizer_2
  (the tiny model's configs stand in for the inferred ones: its widths are not SDXL's)."""
  with pytest.raises(ConfigError, match=r"SDXL base's \(320, 640, 1280\).*--config DIR"):
    sf.load_single_file(xl.file, prediction_type="epsilon")
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(sf, "infer_configs", lambda *a, **k: dict(xl.pipe.raw_configs))
  got = sf.load_single_file(xl.file, prediction_type="epsilon")
  assert_params_equal(got.params, xl.pipe.params)
  assert got.tokenizer_dir == sf.shipped_tokenizer_dir()
  assert load_tokenizer(got.tokenizer_2_dir).pad_token_id == 0


# --- errors ----------------------------------------------------------------------------------


def _file(tmp_path, name, keys) -> str:
  path = tmp_path / f"{name}.safetensors"
  shapes = {f"{UNET}input_blocks.0.0.weight": (32, 9, 3, 3)}
  save_file({k: np.zeros(shapes.get(k, (2,)), np.float32) for k in keys}, str(path))
  return path


@pytest.mark.parametrize("name,keys,match", [
    ("refiner", [f"{UNET}label_emb.0.0.weight", "conditioner.embedders.0.model.text_projection",
                 "conditioner.embedders.0.model.ln_final.weight"],
     r"'conditioner\.embedders\.0\.model\.text_projection'.*SDXL refiner"),
    ("playground", [f"{UNET}label_emb.0.0.weight", XL_TEXT + "final_layer_norm.weight",
                    XL_OPENCLIP + "ln_final.weight", "edm_mean"], r"'edm_mean'.*EDM"),
    ("third", [f"{UNET}label_emb.0.0.weight", XL_TEXT + "final_layer_norm.weight",
               XL_OPENCLIP + "ln_final.weight", "conditioner.embedders.2.model.weight"],
     r"'conditioner\.embedders\.2\.model\.weight'.*not supported"),
    ("no-openclip", [f"{UNET}label_emb.0.0.weight", XL_TEXT + "final_layer_norm.weight"],
     r"without its OpenCLIP ViT-bigG.*'conditioner\.embedders\.1\.model\.\*'"),
    ("inpainting", [f"{UNET}input_blocks.0.0.weight", XL_TEXT + "final_layer_norm.weight",
                    XL_OPENCLIP + "ln_final.weight"],
     r"'model\.diffusion_model\.input_blocks\.0\.0\.weight' takes 9 input channels.*inpainting"),
])
def test_other_sdxl_files_are_refused_naming_the_key(tmp_path, xl, name, keys, match):
  path = _file(tmp_path, name, keys)
  for kw in ({"config_dir": xl.folder}, {"prediction_type": "epsilon"}):
    with pytest.raises(ModelFileError, match=match) as e:
      sf.load_single_file(path, **kw)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_sdxl_file_and_sd_configs_do_not_mix(xl, tmp_path):
  sd1 = tmp_path / "sd1-configs"       # an SD 1.x config folder (its weights are not read)
  raw = preset_configs("sd1")
  write_json(sd1 / "model_index.json", raw["model_index"])
  write_json(sd1 / "scheduler/scheduler_config.json", raw["scheduler"])
  for name in ("unet", "text_encoder", "vae"):
    write_json(sd1 / name / "config.json", raw[name])
  with pytest.raises(ConfigError, match=r"SDXL .* checkpoint but the configs describe an SD 1\.x"):
    sf.load_single_file(xl.file, config_dir=sd1)
  tensors = {k: v for k, v in load_file(str(xl.file)).items() if not k.startswith("conditioner.")}
  tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(2, np.float32)
  save_file(tensors, str(tmp_path / "sd1.safetensors"))
  with pytest.raises(ConfigError, match=r"SD 1\.x .* checkpoint but the configs describe an SDXL"):
    sf.load_single_file(tmp_path / "sd1.safetensors", config_dir=xl.folder)
  with pytest.raises(ModelFileError, match=r"'cond_stage_model\..*' is not a tensor of an SDXL"):
    sf.save_single_file(xl.pipe, tmp_path / "x.safetensors", base_single_file=_file(
        tmp_path, "sd1-extras", ["cond_stage_model.transformer.text_model.embeddings.position_ids"]))
