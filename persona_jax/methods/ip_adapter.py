"""IP-Adapter, an image prompt for a frozen text-to-image model (Ye et al. 2023; methods.md 7;
tencent-ailab/IP-Adapter; formats.md 4.4).

  persona-jax train --config ip_adapter:tiny --workdir runs/ip
  persona-jax sample --ip-adapter runs/ip/ip_adapter.safetensors --image A.png [--image B.png] \\
      --prompt "a photo on the beach" [--ip-scale 0.5] [--image-encoder DIR] --out out/
  persona-jax verify MODEL --ip-adapter FILE [--image-encoder DIR]

A frozen CLIP image encoder (`image_encoder`, default MODEL/image_encoder) gives the image
features; an image projection turns them into N tokens of the UNet's cross-attention width:
  basic  tokens = LayerNorm(Linear(image_embeds).reshape(N, D)), N = 4 (the projected embedding);
  plus   a Perceiver resampler over the penultimate layer's patch features, N = 16 queries.
Every attn2 gets a decoupled cross-attention on those tokens (UNet option `ip_adapter`):
  Z = Attn(Q, K, V) + scale * Attn(Q, K_ip, V_ip), before the shared to_out,
with `to_k_ip`/`to_v_ip` initialized from the layer's to_k/to_v. Only the projection and the
to_k_ip/to_v_ip kernels train; the scale is 1 in training and a traced sampler input after.

Condition dropping (the paper's, for classifier-free guidance), one uniform draw per example in
the data pipeline: `drop_image` (image features set to zeros; plus: a zero image into the
encoder), then `drop_text` (the empty caption), then `drop_both`, 0.05 each by default. At
sampling the negative half uses the tokens of those zeros at the same scale (diffusers' way).

Several images condition one generation as in diffusers: each image's N tokens, concatenated
(K * N tokens). Two identical images therefore give the one image's output (each duplicated key
carries half the weight).

Files: the official layout (safetensors; a pickled .bin only with allow_pickle): `image_proj.*`
and `ip_adapter.{id}.to_k_ip.weight` / `to_v_ip.weight`, id = 1, 3, 5, ... the attn2 processors
in diffusers' `unet.attn_processors` order (down, up, mid blocks). Training writes its result in
that layout (WORKDIR/ip_adapter.safetensors), which `pipe.load_ip_adapter` reads;
`method.pretrained` starts training from such a file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.diffusion.sampling import PreparedConditioning
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.image_encoder import image_encoder_dir
from persona_jax.methods.base import CLIP_PIXELS, IDS, Method
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.extra_conditioning import ExtraConditioning
from persona_jax.models.image_projection import (BASIC, DIM_HEAD, PLUS, ProjectionConfig,
                                                 init_projection, projection_model)

IP_ADAPTER = "ip_adapter"
RESULT_FILE = "ip_adapter.safetensors"
FORMAT = "persona_jax-ip_adapter"
DROP = "ip_drop"          # batch key: 0 keep, 1 drop the image, 2 drop the text, 3 drop both
KINDS = (BASIC, PLUS)
ATTN2_KERNEL = re.compile(
    r"unet/(?:(down|up)_blocks_(\d+)|mid_block)/attentions_(\d+)/transformer_blocks_(\d+)/attn2/"
    r"to_k(?:_ip)?/kernel")


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
  kind: str = BASIC                  # basic | plus (the resampler; see the module docstring)
  num_tokens: int = 0                # 0: 4 (basic) or 16 (plus)
  heads: int = 0                     # plus: the resampler's heads (of width 64); 0: D // 64, at least 1
  depth: int = 4                     # plus: resampler layers
  image_encoder: str = ""            # a CLIPVisionModel(WithProjection) folder; "": MODEL/image_encoder
  drop_image: float = 0.05           # the paper's condition drops (one draw per example)
  drop_text: float = 0.05
  drop_both: float = 0.05
  pretrained: str = ""               # an IP-Adapter file (official layout) to start from
  allow_pickle: bool = False         # read `pretrained` as a pickled .bin (trusted files only)


# ---------------------------------------------------------------------------------------------
# The conditioning: image tokens beside the text context.


def image_features(clip: CLIPVisionConfig, kind: str, params, pixels):
  """[B, S, S, 3] CLIP pixels -> basic: image_embeds [B, E]; plus: hidden_states[-2] [B, T, H]."""
  out = CLIPVisionModel(clip).apply({"params": params}, pixels)
  feats = out.hidden_states[-2] if kind == PLUS else out.image_embeds
  return jax.lax.stop_gradient(feats.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class IPAdapterConditioning:
  """IP-Adapter's `LatentConditioning` (methods/base.py): the text context plus the image tokens
  (`ExtraConditioning.ip_tokens`), computed once per batch (they do not depend on the latent)."""
  clip: CLIPVisionConfig
  projection: ProjectionConfig
  empty_ids: tuple[int, ...]         # the dropped caption
  scale: float = 1.0                 # sampling's default ip_scale (training uses 1)
  input_keys: tuple[str, ...] = (CLIP_PIXELS,)

  def tokens(self, params, pixels, drop_image=None):
    """clip_pixels [B, S, S, 3] or [B, K, S, S, 3] (K images each) -> tokens [B, K * N, D];
    `drop_image` [B] bool: those rows get the tokens of zeros (plus: of a zero image)."""
    b = pixels.shape[0]
    flat = pixels.reshape((-1,) + pixels.shape[-3:])                      # [B K, S, S, 3]
    k = flat.shape[0] // b
    row_drop = None if drop_image is None else jnp.repeat(drop_image, k)
    if self.projection.kind == PLUS and row_drop is not None:
      flat = jnp.where(row_drop[:, None, None, None], 0.0, flat)
    feats = image_features(self.clip, self.projection.kind, params["image_encoder"], flat)
    if self.projection.kind == BASIC and row_drop is not None:
      feats = jnp.where(row_drop[:, None], 0.0, feats)
    return self.project(params, feats).reshape(b, -1, self.projection.cross_attention_dim)

  def project(self, params, feats):
    return projection_model(self.projection).apply(
        {"params": params[IP_ADAPTER]["image_proj"]}, feats)

  def negative_tokens(self, params, pixels):
    """The tokens of the zeros the condition drop trains with, for each row of `pixels`."""
    drop = jnp.ones(pixels.shape[:1], bool)
    return self.tokens(params, pixels, drop)

  def prepare(self, models, params, batch):
    """{"context" [B, L, D] (dropped captions empty), "tokens" [B, K N, D]}."""
    ids = batch[IDS]
    drop = batch.get(DROP)
    drop_image = None if drop is None else (drop == 1) | (drop == 3)
    if drop is not None:
      empty = jnp.asarray(self.empty_ids, ids.dtype)[None]
      ids = jnp.where(((drop == 2) | (drop == 3))[:, None], empty, ids)
    context = models.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    return {"context": context, "tokens": self.tokens(params, batch[CLIP_PIXELS], drop_image)}

  def context(self, models, params, state, noisy, t):
    return {"encoder_hidden_states": state["context"],
            "extra": ExtraConditioning(ip_tokens=state["tokens"])}, {}

  def sampling(self, models, params, state, uncond, inputs):
    """cond: the prompt and image tokens; uncond: the negative prompt and the zeros' tokens, both
    at `inputs["ip_scale"]` (scalar or [B]; default `scale`), a traced input."""
    b = state["context"].shape[0]
    s = jnp.broadcast_to(jnp.asarray(inputs.get("ip_scale", self.scale), jnp.float32), (b,))
    negative = self.negative_tokens(params, inputs[CLIP_PIXELS])
    return PreparedConditioning(
        {"encoder_hidden_states": state["context"],
         "extra": ExtraConditioning(ip_tokens=state["tokens"], ip_scale=s)},
        {"encoder_hidden_states": uncond, "extra": ExtraConditioning(ip_tokens=negative, ip_scale=s)})


@dataclasses.dataclass(eq=False)
class ConditionInputs:
  """Data pipeline hook (`Method.image_inputs`; `takes_mask`: the pipeline also passes the
  example's generator): uint8 [H, W, 3] -> {clip_pixels [S, S, 3], ip_drop int32} (the official
  dataset's single uniform draw; without a generator nothing is dropped)."""
  processor: object
  drop_image: float
  drop_text: float
  drop_both: float
  takes_mask = True

  def __call__(self, image, mask=None, rng=None):
    from persona_jax.data.clip_images import preprocess_image
    u = 1.0 if rng is None else rng.random()
    edges = np.cumsum([self.drop_image, self.drop_text, self.drop_both])
    drop = 0 if u >= edges[-1] else 1 + int(np.searchsorted(edges, u, side="right"))
    return {CLIP_PIXELS: preprocess_image(image, self.processor), DROP: np.int32(drop)}


# ---------------------------------------------------------------------------------------------
# The added UNet leaves and the official file layout.


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


def init_ip_layers(unet_params) -> dict:
  """Flat {unet/.../attn2/to_{k,v}_ip/kernel: copy of to_{k,v}/kernel} (float32)."""
  flat = tree.flatten({"unet": unet_params})
  return {f"{a}/to_{m}_ip/kernel": jnp.asarray(flat[f"{a}/to_{m}/kernel"], jnp.float32)
          for a in attn2_paths(unet_params) for m in "kv"}


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
    v = flat[f"{IP_ADAPTER}/image_proj/{ours}"]
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
  from persona_jax.convert.files import _read_pickle, read_safetensors
  path = Path(path)
  if path.is_dir():
    path = path / RESULT_FILE
  if not path.is_file():
    raise ModelFileError(f"{path}: no IP-Adapter file here")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if not allow_pickle:
    _read_pickle(path, False)                              # raises PickleRefusedError
  import torch
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  if "image_proj" not in state:                            # already flat
    return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
  return {f"{group}.{k}": v.float().numpy() for group in ("image_proj", IP_ADAPTER)
          for k, v in state.get(group, {}).items()}


def from_official(state: dict, unet_params, cross_attention_dim: int, source: str):
  """(ProjectionConfig, trainable tree {ip_adapter/image_proj, unet/.../to_{k,v}_ip}) of a file."""
  config = projection_config(state, cross_attention_dim, source)
  flat = {}
  for ours, theirs in _projection_keys(config).items():
    key = f"image_proj.{theirs}"
    if key not in state:
      raise ModelFileError(f"{source}: {key} is missing")
    v = np.asarray(state[key], np.float32)
    flat[f"{IP_ADAPTER}/image_proj/{ours}"] = v.T if ours.endswith("/kernel") else v
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


def write_official(path, trainable, config: ProjectionConfig, metadata=None) -> Path:
  from persona_jax.convert.files import write_safetensors
  path = Path(path)
  write_safetensors(path, to_official(trainable, config),
                    {"format": FORMAT, "kind": config.kind, **(metadata or {})})
  return path


# ---------------------------------------------------------------------------------------------
# Building the method.


def projection_for(config: IPAdapterConfig, clip: CLIPVisionConfig,
                   cross_attention_dim: int) -> ProjectionConfig:
  if config.kind not in KINDS:
    raise ConfigError(f"method.kind: '{config.kind}' is not one of {', '.join(KINDS)}")
  if config.kind == BASIC:
    if not clip.with_projection:
      raise ConfigError("method.image_encoder: the basic IP-Adapter reads the projected image "
                        "embedding; this encoder has no visual_projection (use kind=plus)")
    return ProjectionConfig(BASIC, num_tokens=config.num_tokens or 4, image_dim=clip.projection_dim,
                            cross_attention_dim=cross_attention_dim)
  return ProjectionConfig(PLUS, num_tokens=config.num_tokens or 16, image_dim=clip.hidden_size,
                          cross_attention_dim=cross_attention_dim, depth=config.depth,
                          heads=config.heads or max(1, cross_attention_dim // DIM_HEAD))


def cross_attention_dim(unet_config) -> int:
  dims = set(unet_config.cross_attention_dims)
  if len(dims) != 1:
    raise ConfigError(f"IP-Adapter needs one cross_attention_dim; this UNet has {sorted(dims)}")
  return dims.pop()


def build_conditioning(config: IPAdapterConfig, base_params, tokenizer_dir, unet_config,
                       clip_config, scale=1.0):
  from persona_jax.tokenizer import load_tokenizer, tokenize
  projection = projection_for(config, clip_config, cross_attention_dim(unet_config))
  empty = tokenize(load_tokenizer(tokenizer_dir), [""])[0]
  return IPAdapterConditioning(clip_config, projection, tuple(int(i) for i in empty), float(scale))


def make(config: IPAdapterConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """The IP-Adapter training method for a base model."""
  from persona_jax.data.clip_images import load_image_processor
  from persona_jax.image_encoder import load_image_encoder
  if unet_config is None:
    raise ConfigError("IP-Adapter needs the UNet's config")
  drops = (config.drop_image, config.drop_text, config.drop_both)
  if min(drops) < 0 or sum(drops) > 1:
    raise ConfigError(f"method.drop_image/drop_text/drop_both: each >= 0, together <= 1; got {drops}")
  folder = image_encoder_dir(config.image_encoder, tokenizer_dir)
  clip_config, clip_params = load_image_encoder(folder)
  cond = build_conditioning(config, base_params, tokenizer_dir, unet_config, clip_config)
  pretrained = None
  if config.pretrained:
    loaded, pretrained = from_official(read_official(config.pretrained, config.allow_pickle),
                                       base_params["unet"], cond.projection.cross_attention_dim,
                                       config.pretrained)
    if (loaded.kind, loaded.image_dim) != (cond.projection.kind, cond.projection.image_dim):
      raise ConfigError(f"method.pretrained: {config.pretrained} holds a {loaded.kind} projection "
                        f"of {loaded.image_dim} image features; this config and image encoder "
                        f"need {cond.projection.kind} of {cond.projection.image_dim}")
    cond = dataclasses.replace(cond, projection=loaded)       # the file's token count, depth...

  def init_trainable(rng, base):
    if pretrained is not None:
      return pretrained
    proj = init_projection(rng, cond.projection)
    return tree.unflatten({**tree.flatten({IP_ADAPTER: {"image_proj": proj}}),
                           **init_ip_layers(base["unet"])})

  processor = load_image_processor(folder, clip_config.image_size)
  return Method(name=IP_ADAPTER, init_trainable=init_trainable, save_result=save_result,
                unet_options=(("ip_adapter", True),), latent_conditioning=cond,
                components=lambda: {"image_encoder": clip_params},
                image_inputs=ConditionInputs(processor, *drops))


def save_result(run, trainable, workdir):
  """WORKDIR/ip_adapter.safetensors in the official layout (diffusers' load_ip_adapter reads it)."""
  options = IPAdapterConfig(**run.config.method_options)
  folder = image_encoder_dir(options.image_encoder, run.pipe.tokenizer_dir)
  projection = run.method.latent_conditioning.projection
  path = write_official(Path(workdir) / RESULT_FILE, trainable, projection, {
      "base_model": str(run.model_dir), "image_encoder": str(folder.absolute()),
      "resolution": str(run.config.data.resolution),
      "method": json.dumps(dict(run.config.method_options), default=str)})
  return [str(path)]


# ---------------------------------------------------------------------------------------------
# Sampling with a file.


@dataclasses.dataclass
class ForSampling:
  """What `text_to_image` needs to sample with an IP-Adapter file and images."""
  params: dict               # base + image encoder + the adapter's leaves
  conditioning: object       # MethodConditioning over the IP-Adapter conditioning
  inputs: dict               # {"clip_pixels": [1, K, S, S, 3], "ip_scale": [1]}
  method: Method
  unet_options: tuple = (("ip_adapter", True),)


def file_metadata(path) -> dict:
  """The safetensors metadata of an IP-Adapter file ({} for official files and pickles)."""
  path = Path(path)
  path = path / RESULT_FILE if path.is_dir() else path
  if path.suffix != ".safetensors" or not path.is_file():
    return {}
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    return dict(f.metadata() or {})


def file_image_encoder(path, image_encoder, tokenizer_dir) -> Path:
  """--image-encoder, else the file's recorded encoder (our results), else MODEL/image_encoder."""
  if image_encoder:
    return Path(image_encoder)
  recorded = file_metadata(path).get("image_encoder")
  if recorded and Path(recorded).is_dir():
    return Path(recorded)
  return image_encoder_dir("", tokenizer_dir)


def load_for_sampling(path, pipe, image_paths, *, image_encoder=None, scale: float = 1.0,
                      allow_pickle: bool = False, resolution: int | None = None) -> ForSampling:
  """Params, conditioning hook and inputs that sample `pipe` with an IP-Adapter file conditioned
  on `image_paths` (one or more; their tokens are concatenated)."""
  from persona_jax.data import images as img_ops
  from persona_jax.data.clip_images import load_image_processor, preprocess_image
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.methods.base import MethodConditioning
  folder = file_image_encoder(path, image_encoder, pipe.tokenizer_dir)
  clip_config, clip_params = load_image_encoder(folder)
  state = read_official(path, allow_pickle)
  projection, trainable = from_official(state, pipe.params["unet"],
                                        cross_attention_dim(pipe.unet_config), str(path))
  feature_dim = clip_config.hidden_size if projection.kind == PLUS else clip_config.projection_dim
  if projection.image_dim != feature_dim:
    raise ModelFileError(f"{path}: the projection reads {projection.image_dim} image features; "
                         f"the image encoder {folder} gives {feature_dim}")
  cond = IPAdapterConditioning(
      clip_config, projection,
      build_conditioning(IPAdapterConfig(kind=projection.kind), pipe.params, pipe.tokenizer_dir,
                         pipe.unet_config, clip_config).empty_ids, float(scale))
  params = tree.merge({**pipe.params, "image_encoder": clip_params}, trainable)
  processor = load_image_processor(folder, clip_config.image_size)
  from PIL import Image
  pixels = []
  for p in image_paths:
    image = (img_ops.load_square(Path(p), resolution) if resolution else
             np.asarray(Image.open(p).convert("RGB")))
    pixels.append(preprocess_image(image, processor))
  method = Method(name=IP_ADAPTER, unet_options=(("ip_adapter", True),), latent_conditioning=cond)
  inputs = {CLIP_PIXELS: np.stack(pixels)[None], "ip_scale": np.asarray([scale], np.float32)}
  return ForSampling(params, MethodConditioning(method), inputs, method)
