"""The parts of a method's registry entry (`MethodSpec`): what a method module declares about its
whole lifecycle. methods/registry.py lists the entries; see its docstring for what each part does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

IMAGE_COUNTS = ("none", "one", "some", "any")


@dataclasses.dataclass(frozen=True)
class Knob:
  """A sampling input a user sets by name (`--input NAME=VALUE`, or the flag `--NAME`): a traced
  number (type float or int), or a path (not traced)."""
  name: str
  help: str
  type: type = float


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """How a result samples: how many subject images it takes ("none", "one", "some": at least
  one, "any": zero or more), its knobs, and the per-method flag of `sample` (an alias of `--run`)."""
  images: str = "none"
  knobs: tuple[Knob, ...] = ()
  flag: str = ""
  flag_help: str = ""


@dataclasses.dataclass(frozen=True)
class DataRequest:
  """What a data source (`MethodSpec.data_sources`, train/data_sources.py) may read to build a
  run's dataset."""
  config: Any                      # RunConfig
  pipe: Any                        # the base Pipeline
  method: Any                      # the built Method
  models: Any                      # SDModels of the run
  tokenizer: Any                   # with the method's tokens
  tokenizers: tuple                # one per text encoder (SDXL: two), with the method's tokens
  trainable: dict                  # the initial trainable tree (what trains decides what caches)
  workdir: Path | None
  progress: bool
  # (i, n): this process loads block i of n equal row blocks of every global batch
  # (data/pipeline.py `row_slice`); (0, 1) with one process.
  row_block: tuple = (0, 1)


@dataclasses.dataclass(frozen=True)
class DataBuild:
  """A built dataset (grain, infinite batches), its class images (or None) and the frozen
  components the step needs to turn its batches into latents and conditioning. `local_rows`:
  its batches are already the request's `row_block` (else the loop takes that block of each).
  `initialize`: (initial trainable tree) -> the tree the run starts from, for new leaves set from
  the data (BLIP-Diffusion's subject embedding: the mean over the subject's images, as LAVIS's
  `before_training`), or None."""
  dataset: Any
  classes: Any = None
  needed: frozenset = frozenset({"unet", "vae", "text_encoder"})
  local_rows: bool = False
  initialize: Callable | None = None


@dataclasses.dataclass(frozen=True)
class ResultSpec:
  """WORKDIR/`file` holds a run's result; `format`: its metadata format tag (None: untagged)."""
  file: str
  format: str | None = None


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """What a method's `sample` gets."""
  result: Any                      # its loaded Result
  pipe: Any                        # the base Pipeline to sample on
  params: dict                     # the tree to start from (the base's, maybe with LoRAs merged)
  images: tuple[Path, ...] = ()    # the subject images (--image)
  inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # knob values given
  allow_pickle: bool = False


@dataclasses.dataclass(frozen=True)
class ExportRequest:
  """What a method's export gets: the finished run and the output folder."""
  workdir: Path
  result: Any                      # the run's loaded result (the method's `load`)
  config: dict                     # WORKDIR/config.json (upgraded to today's keys)
  out: Path
  base: Path                       # the base model (resolved)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # its export_options given


@dataclasses.dataclass(frozen=True)
class EvalRecipe:
  """How `persona-jax eval` runs a method on one toy-world subject.

  kind: "tuned" (trains on the references, samples the run), "one_image" (tunes from a
    pre-trained state on the first reference and samples with it) or "tuning_free" (samples a run
    trained once on the world with the references: `--state`).
  phrase: the subject in prompts; {cls} is the class word.
  config, steps, lr, options, prior: tuned / one_image: the configs/ name (its :tiny variant is the
    start; "name:variant" another variant), steps, learning rate, (dotted config key, value)
    overrides, class images of "a photo of a {cls}".
  state_key: one_image, tuned: the config key the pre-trained state (`--state`) goes to;
    state_default: the state without --state ("": --state is required); state_result: the key
    gets the state run's result (WORKDIR/the method's result file) when that exists, else the
    path given.
  inputs: the sampling knobs ((name, value), ...; `--input` overrides by name); "{cls}" in a str
    value is the subject's class, "{references}" its reference folder.
  class_prompts: tuning_free: the class prompts sample with "base" (the frozen base itself) or
    "run" (the run without images).
  subject_images: tuning_free: the subject's images it samples with: "references" (all of them),
    "first" (the first) or "segmented" (the first, its background replaced by noise and cropped
    to the subject).
  """
  kind: str
  phrase: str
  config: str = ""
  steps: int = 0
  lr: float = 0.0
  options: tuple = ()
  prior: bool = False
  state_key: str = ""
  state_default: str = "shipped"
  state_result: bool = False
  inputs: tuple = ()
  class_prompts: str = "base"
  subject_images: str = "references"


@dataclasses.dataclass(frozen=True)
class VerifySpec:
  """`persona-jax verify MODEL FLAG VALUE`: `run(pipe, model_path, value, **options)` ->
  [verify.Comparison] (options: seed, image_encoder, allow_pickle; with `images`, also the
  `--image` paths given as `images`)."""
  flag: str
  metavar: str
  help: str
  run: Callable
  images: bool = False


@dataclasses.dataclass(frozen=True)
class Command:
  """An extra subcommand: `add_arguments(parser)` then `run(args) -> exit code`."""
  name: str
  help: str
  add_arguments: Callable
  run: Callable


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """A pipeline folder a method owns: one whose model_index.json `_class_name` is in `classes`.

  load(path, *, dtype, variant, allow_pickle, attention) -> Pipeline: the folder read (an SD
    pipeline holding the method's extra parts); `sample --model DIR` then samples through the
    method's `sample` (SampleRequest.result None) and other commands use it as an SD base.
  verify(pipe, path, *, seed, sampler, variant, allow_pickle) -> [verify.Comparison]: what
    `persona-jax verify DIR` compares (None: not verifiable).
  preset, make_random(out, seed, overwrite) -> Path: `make-random-model --preset PRESET` writes
    a tiny random folder of this layout.
  """
  classes: tuple[str, ...]
  load: Callable
  verify: Callable | None = None
  preset: str = ""
  make_random: Callable | None = None


def _recorded_base(result):
  return result.meta.get("base_model") or None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One method's lifecycle (see the module docstring)."""
  name: str
  config: type
  make: Callable
  result: ResultSpec
  load: Callable
  sample: Callable
  sampling: SamplingSpec = SamplingSpec()
  base_model: Callable = _recorded_base
  exports: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  export_options: tuple[Knob, ...] = ()          # flags of `persona-jax export` (--timestep, ...)
  eval: Mapping[str, EvalRecipe] = dataclasses.field(default_factory=dict)
  verify: VerifySpec | None = None
  data_sources: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  # (method section, whole run config) of a config.json from an earlier version -> rewritten in
  # place to today's keys (recipe knobs that moved to the run config).
  upgrade: Callable | None = None
  # Whether it trains and samples on SDXL bases too (False: SD 1.x/2.x only, a one-line error).
  sdxl: bool = False
  # The pipeline folders that are this method's own model (BLIP-Diffusion's), or None.
  pipeline: PipelineSpec | None = None
