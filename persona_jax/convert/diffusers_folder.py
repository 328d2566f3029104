"""The diffusers pipeline folder: its layout, the in-memory `Pipeline`, and its reader and writer.

A folder holds `model_index.json`, `unet/`, `text_encoder/`, `vae/` (each a config and weights),
`tokenizer/` and `scheduler/`; an SDXL folder (`StableDiffusionXLPipeline`) also
`text_encoder_2/` (CLIPTextModelWithProjection) and `tokenizer_2/`, and its model_index.json says
`force_zeros_for_empty_prompt`. The SDXL refiner (text_encoder_2 alone, aesthetic-score time
ids) is refused. `read_folder(path)` loads one into a `Pipeline`; `write_folder(pipe,
path)` writes the exact layout back, so a read -> write round trip is bit-exact.
`persona_jax.pipeline.load_pipeline` dispatches between this reader and the single-file one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.convert import diffusers as convert
from persona_jax.convert.files import read_weights, write_json, write_safetensors
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.errors import ModelFileError
from persona_jax.models.components import SDModels, abstract_params
from persona_jax.models.configs import TextEncoderConfig, UNetConfig, VAEConfig, read_json
from persona_jax.models.text_encoder import CLIPTextModel
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.models.vae import AutoencoderKL
from persona_jax.tokenizer import TOKENIZER_FILES, load_prompt_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"   # written into configs we create; the layout is the same since 0.20


@dataclasses.dataclass(frozen=True)
class Component:
  """How one weight-bearing component of a diffusers folder is stored."""
  name: str
  library: str
  class_names: tuple[str, ...]
  config_file: str
  weights_stem: str
  adapt: Any = None
  ignore: Any = None
  save_prefix: str = ""
  sdxl_only: bool = False         # text_encoder_2: present exactly in SDXL folders


COMPONENTS = (
    Component("unet", "diffusers", ("UNet2DConditionModel",), "config.json",
              "diffusion_pytorch_model"),
    Component("text_encoder", "transformers", ("CLIPTextModel",), "config.json", "model",
              adapt=convert.text_encoder_adapt, ignore=convert.text_encoder_ignore,
              # transformers 4.x cannot load the flattened (prefix-less) names 5.x writes.
              save_prefix=convert.TEXT_MODEL_PREFIX),
    Component("vae", "diffusers", ("AutoencoderKL",), "config.json", "diffusion_pytorch_model",
              adapt=convert.vae_adapt),
    Component("text_encoder_2", "transformers", ("CLIPTextModelWithProjection",), "config.json",
              "model", adapt=convert.text_encoder_adapt, ignore=convert.text_encoder_ignore,
              save_prefix=convert.TEXT_MODEL_PREFIX, sdxl_only=True),
)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SCHEDULER_FILE = "scheduler/scheduler_config.json"


@dataclasses.dataclass
class Pipeline:
  """A loaded SD 1.x/2.x or SDXL pipeline. `params` = {"unet": ..., "text_encoder": ..., "vae":
  ...} (+ "text_encoder_2" for SDXL)."""
  unet_config: UNetConfig
  text_encoder_config: TextEncoderConfig
  vae_config: VAEConfig
  scheduler_config: SchedulerConfig
  params: dict
  tokenizer_dir: Path
  raw_configs: dict          # the JSON objects as read: model_index, unet, text_encoder(_2), vae, scheduler
  path: Path | None = None
  text_encoder_2_config: TextEncoderConfig | None = None      # SDXL
  tokenizer_2_dir: Path | None = None                         # SDXL

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2_config is not None

  @property
  def force_zeros_for_empty_prompt(self) -> bool:
    """SDXL: a negative prompt not given is zeros, not the encoded "" (model_index.json's flag)."""
    return self.is_sdxl and bool(self.raw_configs["model_index"].get(
        "force_zeros_for_empty_prompt", True))

  @property
  def text_encoder_2(self) -> CLIPTextModel | None:
    return CLIPTextModel(self.text_encoder_2_config) if self.is_sdxl else None

  @functools.cached_property
  def tokenizer_2(self):
    return load_tokenizer(self.tokenizer_2_dir) if self.is_sdxl else None

  def models(self, unet: UNet2DConditionModel | None = None) -> SDModels:
    """The networks as one static bundle (`unet`: another UNet, e.g. with add-ons)."""
    return SDModels(unet or self.unet, self.text_encoder, self.vae, self.text_encoder_2)

  @property
  def unet(self) -> UNet2DConditionModel:
    return UNet2DConditionModel(self.unet_config)

  @property
  def text_encoder(self) -> CLIPTextModel:
    return CLIPTextModel(self.text_encoder_config)

  @property
  def vae(self) -> AutoencoderKL:
    return AutoencoderKL(self.vae_config)

  @functools.cached_property
  def tokenizer(self):
    return load_tokenizer(self.tokenizer_dir)

  @functools.cached_property
  def prompt_tokenizer(self):
    """The tokenizer for prompts alone (`tokenize`: the same ids, without importing transformers)."""
    return load_prompt_tokenizer(self.tokenizer_dir)

  @functools.cached_property
  def prompt_tokenizer_2(self):
    return load_prompt_tokenizer(self.tokenizer_2_dir) if self.is_sdxl else None

  @property
  def tokenizer_dirs(self) -> tuple[Path, ...]:
    """One tokenizer folder per text encoder (SDXL: two)."""
    return (self.tokenizer_dir,) + ((self.tokenizer_2_dir,) if self.is_sdxl else ())

  @property
  def vae_scale_factor(self) -> int:
    return self.vae_config.downsample_factor

  def num_params(self) -> dict[str, int]:
    return {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in self.params.items()}


def parse_configs(raw: dict, *, dtype=jnp.float32, attention: str = "auto", root: str = ""):
  """Typed configs of every component from the raw JSON dicts (runtime fields filled in)."""
  runtime = dict(dtype=dtype, param_dtype=dtype, attention=attention)
  sdxl = {}
  if "text_encoder_2" in raw:
    sdxl["text_encoder_2_config"] = dataclasses.replace(
        TextEncoderConfig.from_dict(raw["text_encoder_2"], f"{root}text_encoder_2/config.json"),
        with_projection=True, **runtime)
  configs = dict(
      unet_config=dataclasses.replace(
          UNetConfig.from_dict(raw["unet"], f"{root}unet/config.json"), **runtime),
      text_encoder_config=dataclasses.replace(
          TextEncoderConfig.from_dict(raw["text_encoder"], f"{root}text_encoder/config.json"),
          **runtime),
      vae_config=dataclasses.replace(
          VAEConfig.from_dict(raw["vae"], f"{root}vae/config.json"), **runtime),
      scheduler_config=SchedulerConfig.from_dict(raw["scheduler"], f"{root}{SCHEDULER_FILE}"),
      **sdxl,
  )
  _check_added_conditioning(configs, root)
  return configs


def _check_added_conditioning(configs: dict, root: str) -> None:
  """SDXL's UNet takes the second encoder's projection and 6 time ids; the refiner's 5 (an
  aesthetic score instead of the crop), and a UNet with text_time but no second encoder, are
  refused naming the key."""
  unet, te2 = configs["unet_config"], configs.get("text_encoder_2_config")
  source = f"{root}unet/config.json"
  if unet.addition_embed_type is None:
    if te2 is not None:
      raise ModelFileError(f"{source}: an SDXL pipeline (text_encoder_2) whose UNet has no "
                           "addition_embed_type 'text_time'; the UNet is not an SDXL UNet")
    return
  if te2 is None:
    raise ModelFileError(f"{source}: addition_embed_type 'text_time' (an SDXL UNet) needs "
                         "text_encoder_2 (CLIPTextModelWithProjection) in the pipeline")
  time_ids, rest = divmod(unet.projection_class_embeddings_input_dim - te2.projection_dim,
                          unet.addition_time_embed_dim)
  if (time_ids, rest) != (6, 0):
    kind = " (the SDXL refiner's aesthetic score)" if (time_ids, rest) == (5, 0) else ""
    raise ModelFileError(
        f"{source}: projection_class_embeddings_input_dim "
        f"{unet.projection_class_embeddings_input_dim} means {time_ids} time ids{kind} beside "
        f"text_encoder_2's projection_dim {te2.projection_dim}; persona_jax supports the SDXL "
        "base's 6 (original size, crop, target size)")
  if unet.cross_attention_dims[0] != configs["text_encoder_config"].hidden_size + te2.hidden_size:
    raise ModelFileError(
        f"{source}: cross_attention_dim {unet.cross_attention_dims[0]} is not the two text "
        f"encoders' widths added ({configs['text_encoder_config'].hidden_size} + "
        f"{te2.hidden_size}), as SDXL conditions on both")


def _check_model_index(index: dict, root: Path) -> None:
  source = root / "model_index.json"
  if index.get("requires_aesthetics_score"):
    raise ModelFileError(f"{source}: requires_aesthetics_score is true: an SDXL refiner; "
                         "persona_jax loads the SDXL base (stable-diffusion-xl-base-1.0 and "
                         "fine-tunes of it), not the refiner")
  sdxl = is_sdxl_index(index)
  for comp in COMPONENTS:
    if comp.sdxl_only and not sdxl:
      continue
    entry = index.get(comp.name)
    if comp.sdxl_only and (not entry or entry[1] is None):
      raise ModelFileError(f"{source}: a {index.get('_class_name')} without text_encoder_2; an "
                           "SDXL pipeline needs both text encoders (text_encoder_2: "
                           "CLIPTextModelWithProjection) and tokenizer_2")
    if not entry or entry[1] is None:
      raise ModelFileError(f"{source}: component '{comp.name}' is missing; persona_jax needs "
                           "unet, text_encoder, tokenizer, vae and scheduler")
    if entry[1] not in comp.class_names:
      raise ModelFileError(f"{source}: {comp.name} is a {entry[1]}; supported: "
                           f"{', '.join(comp.class_names)}")
  for name in ("tokenizer", "scheduler") + (("tokenizer_2",) if sdxl else ()):
    if not index.get(name) or index[name][1] is None:
      what = " (an SDXL pipeline needs both tokenizers)" if name == "tokenizer_2" else ""
      raise ModelFileError(f"{source}: component '{name}' is missing{what}")
  for name in ("tokenizer",) + (("tokenizer_2",) if sdxl else ()):
    if index[name][1] not in TOKENIZER_CLASSES:
      raise ModelFileError(f"{source}: {name} is a {index[name][1]}; supported: "
                           f"{', '.join(TOKENIZER_CLASSES)}")
  known = {c.name for c in COMPONENTS} | {"tokenizer", "tokenizer_2", "scheduler"}
  for name, entry in index.items():
    if name.startswith("_") or name in known or not isinstance(entry, list):
      continue
    if entry[1] is not None:
      log.info("%s: ignoring component '%s' (%s), persona_jax does not use it", source, name,
               entry[1])


def is_sdxl_index(index: dict) -> bool:
  """An SDXL pipeline: its class says so, or it lists a text_encoder_2."""
  entry = index.get("text_encoder_2")
  return (str(index.get("_class_name", "")).startswith("StableDiffusionXL")
          or bool(entry and entry[1] is not None))


def components_of(raw_or_index: dict) -> tuple[Component, ...]:
  """The weight-bearing components of a pipeline (by its model_index.json)."""
  index = raw_or_index.get("model_index", raw_or_index)
  sdxl = is_sdxl_index(index)
  return tuple(c for c in COMPONENTS if sdxl or not c.sdxl_only)


def read_component(root: Path, comp: Component, config, *, dtype=jnp.float32,
                   variant: str | None = None, allow_pickle: bool = False) -> dict:
  """One component's params from ROOT/comp.name/ (strict: every tensor, the config's shapes)."""
  state, source = read_weights(root / comp.name, comp.weights_stem, variant, allow_pickle)
  return convert.state_dict_to_params(state, abstract_params(comp.name, config), source=source,
                                      dtype=dtype, adapt=comp.adapt, ignore=comp.ignore)


def read_folder(root: Path, *, dtype=jnp.float32, variant: str | None = None,
                allow_pickle: bool = False, attention: str = "auto") -> Pipeline:
  """Loads a diffusers-format SD 1.x/2.x folder (arguments as `pipeline.load_pipeline`)."""
  root = Path(root)
  if not root.is_dir():
    raise ModelFileError(f"{root}: model folder not found")
  if not (root / "model_index.json").is_file():
    raise ModelFileError(f"{root}: no model_index.json; is this a diffusers pipeline folder? "
                         "(a single-file checkpoint is a .safetensors file)")
  index = read_json(root / "model_index.json")
  _check_model_index(index, root)
  raw = {"model_index": index, "scheduler": read_json(root / SCHEDULER_FILE)}
  components = components_of(index)
  for comp in components:
    if not (root / comp.name).is_dir():
      what = " (an SDXL pipeline needs both text encoders)" if comp.sdxl_only else ""
      raise ModelFileError(f"{root / comp.name}: folder missing, but model_index.json lists "
                           f"{comp.name}{what}; copy the whole pipeline folder")
    raw[comp.name] = read_json(root / comp.name / comp.config_file)
  configs = parse_configs(raw, dtype=dtype, attention=attention, root=f"{root}/")
  params = {comp.name: read_component(root, comp, configs[f"{comp.name}_config"], dtype=dtype,
                                      variant=variant, allow_pickle=allow_pickle)
            for comp in components}
  sdxl = "text_encoder_2_config" in configs
  for name in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
    load_prompt_tokenizer(root / name)   # fail now, naming the folder, rather than at first use
  return Pipeline(**configs, params=jax.device_put(params), tokenizer_dir=root / "tokenizer",
                  raw_configs=raw, path=root,
                  tokenizer_2_dir=root / "tokenizer_2" if sdxl else None)


def model_index(scheduler_class: str = "DDIMScheduler", *, sdxl: bool = False,
                force_zeros_for_empty_prompt: bool = True) -> dict:
  """The model_index.json diffusers writes for a StableDiffusionPipeline (or, with `sdxl`, a
  StableDiffusionXLPipeline)."""
  if sdxl:
    return {
        "_class_name": SDXL_PIPELINE, "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "force_zeros_for_empty_prompt":
        force_zeros_for_empty_prompt, "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
  return {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
      "feature_extractor": [None, None], "image_encoder": [None, None],
      "requires_safety_checker": False, "safety_checker": [None, None],
      "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }


def write_folder(pipe: Pipeline, path, *, overwrite: bool = False, dtype=None,
                 variant: str | None = None) -> Path:
  """Writes `pipe` as a diffusers folder, atomically (a temporary folder, then rename); arguments
  as `pipeline.save_pipeline`."""
  out = Path(path)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ModelFileError(f"{out}: folder exists and is not empty; pass overwrite=True "
                         "(--overwrite) to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  try:
    index = model_index(pipe.scheduler_config.class_name, sdxl=pipe.is_sdxl,
                        force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)
    write_json(tmp / "model_index.json", index)
    write_json(tmp / SCHEDULER_FILE, pipe.raw_configs["scheduler"])
    for comp in components_of(index):
      config = dict(pipe.raw_configs[comp.name])
      if comp.library == "diffusers":
        config.setdefault("_class_name", comp.class_names[0])
        config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
      else:
        config.setdefault("architectures", [comp.class_names[0]])
        config.setdefault("model_type", "clip_text_model")
      write_json(tmp / comp.name / comp.config_file, config)
      state = convert.params_to_state_dict(pipe.params[comp.name], prefix=comp.save_prefix,
                                           unprefixed=("text_projection.",))
      if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
      name = f"{comp.weights_stem}.{variant}.safetensors" if variant else f"{comp.weights_stem}.safetensors"
      write_safetensors(tmp / comp.name / name, state)
    tokenizers = {"tokenizer": pipe.tokenizer_dir}
    if pipe.is_sdxl:
      tokenizers["tokenizer_2"] = pipe.tokenizer_2_dir
    for name, source_dir in tokenizers.items():
      (tmp / name).mkdir()
      for f in TOKENIZER_FILES:
        if (source_dir / f).is_file():
          shutil.copy2(source_dir / f, tmp / name / f)
    if out.exists():
      backup = out.with_name(f".{out.name}.old")
      if backup.exists():
        shutil.rmtree(backup)
      os.replace(out, backup)
      os.replace(tmp, out)
      shutil.rmtree(backup)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
