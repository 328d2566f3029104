"""A method is (which params train, what it adds, a pure param transform, how text becomes
conditioning, extra loss terms), never a trainer. `method_loss` is the one loss every method
trains with; `MethodConditioning` samples with the same text path.

Batch keys (numpy arrays with a leading batch axis; only the ones a run needs are present):
  latent_mean, latent_logvar  [B, h, w, c]  cached VAE moments; a latent is sampled each step
  pixels                      [B, H, W, 3]  images in [-1, 1], VAE-encoded in the step (random crops)
  ids                         [B, L] int    token ids (the text encoder runs in the step)
  context                     [B, L, D]     cached text-encoder output (nothing in the text path trains)
  prior                       [B] float     1 for class (prior-preservation) examples, 0 for instances
  mask                        [B, h, w, 1]  loss mask
  clip_pixels                 [B, S, S, 3]  the example's image for a CLIP image encoder (E4T)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from persona_jax import tree
from persona_jax.diffusion.losses import Objective
from persona_jax.models.components import SDModels
from persona_jax.models.attention_maps import ATTENTION_MAPS
from persona_jax.models.attention_maps import collect as collect_maps
from persona_jax.models.vae import Moments

LATENT_MEAN, LATENT_LOGVAR, PIXELS = "latent_mean", "latent_logvar", "pixels"
IDS, CONTEXT, MASK, PRIOR = "ids", "context", "mask", "prior"
CLIP_PIXELS = "clip_pixels"


def no_new_params(rng, base):
  return {}


def identity_prompt(prompt: str) -> str:
  return prompt


class LatentConditioning(Protocol):
  """Conditioning computed in the step from the batch's inputs and, for E4T's per-step word
  embedding, the noised latent and its timestep; also the image-conditioned methods' streams
  (IP-Adapter's image tokens, InstantBooth's concept and patch tokens, FastComposer's fused
  text). A hashable object: it is part of the Method, a static argument of the jit.

  Training runs `prepare` once per batch and `context` inside the loss's `predict(noisy, t)`;
  sampling (`MethodConditioning`) runs `prepare` once and then either `sampling` once (when the
  object defines it: conditioning that does not depend on the latent) or `context` at every
  denoising step on the current latents. `input_keys`: the batch keys besides `ids` it reads
  (e.g. clip_pixels), which sampling takes as extra inputs.
  """
  input_keys: tuple[str, ...]

  def prepare(self, models: SDModels, params, batch) -> Any:
    """What does not depend on the latent (e.g. image features): a pytree `state`."""

  def context(self, models: SDModels, params, state, noisy, t) -> tuple[Any, dict]:
    """(conditioning, {name: penalty scalar added to the loss}); noisy: [B, h, w, c], t: [B].
    The conditioning is the context [B, L, D], or the UNet's keyword arguments
    {"encoder_hidden_states": [B, L, D], "extra": ExtraConditioning(...)}."""

  # Optional:
  # def sampling(self, models, params, state, uncond, inputs) -> PreparedConditioning:
  #   """The sampler's (cond, uncond[, before, start]) kwargs, computed once; `uncond` is the
  #   negative prompt's context [B, L, D], `inputs` the sampler's inputs (traced scales)."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A personalization method as data (hashable: it is a static argument of the jitted step).

  Attributes:
    name: registry name.
    select: rules over `/`-joined param paths of the base model; matched leaves train.
    init_trainable: (rng, base params) -> the new params the method adds.
    transform: (frozen, trainable) -> the params the unchanged models see.
    input_embeddings: (params, ids [B, L]) -> [B, L, D] token embeddings, for methods that add
      token rows (they enter as input embeddings, never as a bigger table); None: the table.
    regularizers: extra loss terms, each (params, trainable, batch) -> (name, scalar).
    added_tokens: token strings the method adds to the tokenizer, in id order.
    expand_prompt: prompt -> prompt (e.g. a multi-vector placeholder to its vector tokens).
    prior_loss_weight: lambda of class-prior preservation (DreamBooth): with class examples in
      the batch the loss is mean(instance losses) + lambda * mean(class losses); 0: the method
      takes no class images.
    lr_groups: ((regex over trainable paths, learning rate), ...): leaves with their own lr.
    save_result: (run, trainable, workdir) -> [paths]: the method's result files.
    trains_text: the transform changes text-encoder weights (e.g. text-encoder LoRA).
    unet_options: ((UNetConfig runtime field, value), ...) for the training UNet, e.g. Custom
      Diffusion's (("detach_context_tokens", 1),).
    scale_lr_with_class_rows: with `optim.scale_lr`, class rows count in the batch size (Custom
      Diffusion's recipe doubles the lr with prior preservation; DreamBooth's does not).
    latent_conditioning: a `LatentConditioning` that replaces the text path's conditioning
      (E4T); None: the prompt's text-encoder output.
    components: () -> {component: params}: frozen networks the method brings beside the
      pipeline's (E4T's image encoder); `select` may pick their leaves too.
    image_inputs: (uint8 [R, R, 3] image after augmentation) -> {batch key: array}: per-example
      inputs the data pipeline adds (E4T's clip_pixels).
    attention_terms: (maps, batch) -> {name: scalar added to the loss}, from the cross-attention
      maps of the blocks in the UNet option `attention_maps` (`models.attention_maps.collect`:
      {attn2 path: [B, h, w, L]}), e.g. FastComposer's localization loss; None: the UNet runs
      without reporting maps.
  """
  name: str
  select: tree.Rules = ()
  init_trainable: Callable = no_new_params
  transform: Callable = tree.merge
  input_embeddings: Callable | None = None
  regularizers: tuple[Callable, ...] = ()
  added_tokens: tuple[str, ...] = ()
  expand_prompt: Callable[[str], str] = identity_prompt
  prior_loss_weight: float = 0.0
  lr_groups: tuple[tuple[str, float], ...] = ()
  save_result: Callable | None = None
  trains_text: bool = False
  unet_options: tuple[tuple[str, object], ...] = ()
  scale_lr_with_class_rows: bool = False
  latent_conditioning: LatentConditioning | None = None
  components: Callable[[], dict] | None = None
  image_inputs: Callable | None = None
  attention_terms: Callable | None = None

  def text_trains(self) -> bool:
    """Whether anything in the text path trains (then text embeddings cannot be cached)."""
    return (self.trains_text or self.input_embeddings is not None
            or self.latent_conditioning is not None
            or any(p.startswith("text_encoder") for p, _ in self.select))


def encode_text(method: Method, models: SDModels, params, ids):
  """[B, L] ids -> [B, L, D] conditioning through the method's text path."""
  embeds = None if method.input_embeddings is None else method.input_embeddings(params, ids)
  out = models.text_encoder.apply({"params": params["text_encoder"]}, ids, embeds)
  return out.last_hidden_state


def batch_latents(models: SDModels, params, batch, rng):
  """Clean latents [B, h, w, c] of a batch, scaled by the VAE's scaling factor."""
  scale = models.vae.config.scaling_factor
  if LATENT_MEAN in batch:
    moments = Moments(batch[LATENT_MEAN], batch[LATENT_LOGVAR])
  else:
    moments = models.vae.apply({"params": params["vae"]}, batch[PIXELS], method="encode")
  return jax.lax.stop_gradient(moments.sample(rng).astype(jnp.float32) * scale)


def unet_kwargs(conditioning) -> dict:
  """The UNet's keyword arguments from a context [B, L, D] or a dict of them."""
  return dict(conditioning) if isinstance(conditioning, dict) else {"encoder_hidden_states": conditioning}


def apply_unet(method: Method, models: SDModels, params, noisy, t, conditioning, batch,
               penalties: list):
  """The UNet on `noisy` [B, h, w, c] at `t` [B]; with `method.attention_terms`, the maps of the
  asked blocks are read from the same forward and its terms appended to `penalties`."""
  variables = {"params": params["unet"]}
  if method.attention_terms is None:
    return models.unet.apply(variables, noisy, t, **unet_kwargs(conditioning))
  out, state = models.unet.apply(variables, noisy, t, **unet_kwargs(conditioning),
                                 mutable=[ATTENTION_MAPS])
  penalties.append(method.attention_terms(collect_maps(state, models.unet.config, noisy.shape[1:3]),
                                          batch))
  return out


def method_loss(method: Method, models: SDModels, objective: Objective, params, trainable, batch,
                rng):
  """The denoising loss plus the method's regularizers. Returns (loss, metrics)."""
  latent_rng, loss_rng = jax.random.split(rng)
  latents = batch_latents(models, params, batch, latent_rng)
  penalties = []                   # filled by `predict` (traced once, in this same trace)
  if method.latent_conditioning is not None:
    conditioning = method.latent_conditioning
    state = conditioning.prepare(models, params, batch)

    def predict(noisy, t):
      context, terms = conditioning.context(models, params, state, noisy, t)
      penalties.append(terms)
      return apply_unet(method, models, params, noisy, t, context, batch, penalties)
  else:
    context = batch[CONTEXT] if CONTEXT in batch else encode_text(method, models, params, batch[IDS])

    def predict(noisy, t):
      return apply_unet(method, models, params, noisy, t, context, batch, penalties)
  if PRIOR in batch:
    loss, metrics = prior_preservation_loss(objective, latents, predict, loss_rng, batch[PRIOR],
                                            method.prior_loss_weight, batch.get(MASK))
  else:
    loss, metrics = objective.loss(latents, predict, loss_rng, batch.get(MASK))
  metrics = dict(metrics, denoising_loss=loss)
  for name, value in {k: v for terms in penalties for k, v in terms.items()}.items():
    metrics[name] = value
    loss = loss + value
  for regularizer in method.regularizers:
    name, value = regularizer(params, trainable, batch)
    metrics[name] = value
    loss = loss + value
  return loss, metrics


def prior_preservation_loss(objective: Objective, latents, predict, rng, prior, weight: float,
                            mask=None):
  """DreamBooth's loss over one batch of instance and class examples (one forward):
  mean(instance losses) + weight * mean(class losses). `prior` [B] is 1 on class examples.
  Returns (loss, metrics with instance_loss and prior_loss)."""
  per_example, metrics = objective.per_example_loss(latents, predict, rng, mask)
  prior = prior.astype(jnp.float32)
  instance_loss = jnp.sum(per_example * (1.0 - prior)) / jnp.maximum(jnp.sum(1.0 - prior), 1.0)
  prior_loss = jnp.sum(per_example * prior) / jnp.maximum(jnp.sum(prior), 1.0)
  return instance_loss + weight * prior_loss, dict(metrics, instance_loss=instance_loss,
                                                   prior_loss=prior_loss)


@dataclasses.dataclass(frozen=True)
class MethodConditioning:
  """The sampler's conditioning hook for a method's text path (see diffusion.sampling).

  inputs: {"ids", "negative_ids"} and, with a `latent_conditioning`, its `input_keys`. The
  negative prompt goes through the text path once; a latent conditioning recomputes the prompt's
  conditioning from the current latents at every step.
  """
  method: Method

  def prepare(self, models, params, inputs):
    uncond = encode_text(self.method, models, params, inputs["negative_ids"])
    conditioning = self.method.latent_conditioning
    if conditioning is None:
      return {"cond": encode_text(self.method, models, params, inputs["ids"]), "uncond": uncond}
    batch = {k: inputs[k] for k in (IDS,) + tuple(conditioning.input_keys)}
    state = conditioning.prepare(models, params, batch)
    if hasattr(conditioning, "sampling"):
      return {"prepared": conditioning.sampling(models, params, state, uncond, inputs)}
    return {"latent_state": state, "uncond": uncond}

  def at_step(self, models, params, state, step, t, latents):
    if "prepared" in state:
      return state["prepared"].at(step)
    if "latent_state" in state:
      t = jnp.broadcast_to(t, latents.shape[:1])
      cond, _ = self.method.latent_conditioning.context(models, params, state["latent_state"],
                                                        latents, t)
    else:
      cond = state["cond"]
    return {"encoder_hidden_states": cond}, {"encoder_hidden_states": state["uncond"]}
