"""IP-Adapter's conditioning (diffusion/conditioning.py's protocol; methods/ip_adapter.py): the
base's text conditioning (`TextConditioning`: SD's context; SDXL's concatenated context, pooled
embedding and micro-conditioning time ids) plus the image tokens of the `ip_tokens` stream, and
the data pipeline hook that draws the paper's condition drops.

Condition dropping, one uniform draw per example (`ip_drop`): 1 the image (features set to zeros;
plus: a zero image into the encoder), 2 the text (the empty caption, in every tokenizer), 3 both.
At sampling the negative half uses the tokens of those zeros at the same scale (diffusers' way).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.data.batch import CLIP_PIXELS, IDS, IDS_2, NEGATIVE_IDS
from persona_jax.diffusion.conditioning import TextConditioning
from persona_jax.models.addons import IP_SCALE, IP_TOKENS
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.image_projection import BASIC, PLUS, ProjectionConfig, projection_model

IP_ADAPTER = "ip_adapter"    # the method's top-level key: ip_adapter/image_proj/...
DROP = "ip_drop"             # batch key: 0 keep, 1 drop the image, 2 drop the text, 3 drop both
TEXT = TextConditioning()    # the base's text path, SD or SDXL


def image_features(clip: CLIPVisionConfig, kind: str, params, pixels):
  """[B, S, S, 3] CLIP pixels -> basic: image_embeds [B, E]; plus: hidden_states[-2] [B, T, H]."""
  out = CLIPVisionModel(clip).apply({"params": params}, pixels)
  feats = out.hidden_states[-2] if kind == PLUS else out.image_embeds
  return jax.lax.stop_gradient(feats.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class IPAdapterConditioning:
  """The text conditioning plus the image tokens (the `ip_tokens` stream), computed once per batch
  (they do not depend on the latent). `empty_ids` / `empty_ids_2`: the dropped caption in the
  first / SDXL's second tokenizer (() where no caption is dropped, e.g. when sampling)."""
  clip: CLIPVisionConfig
  projection: ProjectionConfig
  empty_ids: tuple[int, ...]
  scale: float = 1.0                 # sampling's default ip_scale (training uses 1)
  empty_ids_2: tuple[int, ...] = ()
  input_keys: tuple[str, ...] = (CLIP_PIXELS,)
  cacheable = False
  sdxl = True

  def tokens(self, params, pixels, drop_image=None):
    """clip_pixels [B, S, S, 3] or [B, K, S, S, 3] (K images each) -> tokens [B, K * N, D];
    `drop_image` [B] bool: those rows get the tokens of zeros (plus: of a zero image)."""
    b = pixels.shape[0]
    flat = pixels.reshape((-1,) + pixels.shape[-3:])                      # [B K, S, S, 3]
    k = flat.shape[0] // b
    row_drop = None if drop_image is None else jnp.repeat(drop_image, k)
    if self.projection.kind == PLUS and row_drop is not None:
      flat = jnp.where(row_drop[:, None, None, None], 0.0, flat)
    feats = image_features(self.clip, self.projection.kind, params["image_encoder"], flat)
    if self.projection.kind == BASIC and row_drop is not None:
      feats = jnp.where(row_drop[:, None], 0.0, feats)
    return self.project(params, feats).reshape(b, -1, self.projection.cross_attention_dim)

  def project(self, params, feats):
    return projection_model(self.projection).apply(
        {"params": params[IP_ADAPTER]["image_proj"]}, feats)

  def negative_tokens(self, params, pixels):
    """The tokens of the zeros the condition drop trains with, for each row of `pixels`."""
    drop = jnp.ones(pixels.shape[:1], bool)
    return self.tokens(params, pixels, drop)

  def drop_captions(self, inputs, drop_text):
    """`inputs` with the ids (and SDXL's ids_2) of the `drop_text` [B] rows the empty caption's."""
    out = dict(inputs)
    for key, empty in ((IDS, self.empty_ids), (IDS_2, self.empty_ids_2)):
      if key in out:
        row = jnp.asarray(empty, out[key].dtype)[None]
        out[key] = jnp.where(drop_text[:, None], row, out[key])
    return out

  def prepare(self, models, params, inputs):
    """The text state (`TextConditioning.prepare`: "context" [B, L, D], SDXL "pooled" and
    "time_ids"; dropped captions empty) plus "tokens" [B, K N, D]; when sampling also "scale" [B]
    (`inputs["ip_scale"]`, default `scale`; traced) and "negative_tokens" (the tokens of the
    zeros the condition drop trains with) beside the text's negative half."""
    drop = inputs.get(DROP)
    drop_image = None
    if drop is not None:
      drop_image = (drop == 1) | (drop == 3)
      inputs = self.drop_captions(inputs, (drop == 2) | (drop == 3))
    state = dict(TEXT.prepare(models, params, inputs))
    state["tokens"] = self.tokens(params, inputs[CLIP_PIXELS], drop_image)
    if NEGATIVE_IDS in inputs:
      b = state["context"].shape[0]
      state.update(negative_tokens=self.negative_tokens(params, inputs[CLIP_PIXELS]),
                   scale=jnp.broadcast_to(jnp.asarray(inputs.get(IP_SCALE, self.scale),
                                                      jnp.float32), (b,)))
    return state

  def at(self, models, params, state, noisy, t, step):
    kwargs, _ = TEXT.at(models, params, state, noisy, t, step)
    streams = {IP_TOKENS: state["tokens"]}
    if "scale" in state:
      streams[IP_SCALE] = state["scale"]
    return {**kwargs, "streams": streams}, {}

  def negative(self, models, params, state):
    """The negative prompt and the zeros' tokens at the same scale."""
    return {**TEXT.negative(models, params, state),
            "streams": {IP_TOKENS: state["negative_tokens"], IP_SCALE: state["scale"]}}


@dataclasses.dataclass(eq=False)
class ConditionInputs:
  """Data pipeline hook (`Method.image_inputs`): uint8 [H, W, 3] (its mask, unused; the example's
  generator) -> {clip_pixels [S, S, 3], ip_drop int32} (the official dataset's single uniform
  draw; without a generator nothing is dropped)."""
  processor: object
  drop_image: float
  drop_text: float
  drop_both: float

  def __call__(self, image, mask=None, rng=None):
    from persona_jax.data.clip_images import preprocess_image
    u = 1.0 if rng is None else rng.random()
    edges = np.cumsum([self.drop_image, self.drop_text, self.drop_both])
    drop = 0 if u >= edges[-1] else 1 + int(np.searchsorted(edges, u, side="right"))
    return {CLIP_PIXELS: preprocess_image(image, self.processor), DROP: np.int32(drop)}
