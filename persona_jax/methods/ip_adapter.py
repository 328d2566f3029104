"""IP-Adapter, an image prompt for a frozen text-to-image model (Ye et al. 2023; methods.md 7;
tencent-ailab/IP-Adapter; formats.md 4.4), on SD 1.x/2.x and SDXL bases.

  persona-jax train --config ip_adapter:tiny --workdir runs/ip
  persona-jax sample --ip-adapter runs/ip/ip_adapter.safetensors --image A.png [--image B.png] \\
      --prompt "a photo on the beach" [--ip-scale 0.5] [--image-encoder DIR] --out out/
  persona-jax verify MODEL --ip-adapter FILE [--image-encoder DIR]

A frozen CLIP image encoder (`image_encoder`, default MODEL/image_encoder) gives the image
features; an image projection turns them into N tokens of the UNet's cross-attention width D:
  basic  tokens = LayerNorm(Linear(image_embeds).reshape(N, D)), N = 4 (the projected embedding);
  plus   a Perceiver resampler over the penultimate layer's patch features, N = 16 queries.
The official releases, and the defaults here:
  ip-adapter_sd15              basic, ViT-H (image_embeds 1024), D 768
  ip-adapter-plus_sd15         plus over ViT-H (1280), resampler width D = 768, 12 heads of 64
  ip-adapter_sdxl              basic, OpenCLIP ViT-bigG (image_embeds 1280), D 2048
  ip-adapter-plus_sdxl_vit-h   plus over ViT-H (1280), resampler width 1280 (on SDXL: the image
                               encoder's width, IPAdapterPlusXL's), 20 heads of 64, D 2048
Every attn2 gets a decoupled cross-attention on those tokens (the UNet add-on
`DecoupledCrossAttention`, models/adapters.py):
  Z = Attn(Q, K, V) + scale * Attn(Q, K_ip, V_ip), before the shared to_out,
with `to_k_ip`/`to_v_ip` initialized from the layer's to_k/to_v. Only the projection and the
to_k_ip/to_v_ip kernels train; the scale is 1 in training and a traced sampler input after.
The text side is the base's own (SDXL: both encoders, the pooled embedding, the time ids).

Condition dropping (the paper's, for classifier-free guidance; methods/ip_adapter_conditioning.py),
one uniform draw per example in the data pipeline: `drop_image`, then `drop_text` (the empty
caption), then `drop_both`, 0.05 each by default.

Several images condition one generation as in diffusers: each image's N tokens, concatenated
(K * N tokens). Two identical images therefore give the one image's output (each duplicated key
carries half the weight).

Files: the official layout (convert/ip_adapter_files.py; safetensors, a pickled .bin only with
allow_pickle): `image_proj.*` and `ip_adapter.{id}.to_k_ip.weight` / `to_v_ip.weight`, id = 1,
3, 5, ... the attn2 processors in diffusers' `unet.attn_processors` order. Training writes its
result in that layout (WORKDIR/ip_adapter.safetensors), which `pipe.load_ip_adapter` reads;
`method.pretrained` starts training from such a file. `verify --ip-adapter`:
methods/ip_adapter_verify.py.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.convert.ip_adapter_files import (RESULT_FILE, attn2_paths, cross_attention_dim,
                                                  find_file, from_official, read_official,
                                                  write_official)
from persona_jax.data.batch import CLIP_PIXELS
from persona_jax.diffusion.conditioning import text_encoders
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.image_encoder import image_encoder_dir, load_method_image_encoder
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.ip_adapter_conditioning import (IP_ADAPTER, ConditionInputs,
                                                         IPAdapterConditioning)
from persona_jax.methods.ip_adapter_verify import verify_file
from persona_jax.methods.spec import (EvalRecipe, Knob, MethodSpec, ResultSpec, SamplingSpec,
                                      VerifySpec)
from persona_jax.models.addons import IP_SCALE, DecoupledCrossAttention
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.image_projection import (BASIC, DIM_HEAD, PLUS, ProjectionConfig,
                                                 init_projection)

FORMAT = "persona_jax-ip_adapter"
KINDS = (BASIC, PLUS)


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
  kind: str = BASIC                  # basic | plus (the resampler; see the module docstring)
  num_tokens: int = 0                # 0: 4 (basic) or 16 (plus)
  heads: int = 0                     # plus: the resampler's heads (of width 64); 0: width // 64, at least 1
  depth: int = 4                     # plus: resampler layers
  width: int = 0                     # plus: the resampler's width; 0: D (SD), the encoder's (SDXL)
  image_encoder: str = ""            # a CLIPVisionModel(WithProjection) folder; "": MODEL/image_encoder
  drop_image: float = 0.05           # the paper's condition drops (one draw per example)
  drop_text: float = 0.05
  drop_both: float = 0.05
  pretrained: str = ""               # an IP-Adapter file (official layout) to start from
  allow_pickle: bool = False         # read `pretrained` as a pickled .bin (trusted files only)


# ---------------------------------------------------------------------------------------------
# The added UNet leaves.


def init_ip_layers(unet_params) -> dict:
  """Flat {unet/.../attn2/to_{k,v}_ip/kernel: copy of to_{k,v}/kernel} (float32)."""
  flat = tree.flatten({"unet": unet_params})
  return {f"{a}/to_{m}_ip/kernel": jnp.asarray(flat[f"{a}/to_{m}/kernel"], jnp.float32)
          for a in attn2_paths(unet_params) for m in "kv"}


# ---------------------------------------------------------------------------------------------
# Building the method.


def projection_for(config: IPAdapterConfig, clip: CLIPVisionConfig, cross_attention_dim: int,
                   sdxl: bool = False) -> ProjectionConfig:
  """The projection of a config: basic over the encoder's image_embeds; plus over its hidden
  states, the resampler `config.width` wide (0: the UNet's D, or on SDXL the encoder's width as
  the official IPAdapterPlus / IPAdapterPlusXL)."""
  if config.kind not in KINDS:
    raise ConfigError(f"method.kind: '{config.kind}' is not one of {', '.join(KINDS)}")
  if config.kind == BASIC:
    if not clip.with_projection:
      raise ConfigError("method.image_encoder: the basic IP-Adapter reads the projected image "
                        "embedding; this encoder has no visual_projection (use kind=plus)")
    return ProjectionConfig(BASIC, num_tokens=config.num_tokens or 4, image_dim=clip.projection_dim,
                            cross_attention_dim=cross_attention_dim)
  width = config.width or (clip.hidden_size if sdxl else cross_attention_dim)
  return ProjectionConfig(PLUS, num_tokens=config.num_tokens or 16, image_dim=clip.hidden_size,
                          cross_attention_dim=cross_attention_dim, depth=config.depth,
                          heads=config.heads or max(1, width // DIM_HEAD),
                          hidden_dim=0 if width == cross_attention_dim else width)


def second_tokenizer_dir(tokenizer_dir) -> Path:
  """SDXL's second tokenizer beside the first (a diffusers folder's tokenizer_2/), else the one
  the single-file loader uses (OpenCLIP's vocabulary padded with "!")."""
  sibling = Path(tokenizer_dir).parent / "tokenizer_2"
  if sibling.is_dir():
    return sibling
  from persona_jax.convert.single_file import default_tokenizer_dir
  return default_tokenizer_dir("openclip")


def build_conditioning(config: IPAdapterConfig, base_params, tokenizer_dir, unet_config,
                       clip_config, scale=1.0):
  """The conditioning with the empty caption's ids in every tokenizer (the text drop)."""
  from persona_jax.tokenizer import load_tokenizer, tokenize
  sdxl = "text_encoder_2" in text_encoders(base_params)
  projection = projection_for(config, clip_config, cross_attention_dim(unet_config), sdxl)
  folders = (tokenizer_dir,) + ((second_tokenizer_dir(tokenizer_dir),) if sdxl else ())
  empty = [tuple(int(i) for i in tokenize(load_tokenizer(f), [""])[0]) for f in folders]
  return IPAdapterConditioning(clip_config, projection, empty[0], float(scale),
                               empty_ids_2=empty[1] if sdxl else ())


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
  path = find_file(path)
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


SPEC = MethodSpec(
    name=IP_ADAPTER, config=IPAdapterConfig, make=make, result=ResultSpec(RESULT_FILE, FORMAT),
    sdxl=True, load=load, sample=sample,
    sampling=SamplingSpec(
        images="some", flag="--ip-adapter",
        flag_help="an IP-Adapter file (official layout: ip-adapter_sd15.safetensors, "
                  "ip-adapter_sdxl.safetensors, ip-adapter-plus_sdxl_vit-h.safetensors, a pickled "
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
