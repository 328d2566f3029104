"""The config of BLIP-Diffusion's Q-Former: transformers' `Blip2Config` as `qformer/config.json`
holds it (`model_type` "blip-2", a `vision_config` and a `qformer_config` nested, and
`num_query_tokens`), read with the strictness rule of `configs.read_config`.

The release (Salesforce/blipdiffusion) was built as `Blip2Config(vision_config={1024 wide, 23
layers, 16 heads, 224 px in 14 px patches, quick_gelu}, qformer_config={cross_attention_frequency
1, encoder_hidden_size 1024, vocab_size 30523}, num_query_tokens=16)`; the rest are
transformers' defaults (Q-Former 768 wide, 12 layers, 12 heads, gelu, layer_norm_eps 1e-12).
Its `text_config` (BLIP-2's OPT language model) is not part of the network and is not read.
Dropout probabilities are read for nothing: the networks here run without dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from persona_jax.errors import ConfigError
from persona_jax.models.configs import CLIP_ACTIVATIONS, TRANSFORMERS_GENERIC_KEYS, read_config

_RUNTIME = {"runtime": True}
_SUB_CONFIG_IGNORED = TRANSFORMERS_GENERIC_KEYS | {"eos_token_id"}
# Keys of the top-level Blip2Config that do not shape the Q-Former (the language model's part,
# the tokenizer's name: `Blip2QFormerModel` reads it, our tokenizer is given separately).
_TOP_LEVEL_IGNORED = TRANSFORMERS_GENERIC_KEYS | {
    "text_config", "use_decoder_only_language_model", "image_text_hidden_size",
    "image_token_index", "tokenizer"}


def _check(raw, source: str, model_type: str) -> Mapping:
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
  found = raw.get("model_type", model_type)
  if found != model_type:
    raise ConfigError(f"{source}: model_type '{found}' where BLIP-2's '{model_type}' belongs")
  return raw


def _check_width(source: str, hidden: int, heads: int, act: str) -> None:
  if act not in CLIP_ACTIVATIONS:
    raise ConfigError(f"{source}: hidden_act '{act}' is not supported ({', '.join(CLIP_ACTIVATIONS)})")
  if hidden % heads:
    raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")


@dataclasses.dataclass(frozen=True)
class Blip2VisionConfig:
  """transformers `Blip2VisionConfig`: the ViT whose last hidden state the Q-Former attends to."""
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  attention: str = dataclasses.field(default="auto", metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="qformer/config.json: vision_config") -> "Blip2VisionConfig":
    return read_config(cls, _check(raw, source, "blip_2_vision_model"), source=source,
                       ignored=_SUB_CONFIG_IGNORED,
                       unsupported={"qkv_bias": True, "attention_dropout": 0.0})

  def validate(self, source: str) -> None:
    _check_width(source, self.hidden_size, self.num_attention_heads, self.hidden_act)
    if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
      raise ConfigError(f"{source}: image_size and patch_size must be single numbers (square "
                        "images and patches)")
    if not 0 < self.patch_size <= self.image_size:
      raise ConfigError(f"{source}: patch_size {self.patch_size} does not fit image_size "
                        f"{self.image_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class Blip2QFormerConfig:
  """transformers `Blip2QFormerConfig`: the BERT-style Q-Former. Its cross-attention's key and
  value width is the vision tower's `hidden_size` (transformers overrides `encoder_hidden_size`
  with it, and so does `Blip2Config.from_dict`)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata=_RUNTIME)

  @classmethod
  def from_dict(cls, raw, source="qformer/config.json: qformer_config") -> "Blip2QFormerConfig":
    return read_config(
        cls, _check(raw, source, "blip_2_qformer"), source=source,
        ignored=_SUB_CONFIG_IGNORED | {"hidden_dropout_prob", "attention_probs_dropout_prob",
                                       "use_qformer_text_input"},
        unsupported={"position_embedding_type": "absolute"})

  def validate(self, source: str) -> None:
    _check_width(source, self.hidden_size, self.num_attention_heads, self.hidden_act)
    if self.cross_attention_frequency < 1:
      raise ConfigError(f"{source}: cross_attention_frequency {self.cross_attention_frequency} "
                        "must be at least 1")

  def has_cross_attention(self, layer: int) -> bool:
    """Whether Q-Former layer `layer` attends to the image (every `cross_attention_frequency`)."""
    return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """transformers `Blip2Config` as BLIP-Diffusion's `qformer/config.json` holds it."""
  vision_config: Blip2VisionConfig = Blip2VisionConfig()
  qformer_config: Blip2QFormerConfig = Blip2QFormerConfig()
  num_query_tokens: int = 32

  @classmethod
  def from_dict(cls, raw, source="qformer/config.json") -> "Blip2Config":
    raw = _check(raw, source, "blip-2")
    vision = Blip2VisionConfig.from_dict(raw.get("vision_config") or {},
                                         f"{source}: vision_config")
    qformer = Blip2QFormerConfig.from_dict(raw.get("qformer_config") or {},
                                           f"{source}: qformer_config")
    qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
    rest = {k: v for k, v in raw.items() if k not in ("vision_config", "qformer_config")}
    top = read_config(_TopLevel, rest, source=source, ignored=_TOP_LEVEL_IGNORED)
    return cls(vision, qformer, top.num_query_tokens)

  def with_dtype(self, dtype, attention: str = "auto") -> "Blip2Config":
    """The same shapes computing (and keeping params) in `dtype`, the vision tower with the
    attention kernel `attention`."""
    return Blip2Config(
        dataclasses.replace(self.vision_config, dtype=dtype, param_dtype=dtype, attention=attention),
        dataclasses.replace(self.qformer_config, dtype=dtype, param_dtype=dtype),
        self.num_query_tokens)


@dataclasses.dataclass(frozen=True)
class _TopLevel:
  """The top-level keys of Blip2Config besides the two nested configs."""
  num_query_tokens: int = 32

  def validate(self, source: str) -> None:
    if self.num_query_tokens < 1:
      raise ConfigError(f"{source}: num_query_tokens {self.num_query_tokens} must be at least 1")
