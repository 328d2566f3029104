"""IP-Adapter files in the official layout (tencent-ailab/IP-Adapter; formats.md 4.4), which
diffusers' `load_ip_adapter` reads: `image_proj.*` (the image projection: basic `proj`/`norm`, or
the Plus resampler's `latents`, `proj_in`, `layers.N.*`, `proj_out`, `norm_out`) and
`ip_adapter.{id}.to_k_ip.weight` / `to_v_ip.weight`, id = 1, 3, 5, ... the attn2 processors in
diffusers' `unet.attn_processors` order (down, up, mid blocks). Ours hold the same tensors as the
trainable tree of methods/ip_adapter.py: `ip_adapter/image_proj/...` and
`unet/.../attn2/to_{k,v}_ip/kernel` (the UNet add-on's layers, models/adapters.py).

The same rule numbers SDXL's attn2 layers (ip-adapter_sdxl, ip-adapter-plus_sdxl_vit-h: 70 of
them, ids 1 .. 139; several transformer blocks per attention, in order): the official code saves
`torch.nn.ModuleList(unet.attn_processors.values())`, whose odd entries are the attn2 processors.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.image_projection import BASIC, DIM_HEAD, PLUS, ProjectionConfig

PROJECTION = "ip_adapter/image_proj"        # the projection's place in the trainable tree
RESULT_FILE = "ip_adapter.safetensors"      # a training run's result (WORKDIR/RESULT_FILE)
ATTN2_KERNEL = re.compile(
    r"unet/(?:(down|up)_blocks_(\d+)|mid_block)/attentions_(\d+)/transformer_blocks_(\d+)/attn2/"
    r"to_k(?:_ip)?/kernel")


def find_file(path) -> Path:
  """An IP-Adapter file, or a run folder's WORKDIR/ip_adapter.safetensors."""
  path = Path(path)
  path = path / RESULT_FILE if path.is_dir() else path
  if not path.is_file():
    raise ModelFileError(f"{path}: no IP-Adapter file here")
  return path


def cross_attention_dim(unet_config) -> int:
  """The UNet's one cross-attention width: the image tokens' (SD 1.x 768, SDXL 2048)."""
  dims = set(unet_config.cross_attention_dims)
  if len(dims) != 1:
    raise ConfigError(f"IP-Adapter needs one cross_attention_dim; this UNet has {sorted(dims)}")
  return dims.pop()


def attn2_paths(unet_params) -> list[str]:
  """Every attn2 module path (`unet/.../attn2`, found by its to_k or to_k_ip kernel) in
  diffusers' attn_processors order (down blocks, up blocks, then the mid block; within a block by
  attention and transformer index): the IP-Adapter id of the i-th is 2 i + 1."""
  found = set()
  for p in tree.flatten({"unet": unet_params}):
    m = ATTN2_KERNEL.fullmatch(p)
    if m:
      section = {"down": 0, "up": 1, None: 2}[m.group(1)]
      found.add(((section, int(m.group(2) or 0), int(m.group(3)), int(m.group(4))),
                 p.rsplit("/", 2)[0]))
  return [p for _, p in sorted(found)]



# Projection param path (under image_proj) <-> official key (under image_proj.), per kind.
def _projection_keys(config: ProjectionConfig) -> dict[str, str]:
  dense = lambda ours, theirs, bias=True: {f"{ours}/kernel": f"{theirs}.weight",
                                           **({f"{ours}/bias": f"{theirs}.bias"} if bias else {})}
  norm = lambda ours, theirs: {f"{ours}/scale": f"{theirs}.weight", f"{ours}/bias": f"{theirs}.bias"}
  if config.kind == BASIC:
    return {**dense("proj", "proj"), **norm("norm", "norm")}
  keys = {"latents": "latents", **dense("proj_in", "proj_in"), **dense("proj_out", "proj_out"),
          **norm("norm_out", "norm_out")}
  for n in range(config.depth):
    a, f = f"layers_{n}_attn", f"layers_{n}_ff"
    keys.update({**norm(f"{a}/norm1", f"layers.{n}.0.norm1"),
                 **norm(f"{a}/norm2", f"layers.{n}.0.norm2"),
                 **dense(f"{a}/to_q", f"layers.{n}.0.to_q", False),
                 **dense(f"{a}/to_kv", f"layers.{n}.0.to_kv", False),
                 **dense(f"{a}/to_out", f"layers.{n}.0.to_out", False),
                 **norm(f"{f}/norm", f"layers.{n}.1.0"),
                 **dense(f"{f}/fc1", f"layers.{n}.1.1", False),
                 **dense(f"{f}/fc2", f"layers.{n}.1.3", False)})
  return keys


def to_official(trainable, config: ProjectionConfig) -> dict[str, np.ndarray]:
  """Our trained leaves -> the official flat state dict (torch layout: Linear weights [out, in])."""
  flat = {p: np.asarray(v, np.float32) for p, v in tree.flatten(trainable).items()}
  out = {}
  for ours, theirs in _projection_keys(config).items():
    v = flat[f"{PROJECTION}/{ours}"]
    out[f"image_proj.{theirs}"] = v.T if ours.endswith("/kernel") else v
  unet = tree.unflatten({p[len("unet/"):]: v for p, v in flat.items() if p.startswith("unet/")})
  for i, a in enumerate(attn2_paths(unet)):
    for m in "kv":
      out[f"ip_adapter.{2 * i + 1}.to_{m}_ip.weight"] = flat[f"{a}/to_{m}_ip/kernel"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def projection_config(state: dict, cross_attention_dim: int, source: str) -> ProjectionConfig:
  """The projection an official state dict holds (shapes as diffusers reads them)."""
  if "image_proj.latents" in state:
    latents = state["image_proj.latents"]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_proj.layers.")})
    dim = latents.shape[2]
    return ProjectionConfig(
        PLUS, num_tokens=latents.shape[1], image_dim=state["image_proj.proj_in.weight"].shape[1],
        cross_attention_dim=state["image_proj.proj_out.weight"].shape[0], depth=depth,
        heads=state["image_proj.layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
        ff_mult=state["image_proj.layers.0.1.1.weight"].shape[0] // dim,
        hidden_dim=0 if dim == cross_attention_dim else dim)
  if "image_proj.proj.weight" in state:
    w = state["image_proj.proj.weight"]
    if w.shape[0] % cross_attention_dim:
      raise ModelFileError(f"{source}: image_proj.proj.weight {list(w.shape)} does not fit a UNet "
                           f"with cross_attention_dim {cross_attention_dim}")
    return ProjectionConfig(BASIC, num_tokens=w.shape[0] // cross_attention_dim, image_dim=w.shape[1],
                            cross_attention_dim=cross_attention_dim)
  raise ModelFileError(f"{source}: not an IP-Adapter file this version reads (basic or plus: "
                       "image_proj.proj.weight or image_proj.latents); Full and FaceID are not "
                       "supported")


def read_official(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """An IP-Adapter file as a flat official state dict (`image_proj.*`, `ip_adapter.*`)."""
  from persona_jax.convert.files import check_weights, load_pickle, read_adapter
  path = Path(path)
  if not path.is_file():
    raise ModelFileError(f"{path}: no IP-Adapter file here")
  if path.suffix == ".safetensors":
    return read_adapter(path)
  state = load_pickle(path, allow_pickle)
  import torch
  if not isinstance(state, dict):
    raise ModelFileError(f"{path}: not an IP-Adapter file (the official .bin holds a dict)")
  if "image_proj" in state:                                # the release's nested layout
    state = {f"{group}.{k}": v for group in ("image_proj", "ip_adapter")
             for k, v in state.get(group, {}).items()}
  tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
  for k, v in sorted(tensors.items()):
    if not v.is_floating_point():
      raise ModelFileError(f"{path}: tensor {k} is {v.dtype}, not floating point")
  return dict(check_weights({k: v.float().numpy() for k, v in tensors.items()}, path, finite=True))


def from_official(state: dict, unet_params, cross_attention_dim: int, source: str):
  """(ProjectionConfig, trainable tree {ip_adapter/image_proj, unet/.../to_{k,v}_ip}) of a file."""
  config = projection_config(state, cross_attention_dim, source)
  flat = {}
  for ours, theirs in _projection_keys(config).items():
    key = f"image_proj.{theirs}"
    if key not in state:
      raise ModelFileError(f"{source}: {key} is missing")
    v = np.asarray(state[key], np.float32)
    flat[f"{PROJECTION}/{ours}"] = v.T if ours.endswith("/kernel") else v
  base = tree.flatten({"unet": unet_params})
  paths = attn2_paths(unet_params)
  ids = sorted(int(k.split(".")[1]) for k in state if k.startswith("ip_adapter."))
  if sorted(set(ids)) != [2 * i + 1 for i in range(len(paths))]:
    raise ModelFileError(f"{source}: ip_adapter ids {sorted(set(ids))[:6]}... do not match this "
                         f"UNet's {len(paths)} cross-attention layers (1, 3, ..., {2 * len(paths) - 1})")
  for i, a in enumerate(paths):
    for m in "kv":
      v = np.asarray(state[f"ip_adapter.{2 * i + 1}.to_{m}_ip.weight"], np.float32).T
      want = base[f"{a}/to_{m}/kernel"].shape
      if v.shape != tuple(want):
        raise ModelFileError(f"{source}: ip_adapter.{2 * i + 1}.to_{m}_ip.weight is "
                             f"{list(v.T.shape)}, this UNet's {a} needs {list(want[::-1])}")
      flat[f"{a}/to_{m}_ip/kernel"] = v
  return config, tree.unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def write_official(path, trainable, config: ProjectionConfig, metadata: dict) -> Path:
  """Writes our trained leaves as an official file (safetensors) with `metadata` and the kind."""
  from persona_jax.convert.files import write_safetensors
  path = Path(path)
  write_safetensors(path, to_official(trainable, config), {"kind": config.kind, **metadata})
  return path
