"""The config of a training run: the typed `RunConfig`, built from an ml_collections ConfigDict (or
a dict) at the boundary (library code never sees a ConfigDict, and a key that is not an option is
an error naming it: `data.resolutoin`), the one base every config file starts from
(`base_config`: every field at its default, the method's options included), the shipped configs
(`configs/*.py`, by name) and the upgrade of a config.json written by an earlier version."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from persona_jax.data.pipeline import DataConfig
from persona_jax.errors import ConfigError
from persona_jax.methods.registry import method_config
from persona_jax.train.optim import OptimConfig, check as check_optim


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: str = "default"             # a diffusers folder, a single .safetensors file, or "default"
  model_config: str = ""             # single-file model: a diffusers folder of its family
  prediction_type: str = ""          # single-file model without model_config: epsilon | v_prediction
  method: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # {"name": ..., options}
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  steps: int = 1000                  # optimizer steps
  batch_size: int = 1                # per optimizer micro-step, over all devices
  seed: int = 0
  mixed_precision: str = "auto"      # auto | no | bf16 (bf16 compute, float32 trainable params)
  remat: str = "none"                # none | blocks | dots (UNet activation checkpointing)
  min_snr_gamma: float = 0.0         # 0: off; 5 is the paper's value
  offset_noise: float = 0.0
  prior_loss_weight: float = 1.0     # lambda of the class images' loss (data.num_class_images > 0)
  fsdp: int = 1                      # size of the mesh's fsdp axis
  sharding: tuple = ()               # ((regex over param paths, "replicate" | "fsdp"), ...)
  log_every: int = 10
  report_to: str = ""                # also to: tensorboard (event files in WORKDIR), wandb, or both
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  sample_every: int = 0              # 0: sample only at the end
  sample_prompts: tuple = ()
  sample_negative_prompt: str = ""
  sample_steps: int = 25
  sample_guidance: float = 7.5
  sample_images: int = 2             # per prompt
  sample_seed: int = 0

  @property
  def method_name(self) -> str:
    return self.method["name"]

  @property
  def method_options(self) -> dict:
    return {k: v for k, v in self.method.items() if k != "name"}

  def to_dict(self) -> dict:
    return _plain(dataclasses.asdict(self))


def _plain(x):
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _tuples(x):
  if isinstance(x, (list, tuple)):
    return tuple(_tuples(v) for v in x)
  return x


def _typed(cls, values: Mapping, prefix: str):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out = {}
  for key, value in values.items():
    if key not in fields:
      raise ConfigError(f"config key '{prefix}{key}' is not an option (options under "
                        f"'{prefix or 'the top level'}': {', '.join(sorted(fields))})")
    f = fields[key]
    if dataclasses.is_dataclass(f.default):
      out[key] = _typed(type(f.default), value, f"{prefix}{key}.")
    elif key == "method":
      out[key] = dict(value)
    else:
      out[key] = _tuples(value)
  return cls(**out)


def base_config(method: str):
  """The ConfigDict of every RunConfig field at its default, `method` holding the method's name
  and every option at its default: a config file sets only what differs from it."""
  from ml_collections import ConfigDict

  from persona_jax.methods.registry import spec
  values = _overridable(dataclasses.asdict(RunConfig()))
  values["method"] = {"name": method, **_overridable(dataclasses.asdict(spec(method).config()))}
  return ConfigDict(values)


def _overridable(x):
  """Sequences as tuples: ml_collections overrides tuple fields from the command line
  (`--config.optim.lr_groups='(("unet/.*", 1e-5),)'`), never list fields."""
  if isinstance(x, Mapping):
    return {k: _overridable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_overridable(v) for v in x)
  return x


def upgrade(values: Mapping) -> dict:
  """A run config (config.json) of an earlier version with today's keys: `optim.groups`
  (multipliers of optim.lr) became `optim.lr_groups` (learning rates), `method.prior_loss_weight`
  the top-level `prior_loss_weight`, and each method moves its own recipe knobs
  (`MethodSpec.upgrade`: its learning rates, ...)."""
  import copy

  from persona_jax.methods.registry import METHODS
  values = copy.deepcopy(dict(values))
  optim = values.setdefault("optim", {})
  if "groups" in optim:
    lr = optim.get("lr", OptimConfig.lr)
    optim["lr_groups"] = [[p, m * lr] for p, m in optim.pop("groups")] + list(optim.get("lr_groups", []))
  method = values.get("method", {})
  if "prior_loss_weight" in method:
    values.setdefault("prior_loss_weight", method.pop("prior_loss_weight"))
  upgrade_method = getattr(METHODS.get(method.get("name")), "upgrade", None)
  if upgrade_method is not None:
    upgrade_method(method, values)
  return values


MIXED_PRECISION = ("auto", "no", "bf16")


def resolve_mixed_precision(value: str, backend: str | None = None) -> str:
  """`no` or `bf16` for a config's mixed_precision: `auto` is bf16 on an accelerator (GPU, TPU)
  and no (float32) on CPU, where bf16 is slow; `backend` default: JAX's default backend."""
  if value != "auto":
    return value
  import jax
  return "no" if (backend or jax.default_backend()) == "cpu" else "bf16"


def run_config(values) -> RunConfig:
  """RunConfig from a ConfigDict or nested dict; checks every key, including the method's."""
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  config = _typed(RunConfig, values, "")
  if "name" not in config.method:
    raise ConfigError("config key 'method.name' is missing")
  method_config(config.method_name, config.method_options)     # typos in method options fail here
  if config.mixed_precision not in MIXED_PRECISION:
    raise ConfigError(f"mixed_precision: '{config.mixed_precision}' is not one of "
                      f"{', '.join(MIXED_PRECISION)}")
  check_optim(config.optim)
  if config.remat not in ("none", "blocks", "dots"):
    raise ConfigError(f"remat: '{config.remat}' is not one of none, blocks, dots")
  for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    if getattr(config, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
  if config.prior_loss_weight < 0:
    raise ConfigError(f"prior_loss_weight must be >= 0, got {config.prior_loss_weight}")
  if config.data.num_class_images > 0 and config.prior_loss_weight == 0:
    raise ConfigError("data.num_class_images: with prior_loss_weight 0 the class images would be "
                      "sampled and then ignored; set data.num_class_images=0 (no prior "
                      "preservation) or prior_loss_weight > 0")
  return config


def config_path(arg: str) -> str:
  """`--config` value: a path (`configs/x.py[:variant]`) or a shipped config's name (`x[:variant]`)."""
  import importlib.resources
  path, _, variant = arg.partition(":")
  if not path.endswith(".py") and "/" not in path:
    shipped = importlib.resources.files("persona_jax.configs") / f"{path}.py"
    if not shipped.is_file():
      names = [name for name, _, _ in shipped_configs()]
      raise ConfigError(f"--config {arg}: no shipped config '{path}' (shipped: {', '.join(names)})")
    path = str(shipped)
  return f"{path}:{variant}" if variant else path


def load_config(arg: str):
  """The ConfigDict of `--config NAME[:variant]` (or a path), as `train` builds it."""
  import importlib.util
  path, _, variant = config_path(arg).partition(":")
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def shipped_configs() -> list[tuple[str, tuple[str, ...], str]]:
  """(name, variants, first docstring line) of every shipped config file (`configs/*.py`)."""
  import ast
  import importlib.resources
  out = []
  for path in sorted(importlib.resources.files("persona_jax.configs").iterdir(), key=lambda p: p.name):
    if not path.name.endswith(".py") or path.name.startswith("_"):
      continue
    module = ast.parse(path.read_text())
    summary = (ast.get_docstring(module) or "").strip().splitlines()
    variants = ()
    for node in module.body:
      if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "VARIANTS" for t in node.targets):
        variants = tuple(ast.literal_eval(node.value))
    out.append((path.name[:-3], variants, summary[0] if summary else ""))
  return out
