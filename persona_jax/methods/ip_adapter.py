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
Every attn2 gets a decoupled cross-attention on those tokens (the UNet add-on
`DecoupledCrossAttention`, models/adapters.py):
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
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.convert.ip_adapter_files import (attn2_paths, from_official, read_official,
                                                  write_official)
from persona_jax.data.batch import CLIP_PIXELS, IDS, NEGATIVE_IDS
from persona_jax.diffusion.conditioning import negative_context
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.image_encoder import image_encoder_dir, load_method_image_encoder
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.spec import (EvalRecipe, Knob, MethodSpec, ResultSpec, SamplingSpec,
                                      VerifySpec)
from persona_jax.models.addons import IP_SCALE, IP_TOKENS, DecoupledCrossAttention
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.image_projection import (BASIC, DIM_HEAD, PLUS, ProjectionConfig,
                                                 init_projection, projection_model)

IP_ADAPTER = "ip_adapter"
RESULT_FILE = "ip_adapter.safetensors"
FORMAT = "persona_jax-ip_adapter"
DROP = "ip_drop"          # batch key: 0 keep, 1 drop the image, 2 drop the text, 3 drop both
KINDS = (BASIC, PLUS)


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
  """IP-Adapter's conditioning (diffusion/conditioning.py): the text context plus the image tokens
  (the `ip_tokens` stream), computed once per batch (they do not depend on the latent)."""
  clip: CLIPVisionConfig
  projection: ProjectionConfig
  empty_ids: tuple[int, ...]         # the dropped caption
  scale: float = 1.0                 # sampling's default ip_scale (training uses 1)
  input_keys: tuple[str, ...] = (CLIP_PIXELS,)
  cacheable = False

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

  def prepare(self, models, params, inputs):
    """{"context" [B, L, D] (dropped captions empty), "tokens" [B, K N, D]; when sampling also
    "scale" [B] (`inputs["ip_scale"]`, default `scale`; traced), "negative" context and
    "negative_tokens" (the tokens of the zeros the condition drop trains with)}."""
    ids = inputs[IDS]
    drop = inputs.get(DROP)
    drop_image = None if drop is None else (drop == 1) | (drop == 3)
    if drop is not None:
      empty = jnp.asarray(self.empty_ids, ids.dtype)[None]
      ids = jnp.where(((drop == 2) | (drop == 3))[:, None], empty, ids)
    negative = negative_context(models, params, inputs)
    context = models.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    state = {"context": context, "tokens": self.tokens(params, inputs[CLIP_PIXELS], drop_image)}
    if NEGATIVE_IDS in inputs:
      b = context.shape[0]
      state.update(negative=negative, negative_tokens=self.negative_tokens(params, inputs[CLIP_PIXELS]),
                   scale=jnp.broadcast_to(jnp.asarray(inputs.get(IP_SCALE, self.scale),
                                                      jnp.float32), (b,)))
    return state

  def at(self, models, params, state, noisy, t, step):
    streams = {IP_TOKENS: state["tokens"]}
    if "scale" in state:
      streams[IP_SCALE] = state["scale"]
    return {"encoder_hidden_states": state["context"], "streams": streams}, {}

  def negative(self, models, params, state):
    """The negative prompt and the zeros' tokens at the same scale."""
    return {"encoder_hidden_states": state["negative"],
            "streams": {IP_TOKENS: state["negative_tokens"], IP_SCALE: state["scale"]}}


@dataclasses.dataclass(eq=False)
class ConditionInputs:
  """Data pipeline hook (`Method.image_inputs`): uint8 [H, W, 3] (its mask, unused; the example's
  generator) -> {clip_pixels [S, S, 3], ip_drop int32} (the official dataset's single uniform
  draw; without a generator nothing is dropped)."""
  processor: object
  drop_image: float
  drop_text: float
  drop_both: float

  def __call__(self, image, mask=None, rng=None):
    from persona_jax.data.clip_images import preprocess_image
    u = 1.0 if rng is None else rng.random()
    edges = np.cumsum([self.drop_image, self.drop_text, self.drop_both])
    drop = 0 if u >= edges[-1] else 1 + int(np.searchsorted(edges, u, side="right"))
    return {CLIP_PIXELS: preprocess_image(image, self.processor), DROP: np.int32(drop)}


# ---------------------------------------------------------------------------------------------
# The added UNet leaves and the official file layout.


def init_ip_layers(unet_params) -> dict:
  """Flat {unet/.../attn2/to_{k,v}_ip/kernel: copy of to_{k,v}/kernel} (float32)."""
  flat = tree.flatten({"unet": unet_params})
  return {f"{a}/to_{m}_ip/kernel": jnp.asarray(flat[f"{a}/to_{m}/kernel"], jnp.float32)
          for a in attn2_paths(unet_params) for m in "kv"}


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
  if unet_config is None:
    raise ConfigError("IP-Adapter needs the UNet's config")
  drops = (config.drop_image, config.drop_text, config.drop_both)
  if min(drops) < 0 or sum(drops) > 1:
    raise ConfigError(f"method.drop_image/drop_text/drop_both: each >= 0, together <= 1; got {drops}")
  encoder = load_method_image_encoder(config.image_encoder, tokenizer_dir)
  clip_config, clip_params = encoder.config, encoder.params
  cond = build_conditioning(config, base_params, tokenizer_dir, unet_config, clip_config)
  pretrained = None
  if config.pretrained:
    file = load(config.pretrained).path
    loaded, pretrained = from_official(read_official(file, config.allow_pickle),
                                       base_params["unet"], cond.projection.cross_attention_dim,
                                       config.pretrained)
    if (loaded.kind, loaded.image_dim) != (cond.projection.kind, cond.projection.image_dim):
      raise ConfigError(f"method.pretrained: {config.pretrained} holds a {loaded.kind} projection "
                        f"of {loaded.image_dim} image features; this config and image encoder "
                        f"need {cond.projection.kind} of {cond.projection.image_dim}")
    cond = dataclasses.replace(cond, projection=loaded)       # the file's token count, depth...

  def init(rng, base):
    if pretrained is not None:
      return pretrained
    proj = init_projection(rng, cond.projection)
    return tree.unflatten({**tree.flatten({IP_ADAPTER: {"image_proj": proj}}),
                           **init_ip_layers(base["unet"])})

  return Method(name=IP_ADAPTER, params=ParamSpec(init=init), conditioning=cond,
                unet=(DecoupledCrossAttention(),),
                components=lambda: {"image_encoder": clip_params},
                image_inputs=ConditionInputs(encoder.processor, *drops),
                save=functools.partial(save, encoder.folder, cond.projection))


def save(image_encoder: Path, projection: ProjectionConfig, trainable, context):
  """WORKDIR/ip_adapter.safetensors in the official layout (diffusers' load_ip_adapter reads it)."""
  path = write_official(Path(context.workdir) / RESULT_FILE, trainable, projection,
                        result_file.run_metadata(context, FORMAT,
                                                 image_encoder=str(image_encoder.absolute())))
  return [str(path)]


# ---------------------------------------------------------------------------------------------
# Sampling with a file (ours or an official one), export, verify.


def load(path) -> result_file.Result:
  """An IP-Adapter file (ours, WORKDIR/ip_adapter.safetensors, or an official one; read when
  sampling, which may need `--allow-pickle`): its path and metadata."""
  path = Path(path)
  path = path / RESULT_FILE if path.is_dir() else path
  if not path.is_file():
    raise ModelFileError(f"{path}: no IP-Adapter file here")
  return result_file.Result(path, {}, result_file.metadata(path))


def result_image_encoder(result, image_encoder, tokenizer_dir) -> Path:
  """--image-encoder, else the result's recorded encoder (ours), else MODEL/image_encoder."""
  if image_encoder:
    return Path(image_encoder)
  recorded = result.meta.get("image_encoder")
  if recorded and Path(recorded).is_dir():
    return Path(recorded)
  return image_encoder_dir("", tokenizer_dir)


def sample(request):
  """The images' tokens (concatenated) through the decoupled cross-attention at the traced
  `ip_scale` (default 1); the negative half: a zero image embedding's tokens at that scale."""
  from PIL import Image

  from persona_jax.data.clip_images import load_image_processor, preprocess_image
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.text_to_image import Sampling
  if not request.images:
    raise ConfigError("IP-Adapter samples with one or more image prompts (--image PATH)")
  pipe, path = request.pipe, request.result.path
  scale = float(request.inputs.get(IP_SCALE, 1.0))
  folder = result_image_encoder(request.result, request.inputs.get("image_encoder"),
                                pipe.tokenizer_dir)
  clip_config, clip_params = load_image_encoder(folder)
  projection, trainable = from_official(read_official(path, request.allow_pickle),
                                        pipe.params["unet"], cross_attention_dim(pipe.unet_config),
                                        str(path))
  feature_dim = clip_config.hidden_size if projection.kind == PLUS else clip_config.projection_dim
  if projection.image_dim != feature_dim:
    raise ModelFileError(f"{path}: the projection reads {projection.image_dim} image features; "
                         f"the image encoder {folder} gives {feature_dim}")
  cond = IPAdapterConditioning(clip_config, projection, (), scale)   # no caption drop: no ids
  params = tree.merge({**request.params, "image_encoder": clip_params}, trainable)
  processor = load_image_processor(folder, clip_config.image_size)
  pixels = [preprocess_image(np.asarray(Image.open(p).convert("RGB")), processor)
            for p in request.images]
  inputs = {CLIP_PIXELS: np.stack(pixels)[None], IP_SCALE: np.asarray([scale], np.float32)}
  return Sampling(params, None, cond, inputs=inputs, addons=(DecoupledCrossAttention(),))


def export(request):
  """The run's ip_adapter.safetensors (already the official layout) and its image encoder."""
  import shutil

  from persona_jax.convert.files import copy_file
  result = request.result
  source, encoder = result.path, result.meta.get("image_encoder")
  if not encoder or not Path(encoder).is_dir():
    raise ModelFileError(f"{source}: its image encoder folder ({encoder}) is gone; copy "
                         f"{source.name} and pass the encoder to load_ip_adapter yourself")
  path = copy_file(source, request.out / RESULT_FILE)
  encoder_out = request.out / "image_encoder"
  shutil.copytree(encoder, encoder_out, dirs_exist_ok=True)
  return [path, encoder_out], {}


# `persona-jax verify MODEL --ip-adapter FILE [--image-encoder DIR]`: the image encoder with its
# preprocessing, then one file loaded by diffusers (`pipe.load_ip_adapter`) and by persona_jax,
# compared on the same random CLIP pixels: the image features (transformers' encoder vs ours), the
# projected tokens (diffusers' `encoder_hid_proj` vs ours), the UNet's output with the decoupled
# cross-attention at a scale, and three DDIM steps with guidance. A last line reports how much the
# adapter moved diffusers' UNet (a loader that silently skipped the file shows 0 there).

VERIFY_SCALE = 0.6


def compare_ip_adapter(pipe, model_path, file, image_encoder, *, scale: float = VERIFY_SCALE,
                       allow_pickle: bool = False, seed: int = 0, sampling_steps: int = 0):
  """[Comparison] of `file` (official layout) on both sides; `pipe` is persona_jax's pipeline of
  the diffusers folder `model_path`, `image_encoder` a CLIPVisionModel(WithProjection) folder.
  With `sampling_steps`, also that many DDIM steps with guidance (`_compare_sampling`)."""
  import torch
  from diffusers import StableDiffusionPipeline
  from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.verify import Comparison, compare, nchw, nhwc
  file, image_encoder = Path(file), Path(image_encoder)
  state = read_official(file, allow_pickle)                  # refuses a pickle unless allowed
  projection, trainable = from_official(state, pipe.params["unet"],
                                        cross_attention_dim(pipe.unet_config), str(file))
  clip_config, clip_params = load_image_encoder(image_encoder)
  ref = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None,
                                                local_files_only=True, dtype=torch.float32)
  ref.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name,
                      image_encoder_folder=None)
  cls = CLIPVisionModelWithProjection if clip_config.with_projection else CLIPVisionModel
  encoder = cls.from_pretrained(image_encoder, local_files_only=True).eval().float()

  rng = np.random.default_rng(seed)
  s, f, c = clip_config.image_size, pipe.unet_config.downsample_factor, pipe.unet_config
  pixels = rng.standard_normal((2, s, s, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 4 * f, 3 * f, c.in_channels)).astype(np.float32)
  t = np.array([500, 80])
  ctx = rng.standard_normal((2, 7, cross_attention_dim(c))).astype(np.float32)
  unet = UNet2DConditionModel(dataclasses.replace(c, addons=(DecoupledCrossAttention(),)))
  params = jax.tree.map(jnp.asarray, tree.merge({"unet": pipe.params["unet"]}, trainable))

  @jax.jit
  def ours(params, clip_params, pixels, scale):
    feats = image_features(clip_config, projection.kind, clip_params, pixels)
    tokens = projection_model(projection).apply({"params": params["ip_adapter"]["image_proj"]}, feats)
    out = unet.apply({"params": params["unet"]}, latents, t, ctx,
                     {IP_TOKENS: tokens, IP_SCALE: scale})
    return feats, tokens, out

  with torch.no_grad(), jax.default_matmul_precision("highest"):
    got = jax.device_get(ours(params, clip_params, pixels, jnp.float32(scale)))
    out = encoder(torch.from_numpy(nchw(pixels)), output_hidden_states=True)
    feats = out.hidden_states[-2] if projection.kind == PLUS else out.image_embeds
    embeds = [feats[:, None]]                               # [B, 1 image, ...]
    tokens = ref.unet.encoder_hid_proj(embeds)[0][:, 0]
    run_ref = lambda: ref.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(t),
                               encoder_hidden_states=torch.from_numpy(ctx),
                               added_cond_kwargs={"image_embeds": embeds}).sample.numpy()
    ref.set_ip_adapter_scale(scale)
    want = run_ref()
    ref.set_ip_adapter_scale(0.0)
    off = run_ref()
  moved = float(np.abs(want - off).max() / max(np.abs(off).max(), 1e-30))
  name = f"ip_adapter({projection.kind})."
  results = [compare(name + "image_features", got[0], feats.numpy()),
             compare(name + "image_proj tokens", got[1], tokens.numpy()),
             compare(name + f"unet (scale {scale})", got[2], nhwc(want))]
  if sampling_steps:
    with torch.no_grad():
      zeros = (encoder(torch.zeros_like(torch.from_numpy(nchw(pixels))),
                       output_hidden_states=True).hidden_states[-2]
               if projection.kind == PLUS else torch.zeros_like(feats))
    ref.set_ip_adapter_scale(scale)
    results.append(_compare_sampling(pipe, ref, model_path, params, clip_params, clip_config,
                                     projection, pixels, feats, zeros, scale, sampling_steps,
                                     seed, name))
  return results + [Comparison("adapter moved diffusers' UNet output", moved, moved)]


def _compare_sampling(pipe, ref, model_path, params, clip_params, clip_config, projection,
                      pixels, feats, zeros, scale, steps, seed, name):
  """`steps` DDIM steps with guidance from identical latents: diffusers' pipeline given the
  image embeddings (`ip_adapter_image_embeds`: the zeros' then the image's) against our sampler
  with the IP-Adapter conditioning (it encodes the pixels itself)."""
  import math

  import torch
  from diffusers import DDIMScheduler

  from persona_jax.diffusion.sampling import generate, pipeline_scheduler
  from persona_jax.models.components import SDModels
  from persona_jax.models.unet import UNet2DConditionModel
  from persona_jax.tokenizer import tokenize
  from persona_jax.verify import GUIDANCE, PROMPTS, compare, nchw
  ref.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(model_path,
                                                                      subfolder="scheduler"))
  ref.set_progress_bar_config(disable=True)
  b = pixels.shape[0]
  prompts, negative = list(PROMPTS)[:b], ["blurry"] * b
  f, c = pipe.vae_scale_factor, pipe.unet_config
  m = math.lcm(c.downsample_factor, max(1, 8 // f))
  latents = np.random.default_rng(seed + 1).standard_normal(
      (b, 4 * m, 3 * m, c.in_channels)).astype(np.float32)
  # diffusers applies the given embeddings (one set: [negative; positive], each [1, K images,
  # ...]) to every prompt of the batch: the first image conditions both prompts, on our side too.
  embeds = [torch.cat([zeros[:1], feats[:1]])[:, None]]              # [2, 1 image, ...]
  pixels = np.repeat(pixels[:1], b, axis=0)
  with torch.no_grad():
    want = ref(prompt=prompts, negative_prompt=negative, num_inference_steps=steps,
               guidance_scale=GUIDANCE, latents=torch.from_numpy(nchw(latents)),
               height=latents.shape[1] * f, width=latents.shape[2] * f,
               ip_adapter_image_embeds=embeds, output_type="latent").images.numpy()
  cond = IPAdapterConditioning(clip_config, projection, (), scale)
  models = SDModels(UNet2DConditionModel(dataclasses.replace(c, addons=(DecoupledCrossAttention(),))),
                    pipe.text_encoder, pipe.vae)
  full = {**pipe.params, **params, "image_encoder": clip_params}     # params: the UNet with the file
  inputs = {IDS: tokenize(pipe.tokenizer, prompts), NEGATIVE_IDS: tokenize(pipe.tokenizer, negative),
            CLIP_PIXELS: pixels, IP_SCALE: np.full((b,), scale, np.float32)}
  with jax.default_matmul_precision("highest"):
    got = generate(full, inputs, 0, np.arange(b), GUIDANCE, 0.0, 0.0, latents, models=models,
                   scheduler=pipeline_scheduler(pipe.scheduler_config), num_steps=steps,
                   latent_shape=latents.shape[1:], decode=False, conditioning=cond)
  return compare(f"{name}ddim {steps} steps, cfg {GUIDANCE}: latents", nchw(got), want)


def verify_file(pipe, model_path, file, *, image_encoder=None, allow_pickle: bool = False,
                seed: int = 0, sampling_steps: int = 3):
  """The image encoder (`image_encoder`, else MODEL/image_encoder) with its preprocessing, then
  the file on both sides (and `sampling_steps` DDIM steps with guidance): [Comparison], the last
  one how much the adapter moved diffusers' UNet. `file`: an IP-Adapter file or a run folder."""
  from persona_jax.verify import compare_image_encoder, find_image_encoder
  path, file = Path(model_path), load(file).path
  encoder = find_image_encoder(path, image_encoder)
  if encoder is None:
    raise ModelFileError(f"{path} has no image_encoder/; pass --image-encoder DIR (the CLIP image "
                         "encoder the IP-Adapter was trained with)")
  results = compare_image_encoder(encoder, allow_pickle=allow_pickle, seed=seed)
  return results + compare_ip_adapter(pipe, path, file, encoder, allow_pickle=allow_pickle,
                                      seed=seed, sampling_steps=sampling_steps)


SPEC = MethodSpec(
    name=IP_ADAPTER, config=IPAdapterConfig, make=make, result=ResultSpec(RESULT_FILE, FORMAT),
    load=load, sample=sample,
    sampling=SamplingSpec(
        images="some", flag="--ip-adapter",
        flag_help="an IP-Adapter file (official layout: ip-adapter_sd15.safetensors, a pickled "
                  ".bin with --allow-pickle, or an ip_adapter run's result): the image prompt is "
                  "--image (repeat for several: their tokens are concatenated)",
        knobs=(Knob(IP_SCALE, "ip-adapter: the image branch's weight (default 1; 0.5 to let the "
                    "text lead)"),
               Knob("image_encoder", "ip-adapter: the CLIP image encoder folder (default: the one "
                    "our result records, else MODEL/image_encoder)", Path))),
    exports={"diffusers": export},
    eval={"ip_adapter": EvalRecipe("tuning_free", "{cls}")},
    verify=VerifySpec("--ip-adapter", "FILE", "compare one IP-Adapter file (official layout) "
                      "loaded by diffusers' load_ip_adapter and by persona_jax, with the "
                      "--image-encoder", verify_file))
