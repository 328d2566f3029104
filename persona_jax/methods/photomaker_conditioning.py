"""PhotoMaker's conditioning when sampling (diffusion/conditioning.py's protocol;
methods/photomaker.py), as TencentARC/PhotoMaker's `PhotoMakerStableDiffusionXLPipeline` computes
it, on an SDXL base.

The prompt arrives tokenized with the trigger word (one added token, the same id in both
tokenizers) right after the class word. Once per sampling call (`prepare`, outside the denoising
loop), traced:
  expanded   the trigger word removed and the class word repeated K = ID images x tokens per
             image times, truncated / padded to L again (`expand_class_word`, the official
             `encode_prompt_with_trigger_word`), per tokenizer; the class_tokens_mask from the
             second tokenizer's ids, as the official code keeps the last one;
  fused      both encoders' penultimate states of the expanded ids through the ID encoder
             (models/photomaker.py), which replaces the class positions; pooled: text_encoder_2's
             pooled output of the expanded ids;
  text only  the ids without the trigger word (`remove_trigger`), encoded as the plain SDXL
             prompt, with its own pooled output.
The denoising loop uses the text-only prompt for steps i <= start_merge_step and the fused one
after (`at`, `delayed`); `start_merge_step` is a traced input. The negative half is the plain SDXL
negative (zeros where the folder says force_zeros_for_empty_prompt), a trigger word in it removed.

Training (`at` with no step) conditions on the fused prompt. Its rows may hold fewer ID images
than `num_images` (`ID_COUNT`, [B] int: the first n slots are real, the rest zeros): the class
word is repeated n x tokens per image times in that row and only the first n images' tokens are
fused (FuseModule leaves the padded ones out).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from persona_jax.data.batch import IDS, IDS_2, NEGATIVE_IDS, NEGATIVE_IDS_2
from persona_jax.diffusion.conditioning import delayed, encode_sdxl_prompt, sdxl_state
from persona_jax.models.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder

PHOTOMAKER = "photomaker"                  # the ID encoder's params: params["photomaker"]
ID_PIXELS = "photomaker_pixels"            # [B, N, S, S, 3] CLIP pixels of the ID images
ID_EMBEDS = "photomaker_id_embeds"         # v2: [B, N, 512] raw ArcFace embeddings
ID_COUNT = "photomaker_num_images"         # training: [B] int, ID images per row (<= num_images)
START = "start_merge_step"                 # the last step with the text-only prompt (traced)
START_MERGE_STEP = 10                      # its default, the official pipeline's


def remove_trigger(ids, trigger_id: int, pad_id: int):
  """[B, L] ids -> [B, L] with every trigger-word id removed, the rest moved left and `pad_id`
  at the end."""
  b, length = ids.shape
  keep = ids != trigger_id
  dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, length)                  # [B, L]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
  out = jnp.full((b, length + 1), pad_id, ids.dtype).at[rows, dest].set(ids)
  return out[:, :length]


def expand_class_word(ids, trigger_id: int, copies: int, pad_id: int):
  """The official expansion of [B, L] ids holding one trigger word per row: the trigger removed,
  the token before it (the class word) repeated `copies` times, the rest after them, truncated to
  L, padded with `pad_id`. Returns (ids [B, L], class_tokens_mask [B, L] bool)."""
  length = ids.shape[1]
  c = jnp.argmax(ids == trigger_id, axis=1)[:, None] - 1                      # [B, 1] class index
  j = jnp.arange(length)[None, :]                                            # [1, L]
  src = jnp.where(j < c, j, jnp.where(j < c + copies, c, j - copies + 2))    # [B, L] source index
  taken = jnp.take_along_axis(ids, jnp.clip(src, 0, length - 1), axis=1)
  out = jnp.where(src < length, taken, jnp.asarray(pad_id, ids.dtype))
  return out, (j >= c) & (j < c + copies)


@dataclasses.dataclass(frozen=True)
class PhotoMakerConditioning:
  """See the module docstring. `num_images`: ID images per sample; `pad_ids`: each tokenizer's
  pad id. start_merge_step is an input (`START`, default 10), not a field: no recompiling."""
  config: PhotoMakerConfig
  trigger_id: int
  pad_ids: tuple[int, int]
  num_images: int
  cacheable = False
  sdxl = True

  @property
  def input_keys(self) -> tuple[str, ...]:
    return (ID_PIXELS,) + ((ID_EMBEDS,) if self.config.version == "v2" else ())

  @property
  def copies(self) -> int:
    """K: class-word copies, ID images x tokens per image."""
    return self.num_images * self.config.tokens_per_image

  def expanded(self, inputs):
    """(ids, ids_2, class_tokens_mask) of the expanded prompt (the mask from ids_2); with
    `ID_COUNT`, each row's own number of copies."""
    copies = self.copies
    if ID_COUNT in inputs:
      copies = jnp.asarray(inputs[ID_COUNT], jnp.int32)[:, None] * self.config.tokens_per_image
    ids, _ = expand_class_word(inputs[IDS], self.trigger_id, copies, self.pad_ids[0])
    ids_2, mask = expand_class_word(inputs[IDS_2], self.trigger_id, copies, self.pad_ids[1])
    return ids, ids_2, mask

  def fused(self, models, params, inputs):
    """(fused prompt embeddings [B, L, D], their pooled embedding [B, P])."""
    ids, ids_2, mask = self.expanded(inputs)
    context, pooled = encode_sdxl_prompt(models, params, ids, ids_2)
    fused = PhotoMakerIDEncoder(self.config).apply(
        {"params": params[PHOTOMAKER]}, inputs[ID_PIXELS], context, mask, inputs.get(ID_EMBEDS))
    return fused, pooled

  def prepare(self, models, params, inputs):
    """sdxl_state of the text-only prompt ("context", "pooled", "time_ids" and the negative half)
    plus "fused" / "fused_pooled" and, when sampling, "start"."""
    plain = dict(inputs)
    for key, pad in zip((IDS, IDS_2, NEGATIVE_IDS, NEGATIVE_IDS_2), self.pad_ids * 2):
      if key in plain:
        plain[key] = remove_trigger(plain[key], self.trigger_id, pad)
    state = dict(sdxl_state(models, params, plain))
    state["fused"], state["fused_pooled"] = self.fused(models, params, inputs)
    if NEGATIVE_IDS in inputs:
      start = jnp.asarray(inputs.get(START, START_MERGE_STEP), jnp.int32)
      state["start"] = start.reshape(-1)[0] if start.ndim else start
    return state

  def at(self, models, params, state, noisy, t, step):
    def kwargs(context, pooled):
      return {"encoder_hidden_states": context,
              "added_cond": {"text_embeds": pooled, "time_ids": state["time_ids"]}}
    fused = kwargs(state["fused"], state["fused_pooled"])
    if step is None:                    # a training batch: the fused prompt
      return fused, {}
    # the official loop: i <= start_merge_step the text-only prompt, then the fused one
    return delayed(step, state["start"] + 1, kwargs(state["context"], state["pooled"]), fused), {}

  def negative(self, models, params, state):
    return {"encoder_hidden_states": state["negative"],
            "added_cond": {"text_embeds": state["negative_pooled"],
                           "time_ids": state["negative_time_ids"]}}
