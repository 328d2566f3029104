"""A torch re-creation of PhotoMaker (TencentARC/PhotoMaker; the repository is not a package): the
ID encoders of `photomaker/model.py`, `model_v2.py`, `resampler.py` with the sizes as arguments
(so tests build them tiny), loaded strictly from the official `id_encoder.*` keys
(`official_id_encoder`), and the parts of `photomaker/pipeline.py` around them: the prompt
expansion of `encode_prompt_with_trigger_word`, the text-only prompt of the delayed conditioning
and the denoising loop's switch at `start_merge_step`. The forward passes follow the official code
line by line, including FuseModule's single-row `num_inputs` logic (it only runs with batch 1, as
the official pipeline calls it).

The reference of `persona-jax verify --photomaker` and of the tests: torch and transformers (the
verify extra) are imported when this module is, and only verify and tests import it.
"""

import math

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


class MLP(nn.Module):
  def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
    super().__init__()
    if use_residual:
      assert in_dim == out_dim
    self.layernorm = nn.LayerNorm(in_dim)
    self.fc1 = nn.Linear(in_dim, hidden_dim)
    self.fc2 = nn.Linear(hidden_dim, out_dim)
    self.use_residual = use_residual
    self.act_fn = nn.GELU()

  def forward(self, x):
    residual = x
    x = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
    return x + residual if self.use_residual else x


class FuseModule(nn.Module):
  def __init__(self, embed_dim):
    super().__init__()
    self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
    self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
    self.layer_norm = nn.LayerNorm(embed_dim)

  def fuse_fn(self, prompt_embeds, id_embeds):
    stacked_id_embeds = torch.cat([prompt_embeds, id_embeds], dim=-1)
    stacked_id_embeds = self.mlp1(stacked_id_embeds) + prompt_embeds
    stacked_id_embeds = self.mlp2(stacked_id_embeds)
    return self.layer_norm(stacked_id_embeds)

  def forward(self, prompt_embeds, id_embeds, class_tokens_mask):
    id_embeds = id_embeds.to(prompt_embeds.dtype)
    num_inputs = class_tokens_mask.sum().unsqueeze(0)
    batch_size, max_num_inputs = id_embeds.shape[:2]
    seq_length = prompt_embeds.shape[1]
    flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
    valid_id_mask = (torch.arange(max_num_inputs, device=flat_id_embeds.device)[None, :]
                     < num_inputs[:, None])
    valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
    prompt_embeds = prompt_embeds.view(-1, prompt_embeds.shape[-1])
    class_tokens_mask = class_tokens_mask.view(-1)
    valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
    image_token_embeds = prompt_embeds[class_tokens_mask]
    stacked_id_embeds = self.fuse_fn(image_token_embeds, valid_id_embeds)
    assert class_tokens_mask.sum() == stacked_id_embeds.shape[0]
    prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked_id_embeds.to(prompt_embeds.dtype))
    return prompt_embeds.view(batch_size, seq_length, -1)


def FeedForward(dim, mult=4):
  inner_dim = int(dim * mult)
  return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(),
                       nn.Linear(inner_dim, dim, bias=False))


def reshape_tensor(x, heads):
  bs, length, _ = x.shape
  return x.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
  def __init__(self, *, dim, dim_head=64, heads=8):
    super().__init__()
    self.dim_head, self.heads = dim_head, heads
    inner_dim = dim_head * heads
    self.norm1 = nn.LayerNorm(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.to_q = nn.Linear(dim, inner_dim, bias=False)
    self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
    self.to_out = nn.Linear(inner_dim, dim, bias=False)

  def forward(self, x, latents):
    x = self.norm1(x)
    latents = self.norm2(latents)
    b, l, _ = latents.shape
    q = self.to_q(latents)
    k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
    q, k, v = (reshape_tensor(t, self.heads) for t in (q, k, v))
    scale = 1 / math.sqrt(math.sqrt(self.dim_head))
    weight = (q * scale) @ (k * scale).transpose(-2, -1)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = (weight @ v).permute(0, 2, 1, 3).reshape(b, l, -1)
    return self.to_out(out)


class FacePerceiverResampler(nn.Module):
  def __init__(self, *, dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult):
    super().__init__()
    self.proj_in = nn.Linear(embedding_dim, dim)
    self.proj_out = nn.Linear(dim, output_dim)
    self.norm_out = nn.LayerNorm(output_dim)
    self.layers = nn.ModuleList([
        nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                       FeedForward(dim=dim, mult=ff_mult)]) for _ in range(depth)])

  def forward(self, latents, x):
    x = self.proj_in(x)
    for attn, ff in self.layers:
      latents = attn(x, latents) + latents
      latents = ff(latents) + latents
    return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
  def __init__(self, id_embeddings_dim, cross_attention_dim, num_tokens, embedding_dim, *,
               depth, dim_head, ratio=4):
    super().__init__()
    self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
    self.token_proj = nn.Sequential(
        nn.Linear(id_embeddings_dim, id_embeddings_dim * ratio), nn.GELU(),
        nn.Linear(id_embeddings_dim * ratio, cross_attention_dim * num_tokens))
    self.token_norm = nn.LayerNorm(cross_attention_dim)
    self.perceiver_resampler = FacePerceiverResampler(
        dim=cross_attention_dim, depth=depth, dim_head=dim_head,
        heads=cross_attention_dim // dim_head, embedding_dim=embedding_dim,
        output_dim=cross_attention_dim, ff_mult=4)

  def forward(self, x, last_hidden_state):
    x = self.token_proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim)
    x = self.token_norm(x)
    out = self.perceiver_resampler(x, last_hidden_state)
    return x + 1.0 * out


class IDEncoderV1(CLIPVisionModelWithProjection):
  """photomaker/model.py PhotoMakerIDEncoder (vision config and widths as arguments)."""

  def __init__(self, vision: CLIPVisionConfig, projection_2_dim: int):
    super().__init__(vision)
    fuse_dim = vision.projection_dim + projection_2_dim
    self.visual_projection_2 = nn.Linear(vision.hidden_size, projection_2_dim, bias=False)
    self.fuse_module = FuseModule(fuse_dim)

  def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask):
    b, num_inputs, c, h, w = id_pixel_values.shape
    id_pixel_values = id_pixel_values.view(b * num_inputs, c, h, w)
    shared_id_embeds = self.vision_model(id_pixel_values)[1]
    id_embeds = self.visual_projection(shared_id_embeds).view(b, num_inputs, 1, -1)
    id_embeds_2 = self.visual_projection_2(shared_id_embeds).view(b, num_inputs, 1, -1)
    id_embeds = torch.cat((id_embeds, id_embeds_2), dim=-1)
    return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


class IDEncoderV2(CLIPVisionModelWithProjection):
  """photomaker/model_v2.py PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken."""

  def __init__(self, vision: CLIPVisionConfig, projection_2_dim: int, cross_attention_dim: int,
               id_embeddings_dim: int, *, num_tokens=2, depth=4, dim_head=128):
    super().__init__(vision)
    self.fuse_module = FuseModule(cross_attention_dim)
    self.visual_projection_2 = nn.Linear(vision.hidden_size, projection_2_dim, bias=False)
    self.num_tokens = num_tokens
    self.qformer_perceiver = QFormerPerceiver(id_embeddings_dim, cross_attention_dim, num_tokens,
                                              vision.hidden_size, depth=depth, dim_head=dim_head)

  def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds):
    b, num_inputs, c, h, w = id_pixel_values.shape
    id_pixel_values = id_pixel_values.view(b * num_inputs, c, h, w)
    last_hidden_state = self.vision_model(id_pixel_values)[0]
    id_embeds = id_embeds.view(b * num_inputs, -1)
    id_embeds = self.qformer_perceiver(id_embeds, last_hidden_state)
    id_embeds = id_embeds.view(b, num_inputs, self.num_tokens, -1)
    return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


def randomize_(module, seed: int):
  """Random values for every 1-D parameter (LayerNorm weights 0.5..1.5, biases ~0.1 N(0, 1)), so
  norms and biases are not at their identity initialization."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 and name.endswith(".weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# Loading an official state dict strictly, and the pipeline's parts.


def official_id_encoder(state: dict, config):
  """The official module of an `id_encoder.*` state dict (prefix removed), built with the sizes
  of `config` (persona_jax's PhotoMakerConfig, `convert/photomaker_files.infer_config`) and
  loaded with `load_state_dict(strict=True)` as `load_photomaker_adapter` does; float32, eval."""
  from transformers import CLIPVisionConfig
  v = config.vision
  vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            projection_dim=v.projection_dim, num_hidden_layers=v.num_hidden_layers,
                            num_attention_heads=v.num_attention_heads, num_channels=v.num_channels,
                            image_size=v.image_size, patch_size=v.patch_size,
                            hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
  if config.version == "v1":
    model = IDEncoderV1(vision, config.projection_2_dim)
  else:
    model = IDEncoderV2(vision, config.projection_2_dim, config.fuse_dim, config.id_embeddings_dim,
                        num_tokens=config.num_tokens, depth=config.perceiver_depth,
                        dim_head=config.perceiver_head_dim)
  model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
  return model.float().eval()


def add_trigger_word(tokenizer, trigger_word: str):
  """`load_photomaker_adapter`'s `tokenizer.add_tokens([trigger_word], special_tokens=True)` on a
  copy; returns (tokenizer, the trigger word's id)."""
  import copy
  tokenizer = copy.deepcopy(tokenizer)
  tokenizer.add_tokens([trigger_word], special_tokens=True)
  return tokenizer, tokenizer.convert_tokens_to_ids(trigger_word)


def expand_prompt_ids(tokenizer, prompt: str, image_token_id: int, copies: int):
  """`encode_prompt_with_trigger_word`'s expansion for one tokenizer: the prompt's ids (padded and
  truncated to 77) with the trigger word removed and the class word before it repeated `copies`
  (= ID images x num_tokens) times, truncated or padded again; and the class_tokens_mask.
  Returns (ids [1, L] long, mask [1, L] bool). ValueError unless exactly one trigger word."""
  ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
  clean_index, clean, class_token_index = 0, [], []
  for token_id in ids.tolist()[0]:
    if token_id == image_token_id:
      class_token_index.append(clean_index - 1)
    else:
      clean.append(token_id)
      clean_index += 1
  if len(class_token_index) != 1:
    raise ValueError(f"PhotoMaker currently does not support multiple trigger words in a single "
                     f"prompt. Prompt: {prompt}.")
  c = class_token_index[0]
  clean = clean[:c] + [clean[c]] * copies + clean[c + 1:]
  max_len = tokenizer.model_max_length
  clean = clean[:max_len] if len(clean) > max_len else clean + [tokenizer.pad_token_id] * (
      max_len - len(clean))
  mask = [c <= i < c + copies for i in range(len(clean))]
  return torch.tensor([clean], dtype=torch.long), torch.tensor([mask], dtype=torch.bool)


def encode_prompt_with_trigger_word(tokenizers, text_encoders, prompt: str, image_token_id: int,
                                    copies: int):
  """The official SDXL text path of the expanded prompt: both encoders' penultimate hidden states
  concatenated, text_encoder_2's pooled (projected) output, and the mask of the last tokenizer.
  Returns (prompt_embeds [1, L, D], pooled [1, P], class_tokens_mask [1, L], [ids per tokenizer])."""
  embeds, all_ids = [], []
  with torch.no_grad():
    for tokenizer, encoder in zip(tokenizers, text_encoders):
      ids, mask = expand_prompt_ids(tokenizer, prompt, image_token_id, copies)
      out = encoder(ids, output_hidden_states=True)
      pooled = out[0]
      embeds.append(out.hidden_states[-2])
      all_ids.append(ids)
  return torch.concat(embeds, dim=-1), pooled, mask, all_ids


def text_only_prompt(tokenizer, prompt: str, trigger_word: str) -> str:
  """The pipeline's prompt for the steps before the merge: the first tokenizer's ids without the
  trigger word, decoded. Decoded as CLIP's tokenizer does (byte-level tokens joined, "</w>" a
  space): transformers 5 leaves "</w>" in `decode` for tokenizer folders without a tokenizer.json
  decoder, which the official code (transformers 4) never saw."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  tokens = tokenizer.encode(prompt, add_special_tokens=False)
  tokens.remove(tokenizer.convert_tokens_to_ids(trigger_word))
  byte_of = {u: b for b, u in bytes_to_unicode().items()}
  text = "".join(tokenizer.convert_ids_to_tokens(tokens))
  return bytearray(byte_of[ch] for ch in text).decode("utf-8", "replace").replace("</w>", " ").strip()


def denoise(unet, scheduler, latents, steps: int, guidance: float, start_merge_step: int, *,
            negative, negative_pooled, text_only, text_only_pooled, fused, pooled, time_ids):
  """The official denoising loop's conditioning switch (classifier-free guidance, batch 1 or
  more): steps i <= start_merge_step see [negative; text-only prompt] and its pooled embedding,
  the later ones [negative; fused prompt] and the expanded prompt's pooled one. NCHW latents in,
  NCHW latents out."""
  scheduler.set_timesteps(steps)
  time_ids = torch.cat([time_ids, time_ids])
  with torch.no_grad():
    for i, t in enumerate(scheduler.timesteps):
      x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
      if i <= start_merge_step:
        ctx, add = torch.cat([negative, text_only]), torch.cat([negative_pooled, text_only_pooled])
      else:
        ctx, add = torch.cat([negative, fused]), torch.cat([negative_pooled, pooled])
      out = unet(x, t, encoder_hidden_states=ctx,
                 added_cond_kwargs={"text_embeds": add, "time_ids": time_ids}).sample
      uncond, cond = out.chunk(2)
      latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
  return latents
