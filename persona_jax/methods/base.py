"""A method is data and small pure functions over the one training core, never a trainer.

  Method(name, params, conditioning, tokens, unet, losses, loss_weights, components,
         image_inputs, save)

* `params` (`ParamSpec`): the parameter space: which existing leaves train (`select`, regex
  rules over `/`-joined paths), the new leaves the method adds (`init(rng, base)`), and the
  pure function from the merged tree (frozen and trainable leaves together) to the params the
  unchanged networks see (`transform`). Specs compose (`compose`): FastComposer's light variant
  is its fuse MLP composed with LoRA, not a new class.
* `conditioning`: how the UNet is conditioned, in training and in sampling alike
  (diffusion/conditioning.py); the text path by default.
* `tokens` (`TokenSpec`): the token strings it adds to the tokenizer and how a prompt is
  rewritten for them (a multi-vector placeholder to its vector tokens).
* `unet`: the UNet add-ons it trains and samples with (models/addons.py).
* `losses`: extra loss terms, each `(params, trainable, batch, aux) -> {name: scalar}`, with
  `aux = {"terms": the conditioning's terms, "maps": attention maps (AttentionMaps add-on)}`;
  `method_loss` adds them (and the conditioning's terms) to the denoising loss, as values.
* `loss_weights`: `(batch, rng) -> [B, h, w, 1]` per-position weights of the denoising loss,
  which stays a mean over the whole latent (FastComposer's masked loss), or None.
* `components`: `() -> {name: params}`, the frozen side networks it brings (an image encoder);
  `select` may pick their leaves too.
* `image_inputs`: the data pipeline's per-example hook `(uint8 image [R, R, 3], its mask or None,
  the example's numpy Generator or None) -> {batch key: array}` (e.g. CLIP pixels).
* `save`: `(trainable, ResultContext) -> [paths]`, the method's result files.

Recipe knobs are the run config's, not the method's: the class-prior weight
(`prior_loss_weight`), learning-rate groups (`optim.lr_groups`, absolute), the scale-lr rule
(`optim.scale_lr`, `optim.scale_lr_class_rows`) and the data source (`data.source`).

Where new parameters live is one rule, stated in models/addons.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from persona_jax import tree
from persona_jax.data.batch import LATENT_LOGVAR, LATENT_MEAN, MASK, PIXELS, PRIOR
from persona_jax.diffusion.conditioning import TextConditioning
from persona_jax.diffusion.losses import Objective
from persona_jax.models.addons import captures_maps
from persona_jax.models.attention_maps import ATTENTION_MAPS
from persona_jax.models.attention_maps import collect as collect_maps
from persona_jax.models.components import SDModels
from persona_jax.models.vae import Moments


TEXT_PATH = re.compile(r"(^|/)text_encoder(_2)?/")


def no_new_params(rng, base):
  return {}


def no_change(params):
  return params


def identity_prompt(prompt: str) -> str:
  return prompt


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """A parameter space: select (existing leaves that train), init (new leaves), transform.

  select: ((regex over `/`-joined paths of the base and the components, True), ...).
  init: (rng, base params) -> the new params (a tree; see models/addons.py for where they live).
  transform: merged params (frozen and trainable together) -> the params the networks see.
  """
  select: tree.Rules = ()
  init: Callable = no_new_params
  transform: Callable = no_change

  def apply(self, frozen, trainable):
    """The params the networks see: `transform(merge(frozen, trainable))`."""
    return self.transform(tree.merge(frozen, trainable))


def compose(*specs: ParamSpec) -> ParamSpec:
  """Several parameter spaces as one: selected leaves of all, each spec's new leaves from its own
  key (`jax.random.split(rng, len(specs))[i]`), transforms applied in order."""
  def init(rng, base):
    keys = jax.random.split(rng, len(specs))
    return tree.merge(*(spec.init(key, base) for spec, key in zip(specs, keys)))

  def transform(params):
    for spec in specs:
      params = spec.transform(params)
    return params
  return ParamSpec(tuple(rule for spec in specs for rule in spec.select), init, transform)


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """Token strings added to the tokenizer (ids V, V+1, ... in order) and the prompt rewrite."""
  added: tuple[str, ...] = ()
  expand: Callable[[str], str] = identity_prompt


@dataclasses.dataclass(frozen=True)
class ResultContext:
  """What a method's `save` may read besides the trained leaves."""
  workdir: Path
  pipe: Any                        # the base Pipeline
  model_dir: Path                  # the base model as the run names it
  config: Any                      # the RunConfig
  full_params: Callable            # trainable -> every param the networks see (base + method)
  step: int | None = None          # the (micro-)step the result is written at


@dataclasses.dataclass(frozen=True)
class Method:
  """A personalization method as data (hashable: it is a static argument of the jitted step).
  Fields: see the module docstring."""
  name: str
  params: ParamSpec = ParamSpec()
  conditioning: Any = TextConditioning()
  tokens: TokenSpec = TokenSpec()
  unet: tuple = ()
  losses: tuple[Callable, ...] = ()
  loss_weights: Callable | None = None
  components: Callable[[], dict] | None = None
  image_inputs: Callable | None = None
  save: Callable | None = None

  def text_trains(self, trainable) -> bool:
    """Whether anything in the text path trains (then text contexts cannot be cached): the
    conditioning reads trainable params, or a trainable leaf is or modifies a text-encoder
    weight (its path, after the method's key, starts with text_encoder/ or text_encoder_2/)."""
    if not self.conditioning.cacheable:
      return True
    return any(TEXT_PATH.search(p) for p in tree.flatten(trainable))


def batch_latents(models: SDModels, params, batch, rng):
  """Clean latents [B, h, w, c] of a batch, scaled by the VAE's scaling factor."""
  scale = models.vae.config.scaling_factor
  if LATENT_MEAN in batch:
    moments = Moments(batch[LATENT_MEAN], batch[LATENT_LOGVAR])
  else:
    moments = models.vae.apply({"params": params["vae"]}, batch[PIXELS], method="encode")
  return jax.lax.stop_gradient(moments.sample(rng).astype(jnp.float32) * scale)


def apply_unet(models: SDModels, params, noisy, t, kwargs: dict):
  """The UNet on `noisy` [B, h, w, c] at `t` [B] -> (output, attention maps or None): with the
  `AttentionMaps` add-on the maps of its blocks are read from the same forward
  ({attn2 path: [B, h, w, L]}, models/attention_maps.py)."""
  variables = {"params": params["unet"]}
  if not captures_maps(models.unet.config):
    return models.unet.apply(variables, noisy, t, **kwargs), None
  out, state = models.unet.apply(variables, noisy, t, **kwargs, mutable=[ATTENTION_MAPS])
  return out, collect_maps(state, models.unet.config, noisy.shape[1:3])


def method_loss(method: Method, models: SDModels, objective: Objective, params, trainable, batch,
                rng):
  """The denoising loss (prior-preserving with class examples in the batch) plus the
  conditioning's terms and the method's loss terms. Returns (loss, metrics)."""
  latent_rng, loss_rng = jax.random.split(rng)
  latents = batch_latents(models, params, batch, latent_rng)
  conditioning = method.conditioning
  state = conditioning.prepare(models, params, batch)

  def predict(noisy, t):
    kwargs, terms = conditioning.at(models, params, state, noisy, t, None)
    out, maps = apply_unet(models, params, noisy, t, kwargs)
    return out, {"terms": terms, "maps": maps}
  weights = (method.loss_weights(batch, jax.random.fold_in(rng, 1)) if method.loss_weights
             else None)
  per_example, metrics, aux = objective.per_example_loss(latents, predict, loss_rng,
                                                         batch.get(MASK), weights)
  loss, reduced = objective.reduce(per_example, batch.get(PRIOR))
  metrics = dict(metrics, **reduced, denoising_loss=loss)
  terms = dict(aux["terms"])
  for term in method.losses:
    terms.update(term(params, trainable, batch, aux))
  for name, value in terms.items():
    metrics[name] = value
    loss = loss + value
  return loss, metrics
