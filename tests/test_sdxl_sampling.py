"""SDXL end to end: `verify` on an SDXL folder written by diffusers' own save_pretrained (per-layer
transformer depths, a level without attention, transformers' byte-level BPE tokenizers, a
DPM-Solver++ 2M Karras scheduler), and `sample` / `make-class-images` on the tiny SDXL model with
a sampler and micro-conditioning of their own."""

import numpy as np
from PIL import Image

from persona_jax.cli import main
from tests.markers import slow
from tests.torch_reference import randomize_affine_, require_torch


def diffusers_sdxl_folder(path, unet_config: dict, scheduler=None,
                          force_zeros_for_empty_prompt: bool = True):
  """A random StableDiffusionXLPipeline written by diffusers/transformers themselves (scheduler
  default: DPM-Solver++ 2M with Karras sigmas)."""
  torch = require_torch()
  from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline,
                         UNet2DConditionModel)
  from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                            CLIPTokenizer)

  from persona_jax.tokenizer import shipped_tokenizer_dir
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**unet_config)
  vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                      scaling_factor=0.13025, force_upcast=True)
  tokenizer = CLIPTokenizer.from_pretrained(shipped_tokenizer_dir(), local_files_only=True)
  tokenizer_2 = CLIPTokenizer.from_pretrained(shipped_tokenizer_dir(), local_files_only=True,
                                              pad_token="!")
  common = dict(vocab_size=len(tokenizer), bos_token_id=49406, eos_token_id=49407,
                num_hidden_layers=2, projection_dim=24)
  text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      hidden_act="quick_gelu", pad_token_id=49407, **common))
  text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
      hidden_size=48, intermediate_size=64, num_attention_heads=2, hidden_act="gelu",
      pad_token_id=0, **common))
  for i, m in enumerate((unet, vae, text, text_2)):
    randomize_affine_(m, seed=i)
  scheduler = scheduler or DPMSolverMultistepScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
      timestep_spacing="leading", use_karras_sigmas=True)
  pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                   tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                   scheduler=scheduler,
                                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
  pipe.save_pretrained(path, safe_serialization=True)
  return path


def test_verify_passes_on_an_sdxl_folder_saved_by_diffusers(sdxl_pipe, tmp_path, capsys):
  from persona_jax import load_pipeline
  from tests.models.test_sdxl import per_layer_unet_config
  folder = diffusers_sdxl_folder(tmp_path / "sdxl", per_layer_unet_config(sdxl_pipe))
  pipe = load_pipeline(folder)
  assert pipe.is_sdxl and pipe.unet_config.down_transformer_layers == ((1, 1), (2, 1))
  assert pipe.unet_config.down_block_types[0] == "DownBlock2D"
  assert (folder / "tokenizer_2" / "tokenizer.json").is_file()         # byte-level BPE, fast
  assert pipe.tokenizer_2.pad_token == "!"
  assert main(["verify", str(folder)]) == 0
  out = capsys.readouterr().out
  for line in ("text_encoder_2.text_embeds (projected)", "unet (added conditioning)",
               "dpmpp_2m_karras 3 steps, cfg 7.5: images"):
    assert line in out
  assert "FAIL" not in out and out.rstrip().endswith("PASS")


@slow
def test_verify_passes_on_another_sdxl_configuration(sdxl_pipe, tmp_path, capsys):
  """Conv projections, upcast attention, one depth per level, a v-prediction zero-terminal-SNR
  Euler schedule with trailing spacing, and the encoded empty negative prompt
  (force_zeros_for_empty_prompt false)."""
  require_torch()
  from diffusers import EulerDiscreteScheduler
  raw = {k: v for k, v in sdxl_pipe.raw_configs["unet"].items() if not k.startswith("_")}
  unet = dict(raw, use_linear_projection=False, upcast_attention=True,
              transformer_layers_per_block=2, attention_head_dim=4)
  scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012, prediction_type="v_prediction",
                                     rescale_betas_zero_snr=True, timestep_spacing="trailing")
  folder = diffusers_sdxl_folder(tmp_path / "sdxl", unet, scheduler,
                                 force_zeros_for_empty_prompt=False)
  assert main(["verify", str(folder)]) == 0
  out = capsys.readouterr().out
  assert "euler 3 steps" in out and out.rstrip().endswith("PASS")


def test_sample_and_class_images_on_sdxl_with_a_sampler_and_micro_conditioning(sdxl_dir, tmp_path,
                                                                              capsys):
  flags = ["--model", str(sdxl_dir), "--steps", "2", "--scheduler", "euler_ancestral",
           "--original-size", "64", "48", "--crops-coords-top-left", "8", "0",
           "--height", "32", "--width", "48", "--batch-size", "2"]
  out = tmp_path / "samples"
  assert main(["sample", *flags, "--prompt", "a photo of a dog", "--num-images", "2",
               "--out", str(out)]) == 0
  first = np.asarray(Image.open(out / "0000_0000.png"))
  assert first.shape == (32, 48, 3) and first.std() > 0
  assert not np.array_equal(first, np.asarray(Image.open(out / "0000_0001.png")))
  # make-class-images samples through the same function: image i is sample's image i.
  classes = tmp_path / "classes"
  assert main(["make-class-images", *flags, "--prompt", "a photo of a dog", "--num", "2",
               "--out", str(classes)]) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(classes / "class-00000.png")), first)
  # Another micro-conditioning is another image.
  again = tmp_path / "again"
  flags[flags.index("--original-size") + 1] = "1024"
  assert main(["sample", *flags, "--prompt", "a photo of a dog", "--out", str(again)]) == 0
  assert not np.array_equal(np.asarray(Image.open(again / "0000_0000.png")), first)


def test_sdxl_flags_on_an_sd1_model_are_refused(model_dirs, tmp_path, capsys):
  assert main(["sample", "--model", str(model_dirs["sd1"]), "--prompt", "x", "--original-size",
               "64", "64", "--out", str(tmp_path)]) == 2
  assert "--original-size is SDXL's micro-conditioning" in capsys.readouterr().err


def test_negative_prompts_guidance_and_methods_on_sdxl_as_diffusers_takes_them(sdxl_pipe, pipes):
  """No negative prompt is zeros (force_zeros_for_empty_prompt), an explicit "" is encoded, as
  diffusers does for None and ""; the guidance default is 5 on SDXL, 7.5 else; a method's own
  conditioning on SDXL is a one-line error before anything compiles."""
  import pytest

  from persona_jax.diffusion.conditioning import TextConditioning
  from persona_jax.errors import ConfigError
  from persona_jax.text_to_image import (SampleOptions, Sampling, prompt_inputs, text_to_image,
                                         with_pipeline_defaults)
  inputs = prompt_inputs(sdxl_pipe, sdxl_pipe.tokenizer, ["a", "b", "c"], [None, "", "blurry"],
                         SampleOptions(), (32, 32))
  np.testing.assert_array_equal(inputs["negative_zero"], [True, False, False])
  np.testing.assert_array_equal(inputs["negative_ids"][0], inputs["negative_ids"][1])
  assert inputs["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 3
  assert with_pipeline_defaults(SampleOptions(), sdxl_pipe).guidance == 5.0
  assert with_pipeline_defaults(SampleOptions(), pipes["sd1"]).guidance == 7.5
  assert with_pipeline_defaults(SampleOptions(guidance=3.0), sdxl_pipe).guidance == 3.0

  class MethodConditioning(TextConditioning):
    sdxl = False
  with pytest.raises(ConfigError, match="MethodConditioning: this method samples on SD 1.x/2.x"):
    text_to_image(sdxl_pipe, "a", sampling=Sampling(conditioning=MethodConditioning()))


def sdxl_kohya_lora(path):
  """A kohya SDXL file (SGM block names) adapting one layer."""
  from persona_jax.convert.files import write_safetensors
  key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
  rng = np.random.default_rng(0)
  write_safetensors(path, {f"{key}.lora_down.weight": rng.normal(0, 0.1, (4, 64)).astype(np.float32),
                           f"{key}.lora_up.weight": rng.normal(0, 0.1, (64, 4)).astype(np.float32),
                           f"{key}.alpha": np.asarray(8.0, np.float32)})
  return path


def test_an_sdxl_kohya_lora_merges_into_its_layer(sdxl_pipe, tmp_path):
  from persona_jax import tree
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  lora = sdxl_kohya_lora(tmp_path / "sdxl_kohya.safetensors")
  base = tree.flatten(sdxl_pipe.params)
  merged = tree.flatten(with_loras(sdxl_pipe.params, [LoRASpec.parse(str(lora))],
                                   sdxl_pipe.unet_config))
  assert [p for p, v in merged.items() if not np.array_equal(v, base[p])] == [
      "unet/down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel"]


@slow
def test_verify_lora_on_sdxl(sdxl_dir, tmp_path, capsys):
  """`verify --lora` on SDXL: diffusers' StableDiffusionXLPipeline.load_lora_weights against ours
  (tests/convert/test_lora_formats_sdxl.py compares the same outputs by default)."""
  lora = sdxl_kohya_lora(tmp_path / "sdxl_kohya.safetensors")
  assert main(["verify", str(sdxl_dir), "--lora", str(lora)]) == 0
  assert "PASS" in capsys.readouterr().out
