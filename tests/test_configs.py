"""Config strictness for every component, and the scheduler config of other sampler classes."""

import pytest

from persona_jax import ConfigError
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.models.configs import TextEncoderConfig, UNetConfig, VAEConfig

# Real SD 1.5 files (as on the Hub): UNet, PNDM scheduler, transformers 4.22 text encoder.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD15_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


def test_sd15_configs_parse():
  u = UNetConfig.from_dict(SD15_UNET)
  assert u.heads_per_block == (8, 8, 8, 8) and u.cross_attention_dims == (768,) * 4
  assert u.downsample_factor == 8 and u.time_embed_dim == 1280
  t = TextEncoderConfig.from_dict(SD15_TEXT)
  assert t.eos_token_id == 2 and t.hidden_act == "quick_gelu"


def test_other_scheduler_class_read_for_schedule_and_logged(caplog):
  with caplog.at_level("INFO"):
    s = SchedulerConfig.from_dict(SD15_SCHEDULER)
  assert (s.beta_schedule, s.beta_start, s.steps_offset, s.set_alpha_to_one) == (
      "scaled_linear", 0.00085, 1, False)
  assert s.prediction_type == "epsilon" and s.class_name == "PNDMScheduler"
  assert "skip_prk_steps" in caplog.text


def test_ddim_scheduler_is_strict():
  with pytest.raises(ConfigError, match="unknown config key 'skip_prk_steps'"):
    SchedulerConfig.from_dict({**SD15_SCHEDULER, "_class_name": "DDIMScheduler"})
  with pytest.raises(ConfigError, match="prediction_type 'x0'"):
    SchedulerConfig.from_dict({"prediction_type": "x0"})
  with pytest.raises(ConfigError, match="timestep_spacing"):
    SchedulerConfig.from_dict({"timestep_spacing": "karras"})


def test_diffusers_full_config_dump_is_accepted():
  """diffusers writes ~50 keys into every UNet/VAE config; all at defaults must load."""
  diffusers = pytest.importorskip("diffusers")
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      norm_num_groups=8, layers_per_block=1)
  raw = dict(unet.config)
  assert len(raw) > 40
  UNetConfig.from_dict(raw)
  vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8)
  VAEConfig.from_dict(dict(vae.config))


@pytest.mark.parametrize("key,value", [("addition_embed_type", "image"),
                                       ("class_embed_type", "projection"),
                                       ("time_embedding_type", "fourier"),
                                       ("resnet_time_scale_shift", "scale_shift"),
                                       ("only_cross_attention", True)])
def test_unet_unsupported_non_defaults(key, value):
  with pytest.raises(ConfigError, match=f"'{key}'"):
    UNetConfig.from_dict({**SD15_UNET, key: value})


def test_sdxl_unet_keys_are_read_and_checked():
  """SDXL's added conditioning and per-layer depths are read; a text_time UNet without its
  widths, or per-layer depths without the reversed ones, are refused naming the key."""
  sdxl = {**SD15_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
          "projection_class_embeddings_input_dim": 2816}
  c = UNetConfig.from_dict(sdxl)
  assert c.addition_embed_type == "text_time" and c.projection_class_embeddings_input_dim == 2816
  with pytest.raises(ConfigError, match="'text_time' needs addition_time_embed_dim"):
    UNetConfig.from_dict({**sdxl, "addition_time_embed_dim": None})
  depths = {**SD15_UNET, "transformer_layers_per_block": [[1, 2], [1, 1], [2, 2], [1, 1]]}
  with pytest.raises(ConfigError, match="needs reverse_transformer_layers_per_block"):
    UNetConfig.from_dict(depths)
  c = UNetConfig.from_dict({**depths, "reverse_transformer_layers_per_block":
                            [[1, 1, 1], [3, 2, 1], [1, 1, 1], [2, 1, 2]]})
  assert c.down_transformer_layers[0] == (1, 2) and c.up_transformer_layers[1] == (3, 2, 1)
  assert c.mid_transformer_layers == 1
  hash(c)                                   # a static argument of jit: nested lists are tuples
  with pytest.raises(ConfigError, match="has 3 entries for 2 layers"):
    UNetConfig.from_dict({**depths, "transformer_layers_per_block": [[1, 2, 1]] + [[1, 1]] * 3,
                          "reverse_transformer_layers_per_block": [[1, 1, 1]] * 4})


def test_unknown_null_key_is_accepted(caplog):
  with caplog.at_level("INFO"):
    UNetConfig.from_dict({**SD15_UNET, "some_future_option": None})
  assert "some_future_option" in caplog.text


def test_vae_shift_factor_unsupported():
  with pytest.raises(ConfigError, match="'shift_factor' = 0.1159"):
    VAEConfig.from_dict({"block_out_channels": [32], "shift_factor": 0.1159})


def test_per_block_lengths_checked():
  with pytest.raises(ConfigError, match="'attention_head_dim' has 3 entries but the model has 4"):
    UNetConfig.from_dict({**SD15_UNET, "attention_head_dim": [5, 10, 20]})
