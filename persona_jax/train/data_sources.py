"""The data a run trains on: `data.source` names a source in this registry.

  images        (default) the instance images of `data.instance_dir` (or `data.concepts`) with
                their captions and, with `data.num_class_images`, a class stream (generated from
                the base when missing); VAE moments and text contexts cached when nothing that
                produces them trains (data/pipeline.py); with `data.buckets`, aspect-ratio
                buckets (data/buckets.py: class images cropped to each batch's bucket, moments
                cached per (image, bucket)); the only source that takes buckets
  <method's>    sources a method declares in its registry entry (`MethodSpec.data_sources`, e.g.
                FastComposer's `fastcomposer` folders of captions with subject markers and masks)
  pkg.mod:func  any other builder, imported by that name (e.g. the toy world's scenes)

A source is `build(request: DataRequest) -> DataBuild` (both in methods/spec.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from pathlib import Path

import jax
import numpy as np

from persona_jax.class_images import count_images, make_class_images
from persona_jax.data import pipeline as data
from persona_jax.data.buckets import check_config as check_buckets
from persona_jax.data.images import DataError
from persona_jax.diffusion.conditioning import encode_for_cache, text_encoders
from persona_jax.errors import ConfigError
from persona_jax.methods.spec import DataBuild, DataRequest
from persona_jax.text_to_image import SampleOptions
from persona_jax.tokenizer import tokenize_prompts

log = logging.getLogger(__name__)


def image_source(request: DataRequest) -> DataBuild:
  """The instance (and class) examples, with what can be encoded once cached (VAE moments
  without random crops, text contexts when nothing in the text path trains)."""
  config, pipe, method = request.config, request.pipe, request.method
  if config.data.buckets:
    check_buckets(config.data, pipe.vae_scale_factor)      # before any image is read
  instances = data.load_instances(config.data, method.tokens.expand)
  used = sorted(set(instances.buckets)) if instances.buckets is not None else None
  classes = class_images(config, pipe, request.workdir, request.progress, used)
  dataset_kwargs = {"classes": classes, "latent_factor": pipe.vae_scale_factor,
                    "image_inputs": method.image_inputs}
  needed = {"unet"}                    # (the loop adds the method's components)
  if config.data.center_crop and not config.data.zoom_augment:
    encode = functools.partial(data.encode_moments, pipe.vae, pipe.params["vae"],
                               mirror=config.data.random_flip > 0)
    if used is not None:               # buckets: each image at its bucket's shape, per shape
      extra = [] if classes is None else [i for b in used for i in classes[b].images]
      views = 2 if config.data.random_flip > 0 else 1
      means, logvars = data.encode_moments_by_shape(
          lambda x: encode(x, batch=min(len(x) * views, data.encode_batch(x.shape[1:3]))),
          instances.images + extra)
      n = len(instances.images)
      dataset_kwargs["moments"] = (means[:n], logvars[:n])
      if classes is not None:
        dataset_kwargs["class_moments"] = {}
        for b in used:
          k = len(classes[b].images)
          dataset_kwargs["class_moments"][b] = (np.stack(means[n: n + k]),
                                                np.stack(logvars[n: n + k]))
          n += k
    else:
      dataset_kwargs["moments"] = encode(np.stack(instances.images))
      if classes is not None:
        dataset_kwargs["class_moments"] = encode(np.stack(classes.images))
  else:
    needed.add("vae")
  tokenize_fn = functools.partial(tokenize_prompts, request.tokenizers)
  if method.text_trains(request.trainable):
    needed.update(text_encoders(pipe.params))
    dataset_kwargs["tokenize"] = tokenize_fn
  else:
    one_set = next(iter(classes.values())) if isinstance(classes, dict) else classes
    captions = data.all_captions(instances, config.data.caption_dropout, one_set)
    if config.data.zoom_augment:
      captions = sorted(set(captions) | set(data.zoom_captions(instances)))
    encode = jax.jit(lambda ids: encode_for_cache(request.models, pipe.params, ids))
    dataset_kwargs["contexts"] = data.encode_captions(encode, tokenize_fn, captions)
    dataset_kwargs["caption_index"] = {c: i for i, c in enumerate(captions)}
  dataset = data.make_dataset(config.data, instances, config.batch_size, config.seed,
                              row_block=request.row_block, **dataset_kwargs)
  return DataBuild(dataset, classes, frozenset(needed), local_rows=True)


def class_images(config, pipe, workdir, progress: bool, buckets=None):
  """The run's class images (None without prior preservation), generated first if missing: per
  concept, `num_class_images` from `class_dir` (default WORKDIR/class_images, or
  WORKDIR/class_images/K for concept K of several). Missing ones are sampled at the square
  `resolution`; with `buckets` (those the instance images use) the result is a dict
  {bucket: InstanceSet} of every class image resized to cover that bucket and cropped to it."""
  d = config.data
  if d.num_class_images <= 0:
    if d.class_dir:
      log.warning("data.class_dir is set but data.num_class_images is 0: no prior preservation")
    return None
  concepts = data.concept_configs(d)
  sets = [concept_class_images(c, k if len(concepts) > 1 else None, pipe, workdir, progress,
                               buckets) for k, c in enumerate(concepts)]
  if buckets is not None:
    return {b: _joined([s[b] for s in sets]) for b in buckets}
  return _joined(sets)


def _joined(sets):
  """Several concepts' class images as one set."""
  cat = lambda field: [x for s in sets for x in getattr(s, field)]     # noqa: E731
  return data.InstanceSet(cat("images"), cat("captions"), sets[-1].folder, sizes=cat("sizes"),
                          crops=cat("crops"),
                          buckets=cat("buckets") if sets[0].buckets is not None else None)


def concept_class_images(d, index, pipe, workdir, progress: bool, buckets=None):
  """The class images of one concept (`index` None: the only one); with `buckets`, by bucket."""
  field = "data.class_prompt" if index is None else f"data.concepts[{index}].class_prompt"
  if not d.class_prompt:
    raise ConfigError(f"{field}: class images need their prompt (e.g. 'a photo of a dog')")
  if d.class_dir:
    folder = Path(d.class_dir)
  elif workdir is not None:
    folder = Path(workdir) / "class_images" / ("" if index is None else str(index))
  else:
    raise ConfigError("data.class_dir: set the folder of the class images")
  have = count_images(folder)
  if have < d.num_class_images:
    if not d.class_generate:
      raise DataError(f"{folder}: {have} class image(s) found, data.num_class_images is "
                      f"{d.num_class_images}, and data.class_generate is off so there is no model "
                      "to sample the rest from; run `persona-jax make-class-images --out "
                      f"{folder} ...` or set data.class_generate=True")
    options = SampleOptions(steps=d.class_sample_steps, guidance=d.class_guidance, seed=0,
                            height=d.resolution, width=d.resolution, batch_size=4)
    make_class_images(pipe, d.class_prompt, d.num_class_images, folder, options=options,
                      negative_prompt=d.class_negative_prompt, progress=progress)
  return data.load_class_images(d, folder, buckets)


BUILTIN = {"images": image_source}


def data_sources() -> dict:
  """Every registered source by name: the built-in ones and those the methods declare."""
  from persona_jax.methods.registry import METHODS
  out = dict(BUILTIN)
  for spec in METHODS.values():
    out.update(spec.data_sources)
  return out


def resolve(name: str):
  """The builder of `data.source`: a registered name or `package.module:function`."""
  sources = data_sources()
  if name in sources:
    return sources[name]
  module, sep, attr = name.partition(":")
  if not sep:
    raise ConfigError(f"data.source: '{name}' is not a data source (known: "
                      f"{', '.join(sorted(sources))}; or package.module:function)")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"data.source: cannot import '{name}' ({e})") from None


def build(request: DataRequest) -> DataBuild:
  """The run's dataset from its `data.source`, each batch the request's `row_block` of the
  global batch (a source that loads whole batches has the block taken from each)."""
  builder = resolve(request.config.data.source)
  if request.config.data.buckets and builder is not image_source:
    raise ConfigError(f"data.buckets: the data source '{request.config.data.source}' makes square "
                      "examples; buckets work with the 'images' source (set data.buckets=False)")
  built = builder(request)
  if request.config.data.num_class_images > 0 and built.classes is None:
    raise ConfigError(f"data.num_class_images: the data source '{request.config.data.source}' "
                      "takes no class images; set it to 0")
  if request.row_block != (0, 1) and not built.local_rows:
    built = dataclasses.replace(built, dataset=built.dataset.map(data.TakeRows(request.row_block)),
                                local_rows=True)
  return built
