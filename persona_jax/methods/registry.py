"""Every method's whole lifecycle, by name: options, training, result file, sampling, export,
evaluation and verification. `train`, `sample`, `export`, `eval` and `verify` find a method here
and never branch on its name.

A method module declares one `MethodSpec` (its `SPEC`) and this module lists them:

  config, make        the typed options (`method.*` of a run config) and
                      `make(config, base_params, tokenizer_dir, unet_config) -> Method`
  result              its result file (name and format tag) and `load(path) -> Result`
  sample              `sample(SampleRequest) -> Sampling`: how a result samples, with which
                      inputs (`sampling`: how many `--image`, the traced knobs, a legacy flag)
  base_model          `(result) -> model path or None`: the base a result samples on by default
  exports             {format: `export(ExportRequest) -> (paths, record)`}; `export_options`:
                      its own flags of `persona-jax export` (Knobs: --timestep, ...)
  eval                {eval name: EvalRecipe}: how `persona-jax eval` runs it on the toy world
  verify              a `--FLAG VALUE` of `persona-jax verify` comparing its files with diffusers
  data_sources        {name: builder} data sources it brings (train/data_sources.py)
  upgrade             rewrites a config.json of an earlier version to today's keys
  sdxl                whether it trains on SDXL bases too (else a one-line error)
  pipeline            the pipeline folders it owns (model_index.json classes): their loader,
                      verify and random preset (`load_model`, `pipeline_owner`)
Modules in `COMMANDS` add subcommands (a `COMMAND`: Custom Diffusion's merge, importing an
official FastComposer release).
Adding a method: one module with its SPEC, one entry in `SPECS` below, one config
(docs/adding_a_method.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from pathlib import Path

from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods.spec import EvalRecipe, Knob, MethodSpec

SPECS = ("blip_diffusion", "custom_diffusion", "dreambooth", "e4t", "fastcomposer", "instantbooth",
         "ip_adapter", "lora", "photomaker", "pivotal", "textual_inversion")
COMMANDS = ("custom_diffusion_merge", "fastcomposer_official")
METHODS: dict[str, MethodSpec] = {}
for _module in SPECS:
  _spec = importlib.import_module(f"persona_jax.methods.{_module}").SPEC
  METHODS[_spec.name] = _spec


def commands() -> list:
  """The subcommands methods add (methods/spec.py `Command`)."""
  return [importlib.import_module(f"persona_jax.methods.{m}").COMMAND for m in COMMANDS]


def spec(name: str) -> MethodSpec:
  if name not in METHODS:
    raise ConfigError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
  return METHODS[name]


def method_config(name: str, values: Mapping):
  """The typed config of method `name` from the `method` section of a run config."""
  cls = spec(name).config
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"method.{unknown[0]}: not an option of {name} "
                      f"(options: {', '.join(sorted(fields))})")
  return cls(**values)


def pipeline_owner(path) -> MethodSpec | None:
  """The method whose own pipeline folder `path` is (by its model_index.json `_class_name`), or
  None (other folders, single files, unreadable indexes: the SD loader reports those)."""
  index = Path(path) / "model_index.json" if path is not None else None
  if index is None or not index.is_file():
    return None
  try:
    name = json.loads(index.read_text()).get("_class_name")
  except (OSError, ValueError, AttributeError):
    return None
  for s in METHODS.values():
    if s.pipeline is not None and name in s.pipeline.classes:
      return s
  return None


def load_model(path, **kwargs):
  """`pipeline.load_pipeline(path, **kwargs)`, or for a pipeline folder a method owns
  (BLIP-Diffusion's) that method's loader (`dtype`, `variant`, `allow_pickle`, `attention`;
  single-file options are an error there)."""
  owner = pipeline_owner(path)
  if owner is None:
    from persona_jax.pipeline import load_pipeline
    return load_pipeline(path, **kwargs)
  single = sorted(k for k in ("config_dir", "prediction_type") if kwargs.pop(k, None) is not None)
  if single:
    raise ConfigError(f"{path}: --{single[0].replace('_', '-')} is for single-file checkpoints; "
                      "a pipeline folder has its own configs")
  return owner.pipeline.load(Path(path), **kwargs)


def random_presets() -> dict[str, MethodSpec]:
  """The `make-random-model` presets methods add, by name."""
  return {s.pipeline.preset: s for s in METHODS.values()
          if s.pipeline is not None and s.pipeline.make_random is not None}


def make_method(name: str, values: Mapping, base_params, tokenizer_dir=None, unet_config=None):
  """Builds the Method from its name, its config values and the base model (an SDXL base only
  for methods whose entry says `sdxl`)."""
  entry = spec(name)
  if "text_encoder_2" in base_params and not entry.sdxl:
    on_xl = sorted(n for n, s in METHODS.items() if s.sdxl)
    raise ConfigError(f"method.name: {name} trains on SD 1.x/2.x bases only and the model is "
                      f"SDXL; on SDXL use {', '.join(on_xl)}, or pass an SD 1.x/2.x model")
  return entry.make(method_config(name, values), base_params, tokenizer_dir, unet_config)


def format_tag(path: Path) -> str | None:
  """The `format` metadata of a .safetensors file (None otherwise)."""
  from persona_jax.methods.result_file import metadata
  try:
    return metadata(path).get("format")
  except Exception:  # a file safetensors cannot parse is reported by the method's loader
    return None


def read_run_config(workdir: Path) -> dict | None:
  """WORKDIR/config.json as written (train.config.upgrade gives today's keys), or None."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    raise ModelFileError(f"{path}: not valid JSON (a damaged run folder?)") from None


def find_run(path, method: str | None = None):
  """(spec, result) of a run folder (its config.json names the method), a result folder (e.g. a
  merged or imported one: its result file's format tag does) or a result file (its tag); with
  `method` (a per-method flag), that method's result, whatever the folder holds."""
  path = Path(path)
  if not path.exists():
    raise ModelFileError(f"{path}: no such run folder or result file")
  config = read_run_config(path) if path.is_dir() else None
  if config is not None:
    from persona_jax.workdir_lock import check_not_running
    check_not_running(path, "use")
    from persona_jax.methods.result_file import check_current
    check_current(path)
  ran = config["method"]["name"] if config is not None else None
  if method is not None:
    if ran is not None and ran != method:
      raise ModelFileError(f"{path}: a {ran} run, not a {method} run")
    return METHODS[method], METHODS[method].load(path)
  if ran is not None:
    return spec(ran), spec(ran).load(path)
  tag = None if path.is_dir() else format_tag(path)
  for s in METHODS.values():
    if s.result.format is not None and s.result.format == (
        format_tag(path / s.result.file) if path.is_dir() else tag):
      return s, s.load(path)
  raise ModelFileError(f"{path}: neither a `persona-jax train` run (config.json) nor a persona_jax "
                       "result (a tagged result file); pass its run folder, or the method's own "
                       "flag (e.g. --ip-adapter FILE)")


def knobs() -> dict[str, Knob]:
  """Every method's sampling knobs by name (one flag each in the CLI)."""
  out = {}
  for s in METHODS.values():
    for knob in s.sampling.knobs:
      if knob.name in out:            # a knob of several methods: one flag, both helps
        knob = dataclasses.replace(out[knob.name], help=f"{out[knob.name].help}; {knob.help}")
      out[knob.name] = knob
  return out


def eval_recipes() -> dict[str, tuple[MethodSpec, EvalRecipe]]:
  """Every method's evaluation recipes by eval name (e.g. dreambooth, dreambooth_noprior)."""
  return {name: (s, r) for s in METHODS.values() for name, r in s.eval.items()}
