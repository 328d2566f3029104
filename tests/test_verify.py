"""`verify` on folders written by diffusers' own save_pretrained and by make-random-model."""

import pytest

from persona_jax import load_pipeline
from persona_jax.cli import main
from tests.markers import slow
from tests.torch_reference import randomize_affine_, require_torch


def diffusers_pipeline_folder(path, *, sd2: bool):
  """A random StableDiffusionPipeline written by diffusers/transformers themselves."""
  torch = require_torch()
  from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler,
                         StableDiffusionPipeline, UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

  from persona_jax.tokenizer import shipped_tokenizer_dir
  torch.manual_seed(0)
  if sd2:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type="v_prediction",
                                       steps_offset=1)
  else:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
  vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16)
  tokenizer = CLIPTokenizer.from_pretrained(shipped_tokenizer_dir(), local_files_only=True)
  text = CLIPTextModel(CLIPTextConfig(
      hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
      vocab_size=len(tokenizer), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
      hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32))
  for i, m in enumerate((unet, vae, text)):
    randomize_affine_(m, seed=i)
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 image_encoder=None, requires_safety_checker=False)
  pipe.save_pretrained(path, safe_serialization=True)
  return path


@pytest.fixture(scope="module", params=["sd2", pytest.param("sd1", marks=slow)])
def diffusers_folder(request, tmp_path_factory):
  return diffusers_pipeline_folder(tmp_path_factory.mktemp("diffusers") / request.param,
                                   sd2=request.param == "sd2")


def test_verify_passes_on_folder_saved_by_diffusers(diffusers_folder, capsys):
  """Our loader reads diffusers' own files (~50 config keys, transformers 5 tokenizer.json,
  another scheduler class) and every output matches within 1e-5 relative."""
  assert main(["verify", str(diffusers_folder), "--tolerance", "1e-5"]) == 0
  out = capsys.readouterr().out
  for name in ("text_encoder.last_hidden_state", "text_encoder.pooled", "unet", "vae.encode.mean",
               "vae.decode"):
    assert name in out
  assert out.strip().endswith("PASS")


@slow
def test_verify_passes_on_make_random_model_folder(model_dirs, capsys):
  require_torch()
  assert main(["verify", str(model_dirs["sd1"])]) == 0
  out = capsys.readouterr().out
  assert "ddim 3 steps, cfg 7.5: images" in out and out.strip().endswith("PASS")


@slow
def test_verify_fails_when_outputs_differ(model_dirs, monkeypatch, capsys):
  """A conversion error (here: one bias off by 1) makes verify report FAIL and exit non-zero."""
  require_torch()
  import persona_jax.verify as verify_module
  pipe = load_pipeline(model_dirs["sd1"])
  bias = pipe.params["unet"]["conv_out"]["bias"]
  pipe.params["unet"]["conv_out"]["bias"] = bias + 1.0
  monkeypatch.setattr(verify_module, "load_pipeline", lambda *a, **k: pipe)
  assert main(["verify", str(model_dirs["sd1"])]) == 1
  out = capsys.readouterr().out
  assert "FAIL" in out.splitlines()[-1]
  assert [line for line in out.splitlines() if line.startswith("unet ")][0].endswith("FAIL")


def test_make_random_model_command_reports_components(tmp_path, capsys):
  assert main(["make-random-model", str(tmp_path / "m"), "--preset", "sd2"]) == 0
  out = capsys.readouterr().out
  assert "UNet2DConditionModel" in out and "v_prediction" in out and "linear proj" in out
  assert main(["make-random-model", str(tmp_path / "m")]) == 2       # exists: a clear error
  assert "not empty" in capsys.readouterr().err
