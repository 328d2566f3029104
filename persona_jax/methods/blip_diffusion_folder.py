"""The BLIP-Diffusion pipeline folder (diffusers' deprecated `BlipDiffusionPipeline`, as
Salesforce/blipdiffusion is laid out) read into a `BlipDiffusionPipeline`, and tiny random ones
written in that layout (`make-random-model --preset blip_diffusion`).

  model_index.json   `_class_name` "BlipDiffusionPipeline", `ctx_begin_pos` (2), `mean` / `std`
                     (the image normalization; null: the image processor's)
  unet/ vae/         SD 1.x's, read by the SD loader (convert/diffusers_folder.py)
  text_encoder/      ContextCLIPTextModel: CLIPTextModel's config and keys
  tokenizer/         CLIP's
  scheduler/         PNDMScheduler in the release: read for its noise schedule; sampling uses
                     DDIM (the default for schedulers we do not have) or --scheduler
  qformer/           Blip2QFormerModel (convert/blip_diffusion_weights.py), its vision tower in it
  image_processor/   BlipImageProcessor's preprocessor_config.json (data/blip_images.py)
  qformer_tokenizer/ optional: the Q-Former's BERT vocabulary, else the shipped bert-base-uncased
                     one (qformer_tokenizer.py); its size (with [DEC]) must be the Q-Former's
                     word-embedding rows.
The loaded pipeline is an SD pipeline (`text_encoder` is the context CLIP's params under CLIP's
names, so the plain text path, class images and the SD methods work on it) with the Q-Former's
params under params["qformer"] and the fields below.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from persona_jax.convert.diffusers_folder import (COMPONENTS, DIFFUSERS_VERSION, SCHEDULER_FILE,
                                                  TOKENIZER_CLASSES, Pipeline, parse_configs,
                                                  read_component)
from persona_jax.convert.files import read_safetensors, write_json, write_safetensors
from persona_jax.data.blip_images import PROCESSOR_FILE, blip_processing
from persona_jax.data.clip_images import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                          CLIPImageProcessorConfig)
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods.blip_diffusion_conditioning import QFORMER, BlipDiffusionConditioning
from persona_jax.models.blip2_config import Blip2Config
from persona_jax.models.configs import read_json
from persona_jax.qformer_tokenizer import (check_vocab_size, load_qformer_tokenizer,
                                           qformer_tokenizer_dir)
from persona_jax.tokenizer import load_tokenizer

PIPELINE_CLASS = "BlipDiffusionPipeline"
# model_index.json entries: component -> the classes we read it as.
CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
           "text_encoder": ("ContextCLIPTextModel",), "qformer": ("Blip2QFormerModel",),
           "tokenizer": TOKENIZER_CLASSES}
CTX_BEGIN_POS = 2


@dataclasses.dataclass
class BlipDiffusionPipeline(Pipeline):
  """A loaded BLIP-Diffusion folder: the SD pipeline plus params["qformer"] and these."""
  qformer_config: Blip2Config | None = None
  qformer_tokenizer_dir: Path | None = None
  ctx_begin_pos: int = CTX_BEGIN_POS
  image_processing: CLIPImageProcessorConfig | None = None

  @functools.cached_property
  def qformer_tokenizer(self):
    """The Q-Former's BertTokenizer (MODEL/qformer_tokenizer/, else the shipped one)."""
    return load_qformer_tokenizer(self.path)

  def conditioning(self) -> BlipDiffusionConditioning:
    return BlipDiffusionConditioning(self.qformer_config, self.text_encoder_config,
                                     self.ctx_begin_pos)


def _check_index(index: dict, source: Path) -> None:
  for name, classes in CLASSES.items():
    entry = index.get(name)
    if not entry or not isinstance(entry, list) or entry[1] is None:
      raise ModelFileError(f"{source}: component '{name}' is missing; a BLIP-Diffusion folder "
                           "needs qformer, text_encoder, tokenizer, unet, vae and scheduler")
    if entry[1] not in classes:
      raise ModelFileError(f"{source}: {name} is a {entry[1]}; supported: {', '.join(classes)}")
  if not index.get("scheduler") or index["scheduler"][1] is None:
    raise ModelFileError(f"{source}: component 'scheduler' is missing")


def _ctx_begin_pos(index: dict, prompt_length: int, source: Path) -> int:
  pos = index.get("ctx_begin_pos", CTX_BEGIN_POS)
  if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= prompt_length:
    raise ConfigError(f"{source}: ctx_begin_pos {pos!r} must be a whole number from 0 to "
                      f"{prompt_length} (the prompt's tokens beside the query embeddings)")
  return pos


def read_blip_folder(root, *, dtype=jnp.float32, variant: str | None = None,
                     allow_pickle: bool = False, attention: str = "auto") -> BlipDiffusionPipeline:
  """Loads a BLIP-Diffusion folder (module docstring; arguments as `pipeline.load_pipeline`).

  Raises:
    ModelFileError / ConfigError naming the file (and key) that is missing or does not match.
  """
  from persona_jax.convert.blip_diffusion_weights import load_qformer
  root = Path(root)
  index_path = root / "model_index.json"
  index = read_json(index_path)
  _check_index(index, index_path)
  raw = {"model_index": index, "scheduler": read_json(root / SCHEDULER_FILE)}
  for name in ("unet", "text_encoder", "vae"):
    if not (root / name).is_dir():
      raise ModelFileError(f"{root / name}: folder missing, but model_index.json lists {name}; "
                           "copy the whole pipeline folder")
    raw[name] = read_json(root / name / "config.json")
  configs = parse_configs(raw, dtype=dtype, attention=attention, root=f"{root}/")
  params = {c.name: read_component(root, c, configs[f"{c.name}_config"], dtype=dtype,
                                   variant=variant, allow_pickle=allow_pickle)
            for c in COMPONENTS if c.name in raw}
  qformer_config, params[QFORMER] = load_qformer(
      root / "qformer", dtype=dtype, attention=attention, variant=variant,
      allow_pickle=allow_pickle)
  text = configs["text_encoder_config"]
  qc = qformer_config.qformer_config
  if qc.hidden_size != text.hidden_size:
    raise ModelFileError(f"{root / 'qformer/config.json'}: the Q-Former's hidden_size "
                         f"{qc.hidden_size} is not the text encoder's {text.hidden_size}: its "
                         "query embeddings could not enter the text encoder")
  prompt_length = text.max_position_embeddings - qformer_config.num_query_tokens
  if prompt_length < 2:
    raise ModelFileError(f"{root / 'qformer/config.json'}: num_query_tokens "
                         f"{qformer_config.num_query_tokens} leaves no room for the prompt in "
                         f"the text encoder's {text.max_position_embeddings} positions")
  load_tokenizer(root / "tokenizer")     # fail now, naming the folder, rather than at first use
  words = load_qformer_tokenizer(root)
  rows = params[QFORMER]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  check_vocab_size(words, rows, root / "qformer")
  processor_path = root / PROCESSOR_FILE
  processing = blip_processing(read_json(processor_path) if processor_path.is_file() else None,
                               qformer_config.vision_config.image_size, mean=index.get("mean"),
                               std=index.get("std"), source=str(processor_path),
                               index_source=str(index_path))
  return BlipDiffusionPipeline(
      **configs, params=jax.device_put(params), tokenizer_dir=root / "tokenizer",
      raw_configs=raw, path=root, qformer_config=qformer_config,
      qformer_tokenizer_dir=qformer_tokenizer_dir(root),
      ctx_begin_pos=_ctx_begin_pos(index, prompt_length, index_path),
      image_processing=processing)


# ---------------------------------------------------------------------------------------------
# Tiny random folders in the released layout.

def model_index(scheduler_class: str = "PNDMScheduler") -> dict:
  """The model_index.json of a BLIP-Diffusion folder, as the release carries it."""
  return {
      "_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
      "ctx_begin_pos": CTX_BEGIN_POS, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
      "image_processor": ["blip_diffusion", "BlipImageProcessor"],
      "qformer": ["blip_diffusion", "Blip2QFormerModel"],
      "scheduler": ["diffusers", scheduler_class],
      "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
  }


def tiny_qformer_config(hidden_size: int, vocab_size: int, image_size: int = 28) -> dict:
  """A small Blip2Config (qformer/config.json) shaped as the release's: quick_gelu vision tower,
  cross-attention in every Q-Former layer, 4 query tokens of the text encoder's width."""
  return {
      "model_type": "blip-2", "architectures": ["Blip2QFormerModel"], "num_query_tokens": 4,
      "vision_config": {"model_type": "blip_2_vision_model", "hidden_size": 24,
                        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "image_size": image_size, "patch_size": 14, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-6},
      "qformer_config": {"model_type": "blip_2_qformer", "vocab_size": vocab_size,
                         "hidden_size": hidden_size, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "intermediate_size": 2 * hidden_size,
                         "hidden_act": "gelu", "max_position_embeddings": 64,
                         "cross_attention_frequency": 1, "encoder_hidden_size": 24,
                         "layer_norm_eps": 1e-12},
  }


def processor_config(image_size: int) -> dict:
  """BlipImageProcessor's preprocessor_config.json (its defaults) at `image_size`."""
  return {"image_processor_type": "BlipImageProcessor", "do_convert_rgb": True,
          "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
          "do_center_crop": True}


def random_qformer_params(config: Blip2Config, rng: np.random.Generator) -> dict:
  """Random Q-Former params: random_model's rules, and N(0, 0.5^2) for the query tokens and the
  vision tower's class and position embeddings."""
  from persona_jax.convert.blip_diffusion_weights import qformer_abstract_params
  from persona_jax.random_model import random_params
  flat = flatten_dict(qformer_abstract_params(config))
  bare = {k: v for k, v in flat.items() if k[-1] not in ("kernel", "embedding", "scale", "bias")}
  out = flatten_dict(random_params(unflatten_dict({k: v for k, v in flat.items()
                                                   if k not in bare}), rng))
  out.update({k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in bare.items()})
  return unflatten_dict(out)


def make_random_folder(out, seed: int = 0, overwrite: bool = False) -> Path:
  """Writes a tiny random BLIP-Diffusion folder at `out`: make-random-model's sd1 pipeline (its
  text encoder as the context CLIP) with a PNDM scheduler config, a random Q-Former over the
  shipped bert-base-uncased vocabulary (30523 rows with [DEC]), and BlipImageProcessor's config."""
  from persona_jax.convert.blip_diffusion_weights import qformer_state_dict
  from persona_jax.random_model import make_random_model
  out = Path(out)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ModelFileError(f"{out}: folder exists and is not empty; pass overwrite=True "
                         "(--overwrite) to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
    folder = make_random_model(Path(tmp) / "blip", "sd1", seed)
    text = read_json(folder / "text_encoder" / "config.json")
    write_json(folder / "text_encoder" / "config.json",
               dict(text, architectures=["ContextCLIPTextModel"]))
    weights = folder / "text_encoder" / "model.safetensors"      # + the buffer torch saves
    write_safetensors(weights, {**read_safetensors(weights), "text_model.embeddings.position_ids":
                                np.arange(text["max_position_embeddings"], dtype=np.int64)[None]})
    scheduler = read_json(folder / SCHEDULER_FILE)
    write_json(folder / SCHEDULER_FILE, {
        **{k: scheduler[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                     "beta_schedule", "prediction_type", "timestep_spacing")},
        "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 0,
        "trained_betas": None})
    write_json(folder / "model_index.json", model_index())
    raw = tiny_qformer_config(text["hidden_size"], len(load_qformer_tokenizer()))
    write_json(folder / "qformer" / "config.json", raw)
    config = Blip2Config.from_dict(raw)
    params = random_qformer_params(config, np.random.default_rng(seed + 1))
    state = qformer_state_dict(params)           # + the position_ids buffer torch saves
    positions = config.qformer_config.max_position_embeddings
    state["embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    write_safetensors(folder / "qformer" / "model.safetensors", state)
    write_json(folder / PROCESSOR_FILE, processor_config(config.vision_config.image_size))
    if out.exists():
      shutil.rmtree(out)
    folder.rename(out)
  return out


def read_conditioning(root) -> BlipDiffusionConditioning:
  """The conditioning of the BLIP-Diffusion folder `root` from its configs alone (no weights
  read): a training method's `make`, which sees the loaded params but not the folder's configs."""
  root = Path(root)
  index_path = root / "model_index.json"
  index = read_json(index_path)
  _check_index(index, index_path)
  text = parse_configs({"model_index": index, "scheduler": read_json(root / SCHEDULER_FILE),
                        **{n: read_json(root / n / "config.json")
                           for n in ("unet", "text_encoder", "vae")}},
                       root=f"{root}/")["text_encoder_config"]
  qformer = Blip2Config.from_dict(read_json(root / "qformer" / "config.json"),
                                  str(root / "qformer" / "config.json")).with_dtype(jnp.float32,
                                                                                    "auto")
  prompt_length = text.max_position_embeddings - qformer.num_query_tokens
  return BlipDiffusionConditioning(qformer, text, _ctx_begin_pos(index, prompt_length, index_path))
