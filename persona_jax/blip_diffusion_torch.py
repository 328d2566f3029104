"""diffusers' deprecated BLIP-Diffusion networks (`Blip2QFormerModel` with its vision model,
`ContextCLIPTextModel`) made to run on transformers 5: the reference of `verify` and of the tests.

diffusers 0.42 still ships the classes (pipelines/deprecated/blip_diffusion/) but they were written
against transformers 4.x. What fails on transformers 5, found by running them, and each patch:

1. `Blip2QFormerModel.forward` calls `self.invert_attention_mask` and `self.get_head_mask`, two
   `ModuleUtilsMixin` helpers transformers 5 removed (AttributeError). `install_mask_helpers`
   puts transformers 4.x's versions back on the class: a [B, S] (or [B, T, S]) 0/1 mask ->
   an additive [B, 1, 1, S] mask of (1 - mask) * finfo.min; no head mask -> [None] * layers.
2. diffusers' `Blip2QFormerLayer` calls transformers' `Blip2QFormerAttention` with 4.x's
   signature `(hidden_states, attention_mask, head_mask, encoder_hidden_states,
   encoder_attention_mask, past_key_value, output_attentions)` and reads a tuple `(output, ...,
   present_key_value)`. The 5.x module takes `(hidden_states, attention_mask,
   encoder_hidden_states, encoder_attention_mask)` and returns the tensor alone, so the self
   attention gets `head_mask` as its encoder states, `[0]` picks the first example of the batch,
   and the cross-attention call is a TypeError. `_legacy_attention` gives each of the layers'
   attention modules (on the instance) a forward with 4.x's signature and return value.
3. `ContextCLIPTextModel` passes its causal mask as `causal_attention_mask`, a keyword
   transformers 5's `CLIPEncoder` no longer has: it reaches the attention kernel among **kwargs
   and is dropped, so the text encoder silently runs without the causal mask (every token sees
   the ones after it). `_causal_encoder` makes the instance's encoder add it to the attention
   mask, as 4.x's CLIPEncoder did.
4. `Blip2QFormerModel.__init__` builds `BertTokenizer.from_pretrained("bert-base-uncased")`
   (the hub: fails offline) unless the config names a tokenizer: `qformer_model` /
   `load_qformer` point `config.tokenizer` at a local tokenizer folder (or a tokenizer object,
   saved to a temporary folder first). The model then adds its `[DEC]` bos token, as it always did.

Shapes are as diffusers' classes have them (images NCHW). Imported only by verify and tests:
torch, diffusers and transformers (the verify extra) are imported when this module is.
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

import torch
from diffusers.pipelines.deprecated.blip_diffusion import modeling_blip2, modeling_ctx_clip
from transformers.models.blip_2.configuration_blip_2 import Blip2Config
from transformers.models.clip.configuration_clip import CLIPTextConfig


def _invert_attention_mask(self, encoder_attention_mask):
  """transformers 4.x `ModuleUtilsMixin.invert_attention_mask`."""
  if encoder_attention_mask.dim() == 3:
    extended = encoder_attention_mask[:, None, :, :]
  else:
    extended = encoder_attention_mask[:, None, None, :]
  extended = extended.to(dtype=self.dtype)
  return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
  """transformers 4.x `ModuleUtilsMixin.get_head_mask`, for the only case the pipeline uses."""
  if head_mask is not None:
    raise NotImplementedError("blip_diffusion_torch: head masks are not supported")
  return [None] * num_hidden_layers


def install_mask_helpers() -> None:
  """Patch 1: the removed mask helpers on diffusers' Blip2QFormerModel (idempotent)."""
  cls = modeling_blip2.Blip2QFormerModel
  if not hasattr(cls, "invert_attention_mask"):
    cls.invert_attention_mask = _invert_attention_mask
  if not hasattr(cls, "get_head_mask"):
    cls.get_head_mask = _get_head_mask


def _legacy_attention(module) -> None:
  """Patch 2: `module` (a transformers 5 Blip2QFormerAttention) called as in 4.x."""
  new_forward = type(module).forward

  def forward(self, hidden_states, attention_mask=None, head_mask=None,
              encoder_hidden_states=None, encoder_attention_mask=None, past_key_value=None,
              output_attentions=False):
    if head_mask is not None or past_key_value is not None or output_attentions:
      raise NotImplementedError("blip_diffusion_torch: head masks, caches and attention "
                                "outputs are not supported")
    out = new_forward(self, hidden_states, attention_mask=attention_mask,
                      encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_mask=encoder_attention_mask)
    return out, None           # (attention_output, present_key_value)

  module.forward = types.MethodType(forward, module)


def _causal_encoder(encoder) -> None:
  """Patch 3: the instance's CLIPEncoder adds `causal_attention_mask` to `attention_mask`."""
  new_forward = type(encoder).forward

  def forward(self, inputs_embeds, attention_mask=None, causal_attention_mask=None,
              output_attentions=None, output_hidden_states=None, return_dict=None):
    if output_attentions or output_hidden_states:
      raise NotImplementedError("blip_diffusion_torch: attention and hidden-state outputs are "
                                "not supported")
    mask = causal_attention_mask
    if attention_mask is not None:
      mask = attention_mask if mask is None else mask + attention_mask
    return new_forward(self, inputs_embeds, attention_mask=mask)

  encoder.forward = types.MethodType(forward, encoder)


def shim_qformer(model):
  """Patches 1 and 2 on a built diffusers Blip2QFormerModel; returns it (in eval mode)."""
  install_mask_helpers()
  for layer in model.encoder.layer:
    _legacy_attention(layer.attention)
    if layer.has_cross_attention:
      _legacy_attention(layer.crossattention)
  return model.eval()


def shim_context_text_encoder(model):
  """Patch 3 on a built ContextCLIPTextModel; returns it (in eval mode)."""
  _causal_encoder(model.text_model.encoder)
  return model.eval()


def _tokenizer_folder(tokenizer, scratch: Path) -> str:
  """A folder BertTokenizer.from_pretrained reads: `tokenizer` itself, or an object saved."""
  if isinstance(tokenizer, (str, Path)):
    return str(tokenizer)
  tokenizer.save_pretrained(scratch)
  return str(scratch)


def qformer_model(config: Blip2Config, tokenizer):
  """diffusers' Blip2QFormerModel(config), random weights, with the Q-Former's tokenizer read
  from `tokenizer` (a folder holding a BERT vocab.txt, or a tokenizer object); shimmed."""
  install_mask_helpers()
  with tempfile.TemporaryDirectory() as scratch:
    config.tokenizer = _tokenizer_folder(tokenizer, Path(scratch))
    model = modeling_blip2.Blip2QFormerModel(config)
  return shim_qformer(model)


def load_qformer(folder, tokenizer):
  """A BLIP-Diffusion `qformer/` folder in diffusers' deprecated class, on `tokenizer`; shimmed."""
  install_mask_helpers()
  config = Blip2Config.from_pretrained(folder)
  with tempfile.TemporaryDirectory() as scratch:
    config.tokenizer = _tokenizer_folder(tokenizer, Path(scratch))
    model = modeling_blip2.Blip2QFormerModel.from_pretrained(folder, config=config)
  return shim_qformer(model.float())          # float32 whatever the file's dtype (the toy's: float16)


def context_text_encoder(config: CLIPTextConfig):
  """diffusers' ContextCLIPTextModel(config), random weights; shimmed."""
  return shim_context_text_encoder(modeling_ctx_clip.ContextCLIPTextModel(config))


def load_context_text_encoder(folder):
  """A BLIP-Diffusion `text_encoder/` folder as diffusers' ContextCLIPTextModel; shimmed."""
  model = modeling_ctx_clip.ContextCLIPTextModel.from_pretrained(folder)
  return shim_context_text_encoder(model.float())


def tiny_blip2_config(*, vocab_size: int, hidden_size: int = 32, vision_hidden_size: int = 24,
                      num_query_tokens: int = 4, image_size: int = 28, patch_size: int = 14,
                      qformer_layers: int = 2, vision_layers: int = 2, heads: int = 4,
                      cross_attention_frequency: int = 1,
                      max_position_embeddings: int = 32) -> Blip2Config:
  """A small Blip2Config shaped like the release's (quick_gelu vision tower, BERT Q-Former)."""
  return Blip2Config(
      vision_config=dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                         num_hidden_layers=vision_layers, num_attention_heads=heads,
                         image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu"),
      qformer_config=dict(vocab_size=vocab_size, hidden_size=hidden_size,
                          num_hidden_layers=qformer_layers, num_attention_heads=heads,
                          intermediate_size=2 * hidden_size,
                          max_position_embeddings=max_position_embeddings,
                          cross_attention_frequency=cross_attention_frequency,
                          encoder_hidden_size=vision_hidden_size),
      num_query_tokens=num_query_tokens)


def query_embeddings(qformer, pixel_values, categories: list[str]):
  """As BlipDiffusionPipeline.get_query_embeddings: [B, 3, H, W] images and the subject
  categories -> [B, num_query_tokens, D] after the ProjLayer."""
  with torch.no_grad():
    return qformer(image_input=pixel_values, text_input=categories, return_dict=False)
