"""The toy BLIP-Diffusion base: a folder in the released layout (Salesforce/blipdiffusion) built
from the toy SD 1.x base plus a fresh, small subject encoder, for the stage-2 pre-training of
docs/blip_diffusion_training.md to start from.

  unet/ vae/ scheduler/ tokenizer/   the toy base's, as they are (its zero-terminal-SNR
                                     v-prediction DDIM schedule, not the release's PNDM one)
  text_encoder/                      the toy base's CLIP text encoder (64 wide) as the context
                                     text encoder: ContextCLIPTextModel has CLIPTextModel's keys
  qformer/                           Blip2QFormerModel, float32: the vision tower copied from the
                                     toy base's CLIP image encoder (image_encoder/: same shapes,
                                     q/k/v fused into `qkv`, the projection head dropped; its
                                     post_layernorm, which CLIP applies to the pooled token only,
                                     becomes BLIP-2's norm over every token), a fresh 4-layer
                                     Q-Former 64 wide (the text encoder's width: the ProjLayer
                                     writes into its embedding space) with 16 query tokens as
                                     released, cross-attention in every layer
  qformer_tokenizer/                 a BERT vocabulary of the special tokens and the toy world's
                                     class words (+ [DEC]: 12 rows), not bert-base-uncased's
                                     30523: the world's categories are its six class words, and
                                     30523 x 64 rows would be 3/4 of this Q-Former's weights
                                     (2.0M of 2.6M, vision tower included)
  image_processor/                   BlipImageProcessor at 32 px with the CLIP mean and std the
                                     vision tower was trained with
  model_index.json                   BlipDiffusionPipeline's, with ctx_begin_pos 2, mean, std

Every weight is deterministic given `seed`. Nothing here trains: stage 2 does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from persona_jax.convert.blip_diffusion_weights import (CONFIG_FILE, WEIGHTS_STEM,
                                                        qformer_abstract_params, qformer_state_dict)
from persona_jax.convert.files import read_safetensors, write_json, write_safetensors
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.blip2_config import Blip2Config
from persona_jax.qformer_tokenizer import FOLDER as QFORMER_TOKENIZER, shipped_qformer_tokenizer_dir
from persona_jax.world import scenes

DIFFUSERS_VERSION = "0.42.1"
CTX_BEGIN_POS = 2                          # after "<bos> a", as the pipeline and LAVIS put it
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
COPIED = ("unet", "vae", "scheduler", "tokenizer")
TOY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(scenes.CLASSES) + 1      # + [DEC], as the loader adds


@dataclasses.dataclass(frozen=True)
class QFormerSizes:
  """The fresh Q-Former's shape (the vision tower's is the toy image encoder's)."""
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  intermediate_size: int = 256
  num_query_tokens: int = 16
  cross_attention_frequency: int = 1
  max_position_embeddings: int = 32        # category tokens, [CLS] and [SEP] included


def toy_vocabulary() -> list[str]:
  """vocab.txt of the toy Q-Former tokenizer: BERT's special tokens, then the class words."""
  return [*SPECIAL_TOKENS, *scenes.CLASSES]


def qformer_config(image_encoder_config: dict, text_width: int,
                   sizes: QFormerSizes = QFormerSizes(), vocab_size: int = TOY_VOCAB_SIZE) -> dict:
  """qformer/config.json as transformers' Blip2Config writes it: the vision tower shaped as the
  CLIP image encoder `image_encoder_config`, the Q-Former `text_width` wide."""
  v = image_encoder_config
  vision = {
      "model_type": "blip_2_vision_model", "hidden_size": v["hidden_size"],
      "intermediate_size": v["intermediate_size"], "num_hidden_layers": v["num_hidden_layers"],
      "num_attention_heads": v["num_attention_heads"], "image_size": v["image_size"],
      "patch_size": v["patch_size"], "hidden_act": v.get("hidden_act", "quick_gelu"),
      "layer_norm_eps": v.get("layer_norm_eps", 1e-5), "attention_dropout": 0.0, "qkv_bias": True,
  }
  qformer = {
      "model_type": "blip_2_qformer", "vocab_size": vocab_size, "hidden_size": text_width,
      "num_hidden_layers": sizes.num_hidden_layers,
      "num_attention_heads": sizes.num_attention_heads,
      "intermediate_size": sizes.intermediate_size, "hidden_act": "gelu",
      "max_position_embeddings": sizes.max_position_embeddings, "layer_norm_eps": 1e-12,
      "cross_attention_frequency": sizes.cross_attention_frequency,
      "encoder_hidden_size": v["hidden_size"], "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
  }
  return {"model_type": "blip-2", "architectures": ["Blip2QFormerModel"],
          "vision_config": vision, "qformer_config": qformer,
          "num_query_tokens": sizes.num_query_tokens}


def vision_tower_from_clip(clip_state: dict, num_layers: int) -> dict:
  """CLIPVisionModel(WithProjection) tensors -> BLIP-2's `visual_encoder.*` keys (float32):
  the same ViT (class token, positions, pre-norm layers with quick_gelu MLPs); q, k and v
  concatenated into `qkv`; `visual_projection` left out."""
  src = lambda k: np.asarray(clip_state[f"vision_model.{k}"], np.float32)   # noqa: E731
  out = {
      "embeddings.patch_embedding.weight": src("embeddings.patch_embedding.weight"),
      "embeddings.class_embedding": src("embeddings.class_embedding").reshape(1, 1, -1),
      "embeddings.position_embedding": src("embeddings.position_embedding.weight")[None],
      "pre_layernorm.weight": src("pre_layrnorm.weight"),
      "pre_layernorm.bias": src("pre_layrnorm.bias"),
      "post_layernorm.weight": src("post_layernorm.weight"),
      "post_layernorm.bias": src("post_layernorm.bias"),
  }
  for n in range(num_layers):
    layer = f"encoder.layers.{n}."
    for part in ("weight", "bias"):
      out[f"{layer}self_attn.qkv.{part}"] = np.concatenate(
          [src(f"{layer}self_attn.{p}_proj.{part}") for p in "qkv"], axis=0)
      out[f"{layer}self_attn.projection.{part}"] = src(f"{layer}self_attn.out_proj.{part}")
      for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
        out[f"{layer}{name}.{part}"] = src(f"{layer}{name}.{part}")
  return {f"visual_encoder.{k}": v for k, v in out.items()}


def fresh_qformer_params(config: Blip2Config, seed: int = 0) -> dict:
  """BERT's initialization of our Q-Former's params (numpy, no forward pass to compile):
  kernels, embeddings and query tokens N(0, 0.02) (BERT's and LAVIS's initializer_range), biases
  0, LayerNorm scales 1."""
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, qformer_abstract_params(config))


def qformer_weights(config: Blip2Config, clip_state: dict, seed: int = 0) -> dict:
  """The Q-Former's state dict (diffusers' keys, float32): fresh weights
  (`fresh_qformer_params`), the vision tower replaced by the CLIP image encoder's."""
  state = qformer_state_dict(fresh_qformer_params(config, seed))
  vision = vision_tower_from_clip(clip_state, config.vision_config.num_hidden_layers)
  missing = sorted(k for k in state if k.startswith("visual_encoder.") and k not in vision)
  if missing:
    raise ModelFileError(f"the CLIP image encoder leaves BLIP-2 vision tensors unset: "
                         f"{missing[:3]}")
  for k, v in vision.items():
    if state[k].shape != v.shape:
      raise ModelFileError(f"image_encoder: {k} is {v.shape}, the Q-Former's vision tower needs "
                           f"{state[k].shape}")
    state[k] = v
  return state


def image_processor_config(size: int, mean, std) -> dict:
  """image_processor/preprocessor_config.json: BlipImageProcessor (bicubic resize to `size`,
  rescale, normalize)."""
  return {"image_processor_type": "BlipImageProcessor", "do_resize": True,
          "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
          "image_std": list(std), "do_convert_rgb": True}


def model_index(mean, std) -> dict:
  """model_index.json with the labels BlipDiffusionPipeline's release carries."""
  return {
      "_class_name": "BlipDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
      "ctx_begin_pos": CTX_BEGIN_POS, "mean": list(mean), "std": list(std),
      "image_processor": ["blip_diffusion", "BlipImageProcessor"],
      "qformer": ["blip_diffusion", "Blip2QFormerModel"],
      "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
  }


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ModelFileError(f"{path}: not found; the toy BLIP-Diffusion base is built from a toy "
                         "SD 1.x base with an image_encoder/ folder") from None


def _write_qformer_tokenizer(folder: Path) -> None:
  folder.mkdir()
  (folder / "vocab.txt").write_text("\n".join(toy_vocabulary()) + "\n", encoding="utf-8")
  shipped = shipped_qformer_tokenizer_dir()
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    shutil.copyfile(shipped / name, folder / name)


def write_toy_blip_diffusion(dest, *, base=None, seed: int = 0,
                             sizes: QFormerSizes = QFormerSizes(), overwrite: bool = False) -> Path:
  """Writes the toy BLIP-Diffusion base to `dest` (staged in a temporary folder, then renamed).

  Args:
    dest: the new folder.
    base: a toy SD 1.x folder with tokenizer/ and image_encoder/ (default: the embedded default,
      persona_jax/assets/toy_base with its tokenizer).
    seed: the fresh Q-Former's initialization.
    sizes: the fresh Q-Former's shape.
  Returns:
    `dest`.
  """
  from persona_jax.default_model import default_model_dir
  dest = Path(dest)
  if dest.exists() and any(dest.iterdir()) and not overwrite:
    raise ConfigError(f"{dest}: folder exists and is not empty; pass overwrite=True "
                      "(--overwrite) to replace it")
  base = Path(base) if base is not None else default_model_dir()
  for sub in (*COPIED, "text_encoder", "image_encoder"):
    if not (base / sub).is_dir():
      raise ModelFileError(f"{base / sub}: not found; the toy BLIP-Diffusion base needs a toy SD "
                           "1.x folder with unet, vae, scheduler, tokenizer, text_encoder and "
                           "image_encoder")
  vision = _read_json(base / "image_encoder" / CONFIG_FILE)
  text = _read_json(base / "text_encoder" / CONFIG_FILE)
  preprocessor = _read_json(base / "image_encoder" / "preprocessor_config.json")
  mean, std = preprocessor["image_mean"], preprocessor["image_std"]
  raw = qformer_config(vision, text["hidden_size"], sizes)
  config = Blip2Config.from_dict(raw)
  clip_state = read_safetensors(base / "image_encoder" / "model.safetensors")

  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
  try:
    for sub in COPIED:
      shutil.copytree(base / sub, tmp / sub)
    shutil.copytree(base / "text_encoder", tmp / "text_encoder")
    write_json(tmp / "text_encoder" / CONFIG_FILE,
               {**text, "architectures": ["ContextCLIPTextModel"]})
    (tmp / "qformer").mkdir()
    write_json(tmp / "qformer" / CONFIG_FILE, raw)
    write_safetensors(tmp / "qformer" / f"{WEIGHTS_STEM}.safetensors",
                      qformer_weights(config, clip_state, seed))
    _write_qformer_tokenizer(tmp / QFORMER_TOKENIZER)
    (tmp / "image_processor").mkdir()
    write_json(tmp / "image_processor" / "preprocessor_config.json",
               image_processor_config(config.vision_config.image_size, mean, std))
    write_json(tmp / "model_index.json", model_index(mean, std))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if dest.exists():
      shutil.rmtree(dest)
    tmp.rename(dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dest


def toy_blip_diffusion_dir() -> Path:
  """The toy BLIP-Diffusion base of the default toy SD base (seed 0), written on first use into
  the cache (cache/models/toy-blip-diffusion-<the base's name>); the `:tiny` configs' model."""
  from persona_jax.cache import cache_dir
  from persona_jax.default_model import default_model_dir, default_model_name
  folder = cache_dir() / "models" / f"toy-blip-diffusion-{default_model_name()}"
  if not (folder / "model_index.json").is_file():
    write_toy_blip_diffusion(folder, base=default_model_dir(), overwrite=True)
  return folder
