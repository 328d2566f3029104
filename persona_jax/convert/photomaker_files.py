"""PhotoMaker files in the official layout (TencentARC/PhotoMaker): `photomaker-v1.bin` /
`photomaker-v2.bin` pickle {"id_encoder": state dict, "lora_weights": state dict}, or a
safetensors file with the same keys flattened (`id_encoder.*`, `lora_weights.*`), as the official
`load_photomaker_adapter` reads both.

The `id_encoder.*` keys are the official module's state dict (`id_encoder.load_state_dict(...,
strict=True)`): `vision_model.*` (transformers' CLIP tower), `visual_projection.weight`,
`visual_projection_2.weight`, `fuse_module.{mlp1,mlp2}.{layernorm,fc1,fc2}.*`,
`fuse_module.layer_norm.*`, and in v2 `qformer_perceiver.token_proj.{0,2}.*`,
`qformer_perceiver.token_norm.*`, `qformer_perceiver.perceiver_resampler.{proj_in,proj_out,
norm_out}.*` and `...perceiver_resampler.layers.N.0.{norm1,norm2,to_q,to_kv,to_out}.*` /
`layers.N.1.{0,1,3}.*` (LayerNorm, Linear, GELU, Linear). Sizes are inferred from the weights;
the two head widths that weights cannot tell (CLIP's 64, the perceiver's 128) are arguments.
`lora_weights.*` are the UNet LoRA's (the official files: diffusers' older attention-processor
names, `unet.<...>.attn1.processor.to_q_lora.down.weight`): `lora_state` gives them to the LoRA
reader (convert/lora_formats.py). A safetensors file may record the two head widths in its
metadata (`vision_head_dim`, `perceiver_head_dim`: `recorded_head_dims`); official files do not.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from persona_jax.convert import diffusers as convert
from persona_jax.errors import ModelFileError
from persona_jax.models import photomaker as pm
from persona_jax.models.photomaker import PhotoMakerConfig

ID_ENCODER = "id_encoder."
LORA_WEIGHTS = "lora_weights."
PERCEIVER = "qformer_perceiver."
CLIP_HEAD_DIM = 64                 # ViT-L/14: 1024 wide, 16 heads
PERCEIVER_HEAD_DIM = 128           # QFormerPerceiver: dim_head=128, heads=cross_attention_dim//128

# Our torch-style names (convert.diffusers.torch_name of our param paths) <-> the official keys.
_OURS_TO_OFFICIAL = (
    (re.compile(r"\.token_proj_(\d+)\."), r".token_proj.\1."),
    (re.compile(r"\.layers_(\d+)_attn\."), r".layers.\1.0."),
    (re.compile(r"\.layers_(\d+)_ff\.norm\."), r".layers.\1.1.0."),
    (re.compile(r"\.layers_(\d+)_ff\.fc1\."), r".layers.\1.1.1."),
    (re.compile(r"\.layers_(\d+)_ff\.fc2\."), r".layers.\1.1.3."),
)


def official_key(key: str) -> str:
  """Our key (`convert.diffusers.torch_name`) -> the official id_encoder key (no prefix)."""
  if key.startswith(PERCEIVER):
    for pattern, repl in _OURS_TO_OFFICIAL:
      key = pattern.sub(repl, key)
  return key


def read_official(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A PhotoMaker file as one flat dict (`id_encoder.*`, `lora_weights.*`), float32 numpy."""
  from persona_jax.convert.files import check_weights, load_pickle, read_adapter
  path = Path(path)
  if not path.is_file():
    raise ModelFileError(f"{path}: no PhotoMaker file here")
  if path.suffix == ".safetensors":
    state = read_adapter(path)
  else:
    raw = load_pickle(path, allow_pickle)
    import torch
    if not isinstance(raw, dict) or not isinstance(raw.get("id_encoder"), dict):
      raise ModelFileError(f"{path}: not a PhotoMaker file (the official .bin holds a dict with "
                           "'id_encoder' and 'lora_weights')")
    tensors = {f"{group}.{k}": v for group in ("id_encoder", "lora_weights")
               for k, v in (raw.get(group) or {}).items()}
    tensors.update({k: v for k, v in raw.items() if k not in ("id_encoder", "lora_weights")})
    bad = [k for k, v in tensors.items() if not (isinstance(v, torch.Tensor) and v.is_floating_point())]
    if bad:
      raise ModelFileError(f"{path}: entry {bad[0]} is not a floating-point tensor")
    state = dict(check_weights({k: v.float().numpy() for k, v in tensors.items()}, path, finite=True))
  if not any(k.startswith(ID_ENCODER) for k in state):
    raise ModelFileError(f"{path}: not a PhotoMaker file: no id_encoder.* tensors")
  return state


def write_official_bin(path, state: dict) -> Path:
  """The official pickled layout of a flat `id_encoder.*` / `lora_weights.*` dict:
  `torch.save({"id_encoder": {...}, "lora_weights": {...}})`, as photomaker-v1.bin / -v2.bin hold
  it (needs torch; written under a temporary name, then renamed)."""
  import torch
  path = Path(path)
  blob = {"id_encoder": {}, "lora_weights": {}}
  for key, value in state.items():
    group, _, name = key.partition(".")
    if group not in blob:
      raise ValueError(f"{key}: not an id_encoder.* or lora_weights.* key")
    blob[group][name] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
  tmp = path.with_name(f".{path.name}.tmp")
  torch.save(blob, tmp)
  tmp.replace(path)
  return path


def id_encoder_state(state: dict, source: str) -> dict[str, np.ndarray]:
  """The id_encoder's own state dict (prefix removed) from a whole file's dict; `lora_weights.*`
  are left out; any other top-level key is an error. A dict without `id_encoder.` keys is taken
  as the id_encoder's state dict itself."""
  if not any(k.startswith(ID_ENCODER) for k in state):
    return dict(state)
  other = sorted(k for k in state if not k.startswith((ID_ENCODER, LORA_WEIGHTS)))
  if other:
    raise ModelFileError(f"{source}: {len(other)} unexpected key(s) beside id_encoder.* and "
                         f"lora_weights.*: {', '.join(other[:4])}")
  return {k[len(ID_ENCODER):]: v for k, v in state.items() if k.startswith(ID_ENCODER)}


def _shape(state, key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise ModelFileError(f"{source}: id_encoder.{key} is missing; not a PhotoMaker ID encoder")
  return tuple(np.shape(state[key]))


def _divide(total: int, part: int, what: str, source: str) -> int:
  if part <= 0 or total % part:
    raise ModelFileError(f"{source}: {what} {total} is not a multiple of {part}")
  return total // part


def _count_layers(state, prefix: str) -> int:
  return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_config(state: dict, source: str, *, vision_head_dim: int = CLIP_HEAD_DIM,
                 perceiver_head_dim: int = PERCEIVER_HEAD_DIM, dtype=jnp.float32) -> PhotoMakerConfig:
  """The PhotoMakerConfig an id_encoder state dict (no prefix) holds: v2 when it has
  `qformer_perceiver.*`; widths and layer counts from the weights' shapes."""
  s = lambda key: _shape(state, key, source)
  hidden = s("vision_model.embeddings.class_embedding")[0]
  _, channels, patch, _ = s("vision_model.embeddings.patch_embedding.weight")
  side = math.isqrt(s("vision_model.embeddings.position_embedding.weight")[0] - 1)
  if side * side + 1 != s("vision_model.embeddings.position_embedding.weight")[0]:
    raise ModelFileError(f"{source}: vision_model position embeddings do not form a square grid")
  vision = dataclasses.replace(
      pm.OFFICIAL_VISION, hidden_size=hidden,
      intermediate_size=s("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
      projection_dim=s("visual_projection.weight")[0],
      num_hidden_layers=_count_layers(state, "vision_model.encoder.layers."),
      num_attention_heads=_divide(hidden, vision_head_dim, "vision hidden size", source),
      num_channels=channels, image_size=side * patch, patch_size=patch, dtype=dtype,
      param_dtype=dtype)
  fuse_dim = s("fuse_module.layer_norm.weight")[0]
  config = PhotoMakerConfig(
      version=pm.V2 if any(k.startswith(PERCEIVER) for k in state) else pm.V1, vision=vision,
      projection_2_dim=s("visual_projection_2.weight")[0], fuse_dim=fuse_dim,
      mlp1_hidden_dim=s("fuse_module.mlp1.fc1.weight")[0],
      mlp2_hidden_dim=s("fuse_module.mlp2.fc1.weight")[0])
  if config.version == pm.V1:
    if vision.projection_dim + config.projection_2_dim != fuse_dim:
      raise ModelFileError(f"{source}: visual_projection ({vision.projection_dim}) + "
                           f"visual_projection_2 ({config.projection_2_dim}) must give the fuse "
                           f"width {fuse_dim}")
    return config
  r = PERCEIVER + "perceiver_resampler."
  token_hidden, id_dim = s(PERCEIVER + "token_proj.0.weight")
  return dataclasses.replace(
      config, id_embeddings_dim=id_dim, token_proj_hidden_dim=token_hidden,
      num_tokens=_divide(s(PERCEIVER + "token_proj.2.weight")[0], fuse_dim,
                         "qformer_perceiver.token_proj.2 width", source),
      perceiver_depth=_count_layers(state, r + "layers."),
      perceiver_heads=_divide(s(r + "layers.0.0.to_q.weight")[0], perceiver_head_dim,
                              "perceiver attention width", source),
      perceiver_head_dim=perceiver_head_dim,
      perceiver_ff_mult=_divide(s(r + "layers.0.1.1.weight")[0], fuse_dim,
                                "perceiver feed-forward width", source))


def _listing(keys: list[str]) -> str:
  shown = ", ".join(ID_ENCODER + k for k in keys[:4])
  return f"{len(keys)} ({shown}{', ...' if len(keys) > 4 else ''})"


def id_encoder_params(state: dict, source: str, *, vision_head_dim: int = CLIP_HEAD_DIM,
                      perceiver_head_dim: int = PERCEIVER_HEAD_DIM, dtype=jnp.float32):
  """(PhotoMakerConfig, params for `PhotoMakerIDEncoder`) of an official state dict.

  Args:
    state: a whole file's dict (`id_encoder.*`, `lora_weights.*`; `read_official`) or the
      id_encoder's own state dict.
    source: the file, for error messages.
    vision_head_dim, perceiver_head_dim: head widths (the official 64 and 128).
    dtype: dtype of the params and of the tower's computation.
  Raises:
    ModelFileError, one line naming `source` and the missing / unexpected / misshapen keys
    (the official loader is strict).
  """
  state = {k: v for k, v in id_encoder_state(state, source).items()
           if not convert.text_encoder_ignore(k)}
  config = infer_config(state, source, vision_head_dim=vision_head_dim,
                        perceiver_head_dim=perceiver_head_dim, dtype=dtype)
  abstract = pm.abstract_params(config)
  table = convert.key_table(abstract)
  ours = {official_key(k): k for k in table}
  missing = sorted(set(ours) - set(state))
  unexpected = sorted(set(state) - set(ours))
  if missing or unexpected:
    parts = ([f"missing {_listing(missing)}"] if missing else []) + (
        [f"unexpected {_listing(unexpected)}"] if unexpected else [])
    raise ModelFileError(f"{source}: not the official PhotoMaker {config.version} id_encoder "
                         f"layout: {'; '.join(parts)}")
  for key, k in ours.items():
    want = table[k].torch_shape()
    if tuple(np.shape(state[key])) != want:
      raise ModelFileError(f"{source}: {ID_ENCODER}{key} has shape {tuple(np.shape(state[key]))}; "
                           f"the file's other weights need {want}")
  params = convert.state_dict_to_params({k: state[key] for key, k in ours.items()}, abstract,
                                        source=source, dtype=dtype)
  return config, params


def to_official(params) -> dict[str, np.ndarray]:
  """Our params -> the official `id_encoder.*` keys and layouts (numpy), for writing a file."""
  return {ID_ENCODER + official_key(k): v for k, v in convert.params_to_state_dict(params).items()}


def load_id_encoder(path, *, allow_pickle: bool = False, vision_head_dim: int = CLIP_HEAD_DIM,
                    perceiver_head_dim: int = PERCEIVER_HEAD_DIM, dtype=jnp.float32):
  """(PhotoMakerConfig, params) of an official PhotoMaker file (`.bin` only with
  `allow_pickle`); its `lora_weights.*` are not read here."""
  state = read_official(path, allow_pickle)
  return id_encoder_params(state, str(path), vision_head_dim=vision_head_dim,
                           perceiver_head_dim=perceiver_head_dim, dtype=dtype)


HEAD_DIM_KEYS = ("vision_head_dim", "perceiver_head_dim")


def recorded_head_dims(path) -> dict[str, int]:
  """{vision_head_dim, perceiver_head_dim} a safetensors PhotoMaker file records in its metadata
  (ours and small test files; official files record none: {})."""
  path = Path(path)
  if path.suffix != ".safetensors":
    return {}
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    meta = f.metadata() or {}
  out = {}
  for key in HEAD_DIM_KEYS:
    if key in meta:
      if not meta[key].isdigit() or int(meta[key]) <= 0:
        raise ModelFileError(f"{path}: metadata {key} = {meta[key]!r} is not a positive integer")
      out[key] = int(meta[key])
  return out


def lora_state(state: dict) -> dict[str, np.ndarray]:
  """The `lora_weights.*` tensors of a whole file's dict, prefix removed (diffusers' names)."""
  return {k[len(LORA_WEIGHTS):]: v for k, v in state.items() if k.startswith(LORA_WEIGHTS)}


_PEFT_KEY = re.compile(r"(unet\..+)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")


def lora_to_official(peft: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A UNet attention LoRA as diffusers/PEFT tensors (`lora_formats.peft_state_dict`: the scale
  folded into B) -> the official files' `lora_weights.*` keys, diffusers' older
  attention-processor names (`unet.<...>.attn1.processor.to_q_lora.down.weight`, scale 1)."""
  out = {}
  for key, value in peft.items():
    m = _PEFT_KEY.fullmatch(key)
    if m is None:
      raise ModelFileError(f"{key}: PhotoMaker's lora_weights hold UNet attention (to_q, to_k, "
                           "to_v, to_out.0) LoRA only; train with method.targets=('attn',)")
    proj = "to_out" if m[2] == "to_out.0" else m[2]
    out[f"{LORA_WEIGHTS}{m[1]}.processor.{proj}_lora.{'down' if m[3] == 'A' else 'up'}.weight"] = value
  return out
