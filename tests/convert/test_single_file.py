"""Original single-file checkpoints (LDM layout): our export loads in diffusers' `from_single_file`
with the folder's exact weights and outputs; our import reads our files and files written by the
logic of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` to the folder's
exact params; errors name what to pass or the offending tensor.

The SD 2.x "base single file" (24-layer OpenCLIP, of which diffusers keeps 23) is built here: our
converter's tensors plus a random extra last text layer, `text_projection` and `logit_scale`, as
an original SD 2.x file has them. No real SD 2.x single file can be built offline.
"""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persona_jax.convert import single_file as sf
from persona_jax.convert import single_file_layout as sfl
from persona_jax.convert.diffusers import params_to_state_dict
from persona_jax.errors import ConfigError, ModelFileError, PickleRefusedError
from persona_jax.convert.diffusers_folder import parse_configs
from persona_jax.pipeline import load_pipeline

PRESETS = ("sd1", "sd2")
EXTRA_LAYER = "cond_stage_model.model.transformer.resblocks.3."     # the tiny sd2 has 3 layers


def configs_of(pipe):
  """The typed configs of a pipeline (text_encoder_2 None unless SDXL)."""
  return {"unet": pipe.unet_config, "text_encoder": pipe.text_encoder_config,
          "vae": pipe.vae_config, "text_encoder_2": pipe.text_encoder_2_config}


def assert_params_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), path


@pytest.fixture(scope="module")
def sd2_base(pipes, tmp_path_factory):
  """An original-style SD 2.x single file of the sd2 model: + extra layer, projection, scale."""
  pipe = pipes["sd2"]
  tensors = sf.state_dict_to_single_file(
      {n: params_to_state_dict(pipe.params[n]) for n in sfl.COMPONENTS}, configs_of(pipe))
  rng = np.random.default_rng(7)
  for key in [k for k in tensors if ".resblocks.0." in k]:
    tensors[key.replace(".resblocks.0.", ".resblocks.3.")] = rng.standard_normal(
        tensors[key].shape).astype(np.float32)
  tensors["cond_stage_model.model.text_projection"] = rng.standard_normal((32, 32)).astype(np.float32)
  tensors["cond_stage_model.model.logit_scale"] = np.array(4.6052, np.float32)
  path = tmp_path_factory.mktemp("base") / "sd2-base.safetensors"
  save_file(tensors, str(path), metadata={"format": "pt"})
  return path


@pytest.fixture(scope="module")
def files(pipes, sd2_base, tmp_path_factory):
  """Our single-file export of each random model."""
  out = tmp_path_factory.mktemp("single")
  return {p: sf.save_single_file(pipes[p], out / f"{p}.safetensors",
                                 base_single_file=sd2_base if p == "sd2" else None)
          for p in PRESETS}


@pytest.fixture(scope="module")
def loaded(files, model_dirs):
  return {p: sf.load_single_file(files[p], config_dir=model_dirs[p]) for p in PRESETS}


# --- export -> diffusers' from_single_file ---------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_loads_our_single_file(preset, files, model_dirs):
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionPipeline
  from diffusers.utils import logging as dlogging
  dlogging.set_verbosity_error()
  dlogging.disable_progress_bar()
  kw = dict(safety_checker=None, local_files_only=True)
  ours = StableDiffusionPipeline.from_single_file(str(files[preset]), config=str(model_dirs[preset]), **kw)
  ref = StableDiffusionPipeline.from_pretrained(str(model_dirs[preset]), **kw)
  assert ours.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
  for name in ("unet", "vae", "text_encoder"):
    a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
    assert a.keys() == b.keys(), name
    for k in b:
      assert torch.equal(a[k], b[k]), (name, k)
    model = getattr(ref, name)   # a random init, to show the comparison has teeth:
    fresh = (type(model)(model.config) if name == "text_encoder" else
             type(model).from_config(model.config)).state_dict()
    assert any(not torch.equal(fresh[k], b[k]) for k in b if b[k].is_floating_point()), name

  g = torch.Generator().manual_seed(0)
  latents = torch.randn(2, 4, 16, 16, generator=g)
  images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
  ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407] + [49407] * 3])
  with torch.no_grad():
    outs = []
    for pipe in (ours, ref):
      ctx = pipe.text_encoder(ids).last_hidden_state
      eps = pipe.unet(latents, torch.tensor([10, 900]), ctx.expand(2, -1, -1)).sample
      dec = pipe.vae.decode(latents[:1]).sample
      enc = pipe.vae.encode(images).latent_dist.mean
      outs.append((ctx, eps, dec, enc))
  for x, y in zip(*outs):
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sd2_file_carries_the_base_extras_and_is_float32(files, sd2_base):
  ours, base = load_file(str(files["sd2"])), load_file(str(sd2_base))
  extras = [k for k in base if k.startswith(EXTRA_LAYER) or k.endswith(("text_projection", "logit_scale"))]
  assert len(extras) == 14
  for k in extras:
    assert np.array_equal(ours[k], base[k]), k
  assert ours.keys() == base.keys()
  assert {v.dtype for v in ours.values()} == {np.dtype(np.float32)}
  from safetensors import safe_open
  with safe_open(str(files["sd2"]), framework="numpy") as f:
    meta = f.metadata()
  assert meta.pop("format") == "pt" and len(meta.pop("persona_jax_digest")) == 32 and not meta
  w = ours["first_stage_model.encoder.mid.attn_1.q.weight"]
  assert w.ndim == 4 and w.shape[2:] == (1, 1)
  assert ours["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)


def test_sd2_export_needs_the_base_single_file(pipes, tmp_path):
  with pytest.raises(ConfigError, match="base_single_file.*diffusers folder"):
    sf.save_single_file(pipes["sd2"], tmp_path / "x.safetensors")
  assert not (tmp_path / "x.safetensors").exists()


def test_float16_export(pipes, tmp_path):
  path = sf.save_single_file(pipes["sd1"], tmp_path / "half.safetensors", dtype=np.float16)
  tensors = load_file(str(path))
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
  key = "model.diffusion_model.input_blocks.0.0.weight"
  np.testing.assert_array_equal(
      tensors[key], np.asarray(pipes["sd1"].params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1)
      .astype(np.float16))


# --- import ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_import_of_our_file_is_bit_exact(preset, loaded, pipes, sd2_base):
  got = loaded[preset]
  assert isinstance(got, sf.SingleFilePipeline)
  assert_params_equal(got.params, pipes[preset].params)
  assert got.raw_configs == pipes[preset].raw_configs
  assert got.scheduler_config == pipes[preset].scheduler_config
  if preset == "sd2":
    base = load_file(str(sd2_base))
    assert sorted(got.extras) == sorted(k for k in base if k.startswith(EXTRA_LAYER)
                                        or k.endswith(("text_projection", "logit_scale")))
    for k, v in got.extras.items():
      assert np.array_equal(v, base[k])
  else:
    assert got.extras == {}


def test_reexport_from_a_loaded_sd2_file_needs_no_base(loaded, files, tmp_path):
  """The extras loaded with the file go back out: the file comes back tensor for tensor."""
  again = sf.save_single_file(loaded["sd2"], tmp_path / "again.safetensors")
  a, b = load_file(str(again)), load_file(str(files["sd2"]))
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)


def _script_convert(folder, sd2: bool, n_vae_blocks: int = 2):
  """diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, its prefix tables and
  string replacements (UNet as written: its hard-coded indices fit these layers_per_block=2
  models whose up block 0 has no attention; VAE with 4 blocks -> n; SD 2.x text encoder from the
  script's v2.0 branch; VAE attention with today's to_q/... names)."""
  unet = load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))
  vae = load_file(str(folder / "vae/diffusion_pytorch_model.safetensors"))
  text = load_file(str(folder / "text_encoder/model.safetensors"))

  unet_map = [("time_embed.0.weight", "time_embedding.linear_1.weight"),
              ("time_embed.0.bias", "time_embedding.linear_1.bias"),
              ("time_embed.2.weight", "time_embedding.linear_2.weight"),
              ("time_embed.2.bias", "time_embedding.linear_2.bias"),
              ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
              ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
              ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias")]
  resnet_map = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
                ("skip_connection", "conv_shortcut")]
  layer_map = []
  for i in range(4):
    for j in range(2):
      layer_map.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
      if i < 3:
        layer_map.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(3):
      layer_map.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
      if i > 0:
        layer_map.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
      layer_map.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
      layer_map.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
  layer_map.append(("middle_block.1.", "mid_block.attentions.0."))
  for j in range(2):
    layer_map.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
  mapping = {k: k for k in unet}
  for sd_name, hf_name in unet_map:
    mapping[hf_name] = sd_name
  for k, v in mapping.items():
    if "resnets" in k:
      for sd_part, hf_part in resnet_map:
        v = v.replace(hf_part, sd_part)
      mapping[k] = v
  for k, v in mapping.items():
    for sd_part, hf_part in layer_map:
      v = v.replace(hf_part, sd_part)
    mapping[k] = v
  out = {"model.diffusion_model." + v: unet[k] for k, v in mapping.items()}

  out.update(vae_file_tensors(vae, n_vae_blocks))
  if not sd2:
    out.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    return out
  out.update(openclip_file_tensors(text, "cond_stage_model.model."))
  return out


def vae_file_tensors(vae: dict, n: int) -> dict:
  """The conversion script's VAE part: diffusers' AutoencoderKL keys of an n-block VAE ->
  `first_stage_model.*`, mid-block attention weights as (C, C, 1, 1) convs."""
  vae_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.attn_1.", "mid_block.attentions.0.")]
  for i in range(n):
    for j in range(2):
      vae_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
    if i < n - 1:
      vae_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
      vae_map.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(3):
      vae_map.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
  for i in range(2):
    vae_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
  attn_map = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
              ("proj_out.", "to_out.0.")]
  out = {}
  for k, w in vae.items():
    v = k
    for sd_part, hf_part in vae_map:
      v = v.replace(hf_part, sd_part)
    if "attentions" in k:
      for sd_part, hf_part in attn_map:
        v = v.replace(hf_part, sd_part)
    if any(f"mid.attn_1.{name}.weight" in v for name in ("q", "k", "v", "proj_out")):
      w = w.reshape(*w.shape, 1, 1)
    out["first_stage_model." + v] = w
  return out


def openclip_file_tensors(text: dict, prefix: str) -> dict:
  """The conversion scripts' OpenCLIP part: transformers CLIP text keys -> OpenCLIP keys under
  `prefix`, q/k/v fused into `in_proj_*`, a `text_projection.weight` (SDXL) written as the
  matrix of x @ P."""
  import re
  conversions = [("resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"),
                 ("ln_2", "layer_norm2"), (".c_fc.", ".fc1."), (".c_proj.", ".fc2."),
                 (".attn", ".self_attn"), ("ln_final.", "transformer.text_model.final_layer_norm."),
                 ("token_embedding.weight", "transformer.text_model.embeddings.token_embedding.weight"),
                 ("positional_embedding", "transformer.text_model.embeddings.position_embedding.weight")]
  protected = {re.escape(hf): sd for sd, hf in conversions}
  pattern = re.compile("|".join(protected))
  relabel = lambda k: pattern.sub(lambda m: protected[re.escape(m.group(0))], k)   # noqa: E731
  out, qkv = {}, {}
  for k, v in text.items():
    if k == "text_projection.weight":
      out[prefix + "text_projection"] = np.ascontiguousarray(v.T)
      continue
    k = "transformer." + k
    m = re.match(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$", k)
    if m:
      qkv.setdefault((m[1], m[3]), [None] * 3)["qkv".index(m[2])] = v
    else:
      out[prefix + relabel(k)] = v
  for (pre, kind), parts in qkv.items():
    out[f"{prefix}{relabel(pre)}.in_proj_{kind}"] = np.concatenate(parts)
  return out


@pytest.mark.parametrize("preset", PRESETS)
def test_import_of_a_file_from_diffusers_script_logic(preset, model_dirs, pipes, tmp_path):
  tensors = _script_convert(model_dirs[preset], sd2=preset == "sd2")
  ours = sf.state_dict_to_single_file(
      {n: params_to_state_dict(pipes[preset].params[n]) for n in sfl.COMPONENTS},
      configs_of(pipes[preset]))
  assert sorted(tensors) == sorted(ours)          # the same names as our exporter's
  path = tmp_path / f"{preset}-script.safetensors"
  save_file(tensors, str(path))
  got = sf.load_single_file(path, config_dir=model_dirs[preset])
  assert_params_equal(got.params, pipes[preset].params)
  assert got.extras == {}
  if preset == "sd2":   # the script drops OpenCLIP's last layer: such a file cannot be re-exported
    with pytest.raises(ConfigError, match="base_single_file"):
      sf.save_single_file(got, tmp_path / "out.safetensors")


def test_load_pipeline_accepts_a_single_file(files, model_dirs, pipes):
  got = load_pipeline(files["sd2"], config_dir=model_dirs["sd2"], prediction_type="epsilon")
  assert isinstance(got, sf.SingleFilePipeline) and got.path == files["sd2"]
  assert_params_equal(got.params, pipes["sd2"].params)
  assert got.scheduler_config.prediction_type == "epsilon"    # overrides the folder's v_prediction
  assert pipes["sd2"].scheduler_config.prediction_type == "v_prediction"
  with pytest.raises(ConfigError, match="single-file"):
    load_pipeline(model_dirs["sd1"], prediction_type="epsilon")


# --- errors ----------------------------------------------------------------------------------


def test_without_config_the_error_says_what_to_pass(files):
  with pytest.raises(ConfigError, match=r"config_dir= \(--config DIR\).*prediction_type= "
                                        r"\(--prediction-type epsilon\|v_prediction"):
    sf.load_single_file(files["sd1"])
  # A prediction type alone is not enough for non-standard widths: head counts are unknowable.
  with pytest.raises(ConfigError, match=r"head counts.*--config DIR"):
    sf.load_single_file(files["sd1"], prediction_type="epsilon")


def test_unknown_and_missing_tensors_are_named(files, model_dirs, tmp_path):
  tensors = load_file(str(files["sd1"]))
  bad = tmp_path / "unknown.safetensors"
  save_file({**tensors, "model.diffusion_model.input_blocks.1.2.weight": np.zeros(3, np.float32)},
            str(bad))
  with pytest.raises(ModelFileError, match=r"unknown\.safetensors.*'model\.diffusion_model\."
                                           r"input_blocks\.1\.2\.weight'"):
    sf.load_single_file(bad, config_dir=model_dirs["sd1"])
  gone = tmp_path / "missing.safetensors"
  save_file({k: v for k, v in tensors.items() if k != "first_stage_model.decoder.conv_out.bias"},
            str(gone))
  with pytest.raises(ModelFileError, match=r"missing\.safetensors.*missing.*"
                                           r"'first_stage_model\.decoder\.conv_out\.bias'"):
    sf.load_single_file(gone, config_dir=model_dirs["sd1"])


def test_known_extras_are_kept_and_wrong_family_is_refused(files, model_dirs, pipes, tmp_path):
  tensors = load_file(str(files["sd1"]))
  extra = {"alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),
           "model_ema.decay": np.array(0.9999, np.float32),
           "cond_stage_model.transformer.text_model.embeddings.position_ids":
               np.arange(77, dtype=np.int64)[None]}
  # The `vae.` prefix some tools write is read too.
  tensors = {("vae." + k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k): v
             for k, v in tensors.items()}
  path = tmp_path / "extras.safetensors"
  save_file({**tensors, **extra}, str(path))
  got = sf.load_single_file(path, config_dir=model_dirs["sd1"])
  assert_params_equal(got.params, pipes["sd1"].params)
  assert sorted(got.extras) == sorted(extra)
  with pytest.raises(ConfigError, match="SD 1.x.*SD 2.x"):
    sf.load_single_file(files["sd1"], config_dir=model_dirs["sd2"])


def test_pickles_need_allow_pickle(files, model_dirs, pipes, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "model.ckpt"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in load_file(str(files["sd1"])).items()}},
             str(path))
  with pytest.raises(PickleRefusedError, match=r"model\.ckpt.*allow"):
    sf.load_single_file(path, config_dir=model_dirs["sd1"])
  with pytest.raises(PickleRefusedError):
    load_pipeline(path, config_dir=model_dirs["sd1"])
  got = sf.load_single_file(path, config_dir=model_dirs["sd1"], allow_pickle=True)
  assert_params_equal(got.params, pipes["sd1"].params)


# --- config inference for standard SD files (shapes only: nothing full-size is allocated) -------


SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "use_linear_projection": False, "upcast_attention": False}
SD21_UNET = {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True, "upcast_attention": True}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_infer_configs_of_standard_sd_files(family):
  sd2 = family == "sd2"
  raw = sf.infer_configs(_standard_shapes(sd2), "v_prediction" if sd2 else "epsilon")
  unet, text, vae = raw["unet"], raw["text_encoder"], raw["vae"]
  for key, value in (SD21_UNET if sd2 else SD15_UNET).items():
    assert unet[key] == value, key
  assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["layers_per_block"] == 2
  assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
  assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
  assert unet["transformer_layers_per_block"] == 1
  assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
          text["hidden_act"]) == ((1024, 23, 16, "gelu") if sd2 else (768, 12, 12, "quick_gelu"))
  assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["layers_per_block"] == 2
  assert raw["scheduler"]["prediction_type"] == ("v_prediction" if sd2 else "epsilon")
  parse_configs(raw)   # valid for our models


def _standard_shapes(sd2: bool) -> dict:
  """{single-file key: ShapeDtypeStruct} of SD 1.5 / 2.1 (plus OpenCLIP's extra layer)."""
  unet = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
          "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32,
          "cross_attention_dim": 1024 if sd2 else 768,
          "attention_head_dim": [5, 10, 20, 20] if sd2 else 8, "use_linear_projection": sd2}
  text = {"hidden_size": 1024 if sd2 else 768, "intermediate_size": 4096 if sd2 else 3072,
          "num_attention_heads": 16 if sd2 else 12, "num_hidden_layers": 23 if sd2 else 12,
          "hidden_act": "gelu" if sd2 else "quick_gelu", "max_position_embeddings": 77}
  vae = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
  configs = parse_configs({"unet": unet, "text_encoder": text, "vae": vae, "scheduler": {}})
  tables = sfl.key_tables(configs)
  layout = sfl.single_file_layout(configs, tables)
  out = {}
  for name in sfl.COMPONENTS:
    for key, entry in tables[name].items():
      slot, shape = layout[name][key], entry.torch_shape()
      if slot.part is not None:
        shape = (3 * shape[0], *shape[1:])
      elif slot.conv1x1:
        shape = (*shape, 1, 1)
      out[slot.key] = jax.ShapeDtypeStruct(shape, np.float32)
  if sd2:
    for key in [k for k in out if ".resblocks.0." in k]:
      out[key.replace(".resblocks.0.", ".resblocks.23.")] = out[key]
    out["cond_stage_model.model.text_projection"] = jax.ShapeDtypeStruct((1024, 1024), np.float32)
  return out



def test_default_sd2_tokenizer_pads_with_exclamation_mark(tmp_path, monkeypatch):
  from persona_jax.tokenizer import load_tokenizer
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path))
  assert sf.default_tokenizer_dir("clip") == sf.shipped_tokenizer_dir()
  folder = sf.default_tokenizer_dir("openclip")
  assert folder.is_relative_to(tmp_path)
  assert load_tokenizer(folder).pad_token_id == 0
  assert load_tokenizer(sf.default_tokenizer_dir("clip")).pad_token_id == 49407
