"""Frozen config dataclasses of the networks, read strictly from each component's `config.json`.

Strictness rule (DESIGN.md section 5), applied by `read_config` to every component:
  * a key we implement is read into the dataclass;
  * a key we know but do not implement is accepted only at its default value, otherwise it is
    a `ConfigError` naming the file, the key and the value;
  * keys starting with `_` (`_class_name`, `_diffusers_version`, ...) and the generic keys of
    transformers' `PretrainedConfig` are metadata and ignored;
  * a key nobody told us about is accepted (with a log line) only when it is null or false.

Fields marked `runtime` (dtypes, the attention kernel) are not read from files: they are chosen
by the caller (`dataclasses.replace(config, dtype=jnp.bfloat16)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import jax.numpy as jnp

from persona_jax.errors import ConfigError

log = logging.getLogger(__name__)

_RUNTIME = {"runtime": True}

# Generic keys transformers' PretrainedConfig writes into every model config (4.x and 5.x).
TRANSFORMERS_GENERIC_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "use_bfloat16", "pruned_heads",
    "tie_word_embeddings", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "tf_legacy_loss", "torchscript", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sep_token_id", "decoder_start_token_id",
    "bos_token_id", "pad_token_id", "initializer_range", "initializer_factor",
})


def _tuple(x):
  """JSON lists as tuples, nested ones too (configs are hashable: static arguments of jit)."""
  return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def read_config(cls, raw: Mapping[str, Any], *, source: str,
                unsupported: Mapping[str, Any] = {}, ignored: Collection[str] = ()):
  """Builds the frozen dataclass `cls` from a decoded `config.json`, applying the strictness rule.

  Args:
    cls: a dataclass type; its non-runtime fields are the keys we implement.
    raw: the decoded JSON object.
    source: the file the dict came from, used in error messages.
    unsupported: keys we know but do not implement, with the only value we accept.
    ignored: further keys that do not affect the network (read for nothing, never an error).
  """
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("runtime")}
  values = {}
  for key, value in raw.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in fields:
      values[key] = _tuple(value)
    elif key in unsupported:
      default = unsupported[key]
      if _tuple(value) != _tuple(default):
        raise ConfigError(
            f"{source}: config key '{key}' = {value!r} is not supported by persona_jax "
            f"(only the default {default!r} is); use a model without it or remove the key.")
    elif value is None or value is False:
      log.info("%s: ignoring unknown config key '%s' = %r", source, key, value)
    else:
      raise ConfigError(
          f"{source}: unknown config key '{key}' = {value!r}; persona_jax does not know what it "
          f"changes. Check the spelling, or remove the key if it is at its default.")
  try:
    config = cls(**values)
  except TypeError as e:  # pragma: no cover - fields all have defaults
    raise ConfigError(f"{source}: {e}") from e
  config.validate(source)
  return config


def read_json(path) -> dict:
  """Reads a JSON file, with an error naming the file when it is missing or malformed."""
  from persona_jax.errors import ModelFileError
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ModelFileError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise ModelFileError(f"{path}: not valid JSON ({e})") from None


def _per_block(value, n: int, name: str, source: str) -> tuple:
  """An int (or None) broadcast to n blocks, or a list that must have n entries."""
  if isinstance(value, tuple):
    if len(value) != n:
      raise ConfigError(f"{source}: '{name}' has {len(value)} entries but the model has {n} blocks")
    return value
  return (value,) * n


def _per_layer(value, layers: int) -> tuple[int, ...]:
  """A level's transformer depth: an int for every layer, or a list with one per layer."""
  if isinstance(value, (tuple, list)):
    return tuple(int(v) for v in value)
  return (int(value),) * layers


# ----------------------------------------------------------------------------------------------
# UNet2DConditionModel


UNET_BLOCK_TYPES_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_BLOCK_TYPES_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")

# UNet2DConditionModel.__init__ arguments (diffusers 0.42) we do not implement, at their defaults.
UNET_UNSUPPORTED = {
    "only_cross_attention": False,
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers `UNet2DConditionModel` config (SD 1.x / 2.x / SDXL). `attention_head_dim` is the
  head count (per level or one for all).

  `transformer_layers_per_block`: an int, one per level, or one per layer of each level (a list
  of lists, then `reverse_transformer_layers_per_block` gives the up levels', as diffusers asks).
  SDXL's added conditioning: `addition_embed_type="text_time"`, `addition_time_embed_dim` (each of
  the 6 time ids' sinusoidal width) and `projection_class_embeddings_input_dim` (pooled text width
  + 6 * addition_time_embed_dim).
  """
  sample_size: int | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple = 1
  reverse_transformer_layers_per_block: tuple | None = None
  attention_head_dim: int | tuple[int, ...] = 8     # diffusers' name; in SD configs: number of heads
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  # Runtime choices, not read from config.json.
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  attention: str = dataclasses.field(default="auto", metadata=_RUNTIME)  # auto|einsum|xla|cudnn|blocked|splash
  remat: str = dataclasses.field(default="none", metadata=_RUNTIME)      # none|blocks|dots
  # Add-ons a method switches on (models/addons.py: added layers such as IP-Adapter's decoupled
  # cross-attention and InstantBooth's adapters, attention-map capture, detached context
  # tokens), called at the UNet's plug points; (): the base UNet.
  addons: tuple = dataclasses.field(default=(), metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="unet/config.json") -> "UNetConfig":
    return read_config(cls, raw, source=source, unsupported=UNET_UNSUPPORTED)

  def validate(self, source: str) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ConfigError(f"{source}: down_block_types, up_block_types and block_out_channels must "
                        f"have the same length ({len(self.down_block_types)}, "
                        f"{len(self.up_block_types)}, {n})")
    for t in self.down_block_types:
      if t not in UNET_BLOCK_TYPES_DOWN:
        raise ConfigError(f"{source}: down block type '{t}' is not supported "
                          f"(supported: {', '.join(UNET_BLOCK_TYPES_DOWN)})")
    for t in self.up_block_types:
      if t not in UNET_BLOCK_TYPES_UP:
        raise ConfigError(f"{source}: up block type '{t}' is not supported "
                          f"(supported: {', '.join(UNET_BLOCK_TYPES_UP)})")
    if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
      raise ConfigError(f"{source}: mid_block_type '{self.mid_block_type}' is not supported "
                        "(supported: UNetMidBlock2DCrossAttn or null)")
    if self.act_fn not in ACTIVATIONS:
      raise ConfigError(f"{source}: act_fn '{self.act_fn}' is not supported ({', '.join(ACTIVATIONS)})")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "attention_head_dim"):
      _per_block(getattr(self, name), n, name, source)
    self._check_transformer_layers(source)
    if self.addition_embed_type not in (None, "text_time"):
      raise ConfigError(f"{source}: config key 'addition_embed_type' = "
                        f"{self.addition_embed_type!r} is not supported (only SDXL's 'text_time', "
                        "or null)")
    if self.addition_embed_type == "text_time" and not (
        self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
      raise ConfigError(f"{source}: addition_embed_type 'text_time' needs addition_time_embed_dim "
                        "and projection_class_embeddings_input_dim")
    if self.addition_embed_type is None and self.projection_class_embeddings_input_dim is not None:
      raise ConfigError(f"{source}: projection_class_embeddings_input_dim without an "
                        "addition_embed_type or class_embed_type is not supported")
    if len(set(self.cross_attention_dims)) != 1:
      raise ConfigError(f"{source}: per-block cross_attention_dim with different values "
                        f"{self.cross_attention_dim} is not supported (one text encoder width)")
    for c, h in zip(self.block_out_channels, self.heads_per_block):
      if c % h:
        raise ConfigError(f"{source}: block width {c} is not divisible by its head count {h} "
                          "(attention_head_dim)")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"{source}: block width {c} is not divisible by norm_num_groups "
                          f"{self.norm_num_groups}")
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ConfigError(f"{source}: conv_in_kernel/conv_out_kernel must be odd")

  def _check_transformer_layers(self, source: str) -> None:
    """Per-layer depths: each down level's list has layers_per_block entries, each up level's
    (from reverse_transformer_layers_per_block) one more."""
    value, reverse = self.transformer_layers_per_block, self.reverse_transformer_layers_per_block
    per_layer = isinstance(value, tuple) and any(isinstance(v, (tuple, list)) for v in value)
    if per_layer and reverse is None:
      raise ConfigError(f"{source}: per-layer transformer_layers_per_block needs "
                        "reverse_transformer_layers_per_block (as diffusers asks)")
    try:
      down, up = self.down_transformer_layers, self.up_transformer_layers
    except ValueError as e:
      raise ConfigError(f"{source}: {e}") from None
    for i, layers in enumerate(self.layers_per_block_list):
      if len(down[i]) != layers:
        raise ConfigError(f"{source}: transformer_layers_per_block[{i}] has {len(down[i])} "
                          f"entries for {layers} layers")
      if len(up[-1 - i]) != layers + 1:
        raise ConfigError(f"{source}: the up level of down level {i} has {len(up[-1 - i])} "
                          f"transformer depths for {layers + 1} layers "
                          "(reverse_transformer_layers_per_block)")

  # Per-block views of the int-or-list fields, in down-block order.
  @property
  def layers_per_block_list(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block", "")

  @property
  def heads_per_block(self) -> tuple[int, ...]:
    return _per_block(self.attention_head_dim, len(self.block_out_channels), "attention_head_dim", "")

  @property
  def cross_attention_dims(self) -> tuple[int, ...]:
    return _per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim", "")

  @property
  def down_transformer_layers(self) -> tuple[tuple[int, ...], ...]:
    """Transformer depth of each layer of each down level: [level][layer]."""
    levels = _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                        "transformer_layers_per_block", "")
    return tuple(_per_layer(v, k) for v, k in zip(levels, self.layers_per_block_list))

  @property
  def mid_transformer_layers(self) -> int:
    """The mid block's transformer depth (diffusers: the last level's entry, its first layer's)."""
    levels = _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                        "transformer_layers_per_block", "")
    return _per_layer(levels[-1], 1)[0]

  @property
  def up_transformer_layers(self) -> tuple[tuple[int, ...], ...]:
    """Transformer depth of each layer of each up level (bottom first): [level][layer]."""
    n = len(self.block_out_channels)
    if self.reverse_transformer_layers_per_block is not None:
      levels = _per_block(self.reverse_transformer_layers_per_block, n,
                          "reverse_transformer_layers_per_block", "")
    else:
      levels = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block",
                          "")[::-1]
    layers = self.layers_per_block_list[::-1]
    return tuple(_per_layer(v, k + 1) for v, k in zip(levels, layers))

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# CLIP text encoder


CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """transformers `CLIPTextConfig` (the fields that shape the network).

  `with_projection` is not in config.json: the loader sets it for CLIPTextModelWithProjection
  (SDXL's text_encoder_2, by model_index.json's class).
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512          # the width of CLIPTextModelWithProjection's text_projection
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407          # 2 means the legacy rule: pool at the argmax of the ids
  with_projection: bool = dataclasses.field(default=False, metadata=_RUNTIME)
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  attention: str = dataclasses.field(default="auto", metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="text_encoder/config.json") -> "TextEncoderConfig":
    model_type = raw.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
      raise ConfigError(f"{source}: model_type '{model_type}' is not a CLIP text model")
    if model_type == "clip":   # a full CLIPModel config: use its text part
      raw = raw.get("text_config", {})
    return read_config(cls, raw, source=source, ignored=TRANSFORMERS_GENERIC_KEYS,
                       unsupported={"dropout": 0.0, "attention_dropout": 0.0})

  def validate(self, source: str) -> None:
    if self.hidden_act not in CLIP_ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act '{self.hidden_act}' is not supported "
                        f"({', '.join(CLIP_ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                        f"num_attention_heads {self.num_attention_heads}")


# ----------------------------------------------------------------------------------------------
# CLIP vision encoder


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers `CLIPVisionConfig` (the fields that shape the network).

  `with_projection` is not in config.json: the loader sets it when the weights hold
  `visual_projection` (CLIPVisionModelWithProjection).
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  with_projection: bool = dataclasses.field(default=False, metadata=_RUNTIME)
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  attention: str = dataclasses.field(default="auto", metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="image_encoder/config.json") -> "CLIPVisionConfig":
    model_type = raw.get("model_type", "clip_vision_model") if isinstance(raw, Mapping) else None
    if model_type not in (None, "clip_vision_model"):
      raise ConfigError(f"{source}: model_type '{model_type}' is not a CLIP vision model "
                        "(persona_jax reads CLIPVisionModel / CLIPVisionModelWithProjection folders)")
    return read_config(cls, raw, source=source, ignored=TRANSFORMERS_GENERIC_KEYS,
                       unsupported={"dropout": 0.0, "attention_dropout": 0.0})

  def validate(self, source: str) -> None:
    if self.hidden_act not in CLIP_ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act '{self.hidden_act}' is not supported "
                        f"({', '.join(CLIP_ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                        f"num_attention_heads {self.num_attention_heads}")
    if not 0 < self.patch_size <= self.image_size:
      raise ConfigError(f"{source}: patch_size {self.patch_size} does not fit image_size "
                        f"{self.image_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------------
# AutoencoderKL


VAE_UNSUPPORTED = {"shift_factor": None, "latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers `AutoencoderKL` config."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  force_upcast: bool = True          # diffusers decodes in float32 when True; we honour it in sampling
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  attention: str = dataclasses.field(default="auto", metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="vae/config.json") -> "VAEConfig":
    return read_config(cls, raw, source=source, unsupported=VAE_UNSUPPORTED)

  def validate(self, source: str) -> None:
    n = len(self.block_out_channels)
    if any(t != "DownEncoderBlock2D" for t in self.down_block_types) or len(self.down_block_types) != n:
      raise ConfigError(f"{source}: down_block_types must be {n} x DownEncoderBlock2D")
    if any(t != "UpDecoderBlock2D" for t in self.up_block_types) or len(self.up_block_types) != n:
      raise ConfigError(f"{source}: up_block_types must be {n} x UpDecoderBlock2D")
    if self.act_fn not in ACTIVATIONS:
      raise ConfigError(f"{source}: act_fn '{self.act_fn}' is not supported ({', '.join(ACTIVATIONS)})")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"{source}: block width {c} is not divisible by norm_num_groups "
                          f"{self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)
