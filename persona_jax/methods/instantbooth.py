"""InstantBooth, personalization without test-time tuning (Shi et al. 2023; methods.md 6).

  persona-jax train --config instantbooth:tiny --workdir runs/ib
  persona-jax sample --instantbooth runs/ib --image A.png [--image B.png] \\
      --prompt "a photo of sks ball on the beach" [--beta 0.3] [--alpha 0.4] --out out/

The base model stays frozen. Two heads on one frozen CLIP image encoder (`image_encoder`,
default MODEL/image_encoder), each a trainable linear layer:
  * concept encoder: the pooled output (post-LN class token) -> one token [D_text] that replaces
    the identifier's (`identifier`, "sks") embedding at the text encoder's OUTPUT; several input
    images are averaged: f_c = mean_i E_c(x_i). At sampling the token is renormalized,
    f_c := alpha * f_c (alpha, default 0.4: it scales the token's cross-attention keys and
    values, so it does not dominate the prompt);
  * patch encoder: every token of the last layer (class token and patches, through the tower's
    post_layernorm) -> [T, D_text]; several images are concatenated along the tokens (N * T).
The patch tokens feed an adapter in every transformer block between self- and cross-attention
(the UNet add-on `GatedAdapter`, models/adapters.py): y := y + beta * tanh(gamma) * S([y, f_p]) at
the visual positions, gamma initialized at 0; beta is 1 in training and, at sampling, `beta`
(default 0.3). Both knobs are traced sampler inputs (`adapter_scale`, `concept_scale`): changing
them does not recompile. The unconditional half of classifier-free guidance is the base model
on the negative prompt (the adapter at scale 0, no concept token).

Training (N = 1): image-caption pairs whose captions contain the identifier before the class
noun ("a photo of a sks ball on a red background"); each example's own image, masked to its
subject and augmented (`ConditionImage`: crop to the mask's box, random crop, rotation, flip),
conditions the reconstruction of the original image. Masks are optional files next to the
images: NAME.mask.png for NAME.png / NAME.jpg (data/sources.py; white = subject, same size as
the image). Only the two linear layers and the adapters train, with the paper's learning rates
in the run config (`optim.lr` 1e-4 for the encoders, an `optim.lr_groups` entry of 1e-6 for
the adapters); the loss is the plain epsilon-MSE.

Trainable leaves: instantbooth/{concept,patch}/{kernel,bias} and unet/<every transformer
block>/adapter/{linear,norm,attn/to_q,to_k,to_v,to_out_0,gamma}. `concept_token=False` or
`patch_tokens=False` drops one branch (the paper's ablations).

Result WORKDIR/instantbooth.safetensors: every trained leaf by path (float32); metadata: the
format, the base model, the image encoder folder, the data resolution and the method options.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.data.batch import CLIP_PIXELS, IDS, NEGATIVE_IDS
from persona_jax.diffusion.conditioning import negative_context
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.image_encoder import MethodImageEncoder, load_method_image_encoder
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.spec import EvalRecipe, Knob, MethodSpec, ResultSpec, SamplingSpec
from persona_jax.models.adapters import per_example
from persona_jax.models.addons import ADAPTER_SCALE, ADAPTER_TOKENS, GatedAdapter
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.norms import LayerNorm

log = logging.getLogger(__name__)

INSTANTBOOTH = "instantbooth"
RESULT_FILE = "instantbooth.safetensors"
FORMAT = "persona_jax-instantbooth"
ADAPTER_LEAVES = r"unet/.*/adapter/.*"
ENCODER_LEAVES = rf"{INSTANTBOOTH}/.*"
# Sampler inputs (traced): beta and alpha, scalar or [B].
BETA, ALPHA = ADAPTER_SCALE, "concept_scale"


@dataclasses.dataclass(frozen=True)
class InstantBoothConfig:
  identifier: str = "sks"            # an existing one-token word, put before the class noun
  image_encoder: str = ""            # a CLIPVisionModel(WithProjection) folder; "": MODEL/image_encoder
  concept_token: bool = True         # False: no concept encoder (ablation)
  patch_tokens: bool = True          # False: no patch encoder and no adapters (ablation)
  beta: float = 0.3                  # the adapters' weight at sampling (training: 1)
  alpha: float = 0.4                 # the concept token's renormalization at sampling (training: 1)
  # The condition image's augmentation in training (after cropping to the mask's box):
  crop_scale: float = 0.8            # random square crops of side in [crop_scale, 1] x the box
  rotation: float = 10.0             # degrees, uniform in [-rotation, rotation]
  flip: float = 0.5


# ---------------------------------------------------------------------------------------------
# The condition image: masked to the subject, cropped to it, augmented, CLIP-preprocessed.


def subject_box(mask: np.ndarray) -> tuple[int, int, int]:
  """(top, left, side) of the smallest square around the mask's subject (mask [H, W] bool),
  clamped into the image; the whole image's largest centered square without a subject."""
  h, w = mask.shape
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if len(rows) == 0:
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side
  side = min(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1, h, w)
  cy, cx = (rows[0] + rows[-1] + 1) // 2, (cols[0] + cols[-1] + 1) // 2
  top = int(np.clip(cy - side // 2, 0, h - side))
  left = int(np.clip(cx - side // 2, 0, w - side))
  return top, left, int(side)


def condition_image(image: np.ndarray, mask: np.ndarray | None = None,
                    rng: np.random.Generator | None = None, *, crop_scale: float = 1.0,
                    rotation: float = 0.0, flip: float = 0.0) -> np.ndarray:
  """uint8 [H, W, 3] (and a uint8 or bool mask [H, W]) -> the uint8 image the encoders see:
  background zeroed and cropped to the subject's square box with a mask; then, with `rng`, a
  random crop of side in [crop_scale, 1] x the box, a rotation in [-rotation, rotation]
  degrees (corners black) and a horizontal flip with probability `flip`."""
  from PIL import Image
  if mask is not None:
    subject = np.asarray(mask) >= 128 if np.asarray(mask).dtype == np.uint8 else np.asarray(mask, bool)
    image = np.where(subject[..., None], image, 0).astype(np.uint8)
    top, left, side = subject_box(subject)
    image = image[top: top + side, left: left + side]
  if rng is None:
    return np.ascontiguousarray(image)
  h, w = image.shape[:2]
  side = max(1, int(round(min(h, w) * rng.uniform(crop_scale, 1.0))))
  top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
  image = image[top: top + side, left: left + side]
  angle = float(rng.uniform(-rotation, rotation))
  if angle:
    image = np.asarray(Image.fromarray(image).rotate(angle, Image.Resampling.BILINEAR))
  if rng.random() < flip:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


@dataclasses.dataclass(frozen=True, eq=False)
class ConditionImage:
  """The data pipeline's `image_inputs` hook: (augmented uint8 image, its mask or None, the
  example's rng) -> {clip_pixels: [S, S, 3] float32} (hashed by identity)."""
  processor: object                   # CLIPImageProcessorConfig of the image encoder
  crop_scale: float = 1.0
  rotation: float = 0.0
  flip: float = 0.0

  def __call__(self, image, mask=None, rng=None):
    from persona_jax.data.clip_images import preprocess_image
    x = condition_image(image, mask, rng, crop_scale=self.crop_scale, rotation=self.rotation,
                        flip=self.flip)
    return {CLIP_PIXELS: preprocess_image(x, self.processor)}


# ---------------------------------------------------------------------------------------------
# The conditioning: concept token at the identifier, patch tokens for the adapters.


def linear(params, x):
  """x [..., Din] @ kernel [Din, D] + bias [D]."""
  return x @ params["kernel"] + params["bias"].reshape((1,) * (x.ndim - 1) + (-1,))


@dataclasses.dataclass(frozen=True)
class InstantBoothConditioning:
  """InstantBooth's conditioning (diffusion/conditioning.py); nothing depends on the latent."""
  clip: CLIPVisionConfig
  identifier_id: int
  concept_token: bool
  patch_tokens: bool
  beta: float                        # sampling defaults, when the inputs do not set them
  alpha: float
  input_keys: tuple[str, ...] = (CLIP_PIXELS,)
  cacheable = False

  def features(self, params, pixels):
    """CLIP pixels [B, S, S, 3] or [B, N, S, S, 3] (N images per example) -> (concept [B, D]
    averaged over the N images, or None; patch tokens [B, N * T, D] concatenated, or None)."""
    pixels = pixels[:, None] if pixels.ndim == 4 else pixels
    b, n = pixels.shape[:2]
    out = CLIPVisionModel(self.clip).apply({"params": params["image_encoder"]},
                                           pixels.reshape((b * n,) + pixels.shape[2:]))
    heads = params[INSTANTBOOTH]
    concept = patch = None
    if self.concept_token:
      pooled = jax.lax.stop_gradient(out.pooler_output.astype(jnp.float32))          # [BN, Dv]
      concept = linear(heads["concept"], pooled).reshape(b, n, -1).mean(axis=1)       # [B, D]
    if self.patch_tokens:
      ln = LayerNorm(self.clip.layer_norm_eps, self.clip.dtype, self.clip.param_dtype)
      tokens = ln.apply({"params": params["image_encoder"]["vision_model"]["post_layernorm"]},
                        out.last_hidden_state)
      tokens = jax.lax.stop_gradient(tokens.astype(jnp.float32))                      # [BN, T, Dv]
      patch = linear(heads["patch"], tokens)
      patch = patch.reshape(b, n * patch.shape[1], patch.shape[2])                    # [B, NT, D]
    return concept, patch

  def prepare(self, models, params, inputs):
    """{"ids" [B, L], "text" [B, L, D] the prompt's text-encoder output, "concept", "patch",
    "negative", "kwargs" (the UNet's, at alpha and beta: training 1; sampling the inputs' or the
    defaults, [B]; the same at every step)}."""
    negative = negative_context(models, params, inputs)
    text = models.text_encoder.apply({"params": params["text_encoder"]},
                                     inputs[IDS]).last_hidden_state
    concept, patch = self.features(params, inputs[CLIP_PIXELS])
    alpha = beta = 1.0
    if NEGATIVE_IDS in inputs:
      b = inputs[IDS].shape[0]
      scale = lambda key, default: jnp.broadcast_to(
          jnp.asarray(inputs.get(key, default), jnp.float32), (b,))
      alpha, beta = scale(ALPHA, self.alpha), scale(BETA, self.beta)
    state = {"ids": inputs[IDS], "text": text, "concept": concept, "patch": patch,
             "negative": negative}
    return {**state, "kwargs": self.unet_kwargs(state, alpha, beta)}

  def unet_kwargs(self, state, alpha, beta) -> dict:
    """The UNet's keyword arguments: the text with alpha * f_c at the identifier's positions,
    and the patch tokens at adapter scale beta (alpha, beta: scalars or [B])."""
    context = state["text"]
    if state["concept"] is not None:
      b = context.shape[0]
      token = per_example(alpha, b, 3, jnp.float32) * state["concept"][:, None, :]   # [B, 1, D]
      at_identifier = (state["ids"] == self.identifier_id)[..., None]
      context = jnp.where(at_identifier, token.astype(context.dtype), context)
    kwargs = {"encoder_hidden_states": context}
    if state["patch"] is not None:
      kwargs["streams"] = {ADAPTER_TOKENS: state["patch"], ADAPTER_SCALE: beta}
    return kwargs

  def at(self, models, params, state, noisy, t, step):
    return state["kwargs"], {}

  def negative(self, models, params, state):
    """The negative prompt, adapters at scale 0 (the base model)."""
    negative = {"encoder_hidden_states": state["negative"]}
    if state["patch"] is not None:
      negative["streams"] = {ADAPTER_TOKENS: state["patch"],
                             ADAPTER_SCALE: jnp.zeros(state["ids"].shape[:1], jnp.float32)}
    return negative


# ---------------------------------------------------------------------------------------------
# Building the method.


@dataclasses.dataclass
class Parts:
  """What training and sampling both build from a config and a base model."""
  conditioning: InstantBoothConditioning
  encoder: MethodImageEncoder
  text_width: int


def identifier_id(tokenizer, word: str) -> int:
  """The token id of the identifier, an existing word of one token."""
  ids = tokenizer(word, add_special_tokens=False)["input_ids"]
  if len(ids) != 1:
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise ConfigError(f"method.identifier: '{word}' is {len(ids)} tokens ({' '.join(pieces)}); "
                      "use a rare word that is a single token, such as 'sks'")
  return int(ids[0])


def check_config(config: InstantBoothConfig) -> None:
  if not (config.concept_token or config.patch_tokens):
    raise ConfigError("method.concept_token and method.patch_tokens are both off: nothing trains")
  for name in ("beta", "alpha", "rotation"):
    if getattr(config, name) < 0:
      raise ConfigError(f"method.{name} must be >= 0, got {getattr(config, name)}")
  if not 0 < config.crop_scale <= 1 or not 0 <= config.flip <= 1:
    raise ConfigError("method.crop_scale must be in (0, 1] and method.flip in [0, 1]")


def build_parts(config: InstantBoothConfig, base_params, tokenizer_dir) -> Parts:
  from persona_jax.tokenizer import load_tokenizer
  check_config(config)
  encoder = load_method_image_encoder(config.image_encoder, tokenizer_dir)
  clip_config = encoder.config
  text_width = base_params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape[1]
  conditioning = InstantBoothConditioning(
      clip_config, identifier_id(load_tokenizer(tokenizer_dir), config.identifier),
      config.concept_token, config.patch_tokens, float(config.beta), float(config.alpha))
  return Parts(conditioning, encoder, int(text_width))


def init_heads(rng, config: InstantBoothConfig, clip_width: int, text_width: int) -> dict:
  """{concept, patch: {kernel [Dv, D] (lecun normal), bias [D] zeros}} of the branches on."""
  out = {}
  for i, (name, on) in enumerate((("concept", config.concept_token),
                                  ("patch", config.patch_tokens))):
    if on:
      kernel = jax.random.normal(jax.random.fold_in(rng, i), (clip_width, text_width))
      out[name] = {"kernel": kernel / math.sqrt(clip_width),
                   "bias": jnp.zeros((text_width,), jnp.float32)}
  return out


def init_adapters(rng, unet_config, text_width: int, base_unet) -> dict:
  """Fresh adapter params of every transformer block, {"unet": ...} (gamma 0); `base_unet`:
  the base UNet's params (or their shapes)."""
  from persona_jax.models.unet import UNet2DConditionModel, init_added_params
  unet = UNet2DConditionModel(dataclasses.replace(unet_config, addons=(GatedAdapter(),)))
  return {"unet": init_added_params(unet, rng, {
      ADAPTER_TOKENS: jnp.zeros((1, 1, text_width), jnp.float32)}, base_unet)}


def make(config: InstantBoothConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """The InstantBooth method for a base model."""
  if unet_config is None:
    raise ConfigError("InstantBooth needs the UNet's config (its adapters)")
  parts = build_parts(config, base_params, tokenizer_dir)
  clip_params = {"image_encoder": parts.encoder.params}

  def init(rng, base):
    head_rng, adapter_rng = jax.random.split(rng)
    out = {INSTANTBOOTH: init_heads(head_rng, config, parts.conditioning.clip.hidden_size,
                                    parts.text_width)}
    if config.patch_tokens:
      out.update(init_adapters(adapter_rng, unet_config, parts.text_width, base["unet"]))
    return out

  return Method(name=INSTANTBOOTH, params=ParamSpec(init=init), conditioning=parts.conditioning,
                unet=(GatedAdapter(),) if config.patch_tokens else (),
                components=lambda: clip_params,
                image_inputs=ConditionImage(parts.encoder.processor, config.crop_scale,
                                            config.rotation, config.flip),
                save=functools.partial(save, config, parts.encoder.folder))


# ---------------------------------------------------------------------------------------------
# Result files and sampling.


def save(config: InstantBoothConfig, image_encoder: Path, trainable, context):
  """WORKDIR/instantbooth.safetensors: the trained leaves by path; metadata for sampling."""
  return result_file.write(context.workdir, RESULT_FILE, trainable, result_file.run_metadata(
      context, FORMAT, image_encoder=str(image_encoder.absolute()), identifier=config.identifier))


def load_result(path) -> result_file.Result:
  """Reads WORKDIR/instantbooth.safetensors (or the file itself); `.config` is the run's
  InstantBoothConfig."""
  return result_file.read(path, RESULT_FILE, FORMAT, "InstantBooth", "an instantbooth run",
                          InstantBoothConfig)


def image_pixels(image_paths, processor) -> np.ndarray:
  """Image files -> CLIP pixels [1, N, S, S, 3]: each masked and cropped to its subject when
  NAME.mask.png lies beside it (no augmentation)."""
  from persona_jax.data.images import load_image, load_mask
  from persona_jax.data.sources import mask_path
  out = []
  for path in image_paths:
    image = load_image(Path(path))
    m = mask_path(Path(path))
    mask = load_mask(m, image.shape[:2]) if m.is_file() else None
    out.append(ConditionImage(processor)(image, mask)[CLIP_PIXELS])
  return np.stack(out)[None]


def prompts_without_identifier(prompts, tokenizer, identifier: int) -> list[str]:
  """The prompts where the identifier's token (id) does not occur: the concept token has no
  place there (only the adapters see the images)."""
  from persona_jax.tokenizer import tokenize
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    return []
  ids = tokenize(tokenizer, prompts)
  return [p for p, row in zip(prompts, ids) if identifier not in row]


def sample(request):
  """The images' concept token (averaged) at the identifier and their patch tokens for the
  adapters, at the traced knobs beta and alpha (defaults: the run's); prompts without the
  identifier get a warning (only the adapters see the images there)."""
  from persona_jax.text_to_image import Sampling
  result, pipe = request.result, request.pipe
  if not request.images:
    raise ConfigError("InstantBooth samples from one or more subject images (--image PATH)")
  config = result.config
  parts = build_parts(config, pipe.params, pipe.tokenizer_dir)
  flat = tree.flatten({**request.params, "image_encoder": parts.encoder.params})
  adapters = {}
  for path, value in result.weights.items():
    if path.startswith("unet/"):
      if path in flat or "/adapter/" not in path:
        raise ModelFileError(f"{result.path}: {path} is not an adapter leaf")
      adapters[path] = value
    elif not path.startswith(f"{INSTANTBOOTH}/"):
      raise ModelFileError(f"{result.path}: {path} is not an InstantBooth leaf")
    flat[path] = jnp.asarray(value)
  if config.patch_tokens:
    want = tree.flatten(jax.eval_shape(lambda: init_adapters(
        jax.random.PRNGKey(0), pipe.unet_config, parts.text_width, request.params["unet"])))
    got = {p: tuple(v.shape) for p, v in adapters.items()}
    if got != {p: tuple(v.shape) for p, v in want.items()}:
      raise ModelFileError(f"{result.path}: its adapters do not fit this UNet; it was trained on "
                           f"{result.meta.get('base_model')}")
  knob = lambda name, default: request.inputs.get(name, default)
  inputs = {CLIP_PIXELS: image_pixels(request.images, parts.encoder.processor),
            BETA: np.float32([knob("beta", config.beta)]),
            ALPHA: np.float32([knob("alpha", config.alpha)])}
  identifier = parts.conditioning.identifier_id

  def expand(prompt: str) -> str:
    if prompts_without_identifier([prompt], pipe.tokenizer, identifier):
      log.warning("prompt '%s' does not contain the identifier '%s': the concept token is not "
                  "used (write it before the class noun, e.g. 'a photo of %s dog')", prompt,
                  config.identifier, config.identifier)
    return prompt
  return Sampling(tree.unflatten(flat), None, parts.conditioning, expand, inputs,
                  (GatedAdapter(),) if config.patch_tokens else ())


def upgrade(method: dict, config: dict) -> None:
  """Run configs from before the method lifecycle: the method's two learning rates became
  `optim.lr_groups` entries, in the order its optimizer had them (the encoders', then the
  adapters' with patch tokens), so a resumed run's optimizer state keeps its structure."""
  encoder_lr = method.pop("encoder_lr", 1e-4)
  adapter_lr = method.pop("adapter_lr", 1e-6)
  groups = [[ENCODER_LEAVES, encoder_lr]]
  if method.get("patch_tokens", True):
    groups.append([ADAPTER_LEAVES, adapter_lr])
  optim = config.setdefault("optim", {})
  optim["lr_groups"] = groups + list(optim.get("lr_groups", []))


SPEC = MethodSpec(
    name=INSTANTBOOTH, config=InstantBoothConfig, make=make, result=ResultSpec(RESULT_FILE, FORMAT),
    load=load_result, sample=sample, upgrade=upgrade,
    sampling=SamplingSpec(
        images="some", flag="--instantbooth",
        flag_help="an instantbooth run's workdir: its concept and patch encoders and adapters read "
                  "the subject from --image (repeat for several: the concept token is their "
                  "average); put the identifier before the class noun, e.g. --prompt 'a photo of "
                  "sks ball on the beach'. A mask NAME.mask.png beside an image masks it to the "
                  "subject",
        knobs=(Knob("beta", "instantbooth: the adapters' weight (default: the run's, 0.3)"),
               Knob("alpha", "instantbooth: the concept token's scale (default: the run's, 0.4)"))),
    eval={"instantbooth": EvalRecipe("tuning_free", "sks {cls}")})
