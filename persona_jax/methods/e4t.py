"""E4T, encoder-based domain tuning (Gal et al. 2023; methods.md 5; mkshing/e4t-diffusion).

  persona-jax train --config e4t_pretrain:tiny --workdir runs/e4t_pre        # a domain, many images
  persona-jax train --config e4t_tune:tiny --workdir runs/e4t \\
      --config.method.pretrained=runs/e4t_pre --config.data.instance_dir=/path/to/one/image
  persona-jax sample --e4t runs/e4t --image subject.png --prompt "a painting of *s" --out out/
  persona-jax export runs/e4t --format diffusers --out exported/   # offsets merged + an embedding

An encoder E predicts the placeholder's word embedding from one image and the noised latent:
  w = e(class_word) + s * E(x, z_t)                       (s = `scale`, 0.1; 0: the branch is off)
E sees the class tokens of every second layer of a CLIP image encoder (`image_encoder`, default
MODEL/image_encoder) and the pooled UNet encoder features of z_t under the empty prompt
(models/e4t_encoder.py, models/unet.UNetEncoderFeatures); w enters the text encoder as the
placeholder's input embedding and, at sampling, is recomputed at every denoising step from the
current latents (`E4TConditioning`, the method's conditioning).

Weight offsets on to_q/to_k/to_v of every attn1 and attn2: W' = W * (1 + dW), a param transform,
with dW = a @ b of rank `offset_rank` per matrix (b = 0 at init, so the UNet starts as the base;
`offset_rank=0`: a full-shape dW, zeros). The reference's per-matrix generator is not used.
Regularizers: `embedding_reg` * sum_b ||w_b||^2 over the batch, w including e(class_word), as
mkshing's pretrain_e4t.py / tuning_e4t.py (`reg_lambda * domain_embed.pow(2).sum()`; the paper
is silent on the target; `embedding_reg_target="offset"`: mean_b ||s E_b||^2, the offset from
the class word, our earlier reading) and `offset_reg` * mean(dW^2).

Phases (one method, two configs):
  pretrain  encoder + offsets train on a domain folder (CLIP frozen unless `train_image_encoder`);
  tune      encoder + offsets + the whole UNet, from `pretrained` (an e4t_pretrain workdir, or
            "shipped": the small state in persona_jax/assets/e4t_tiny/, made by
            scripts/make_e4t_state.py), ~15 steps on one image augmented into a batch.
Trainable leaves: `e4t/encoder/...`, `e4t/offsets/<kernel path without /kernel>/{a,b}` (or `dw`),
plus `unet/...` when tuning. The UNet features pass carries gradients, as in the reference.

Result WORKDIR/e4t.safetensors: every trained leaf by path (float32); metadata: the format, the
base model, the image encoder folder, the data resolution and the method options.

Where mkshing's code (the reference where the paper is silent) differs and we keep our way:
  * CLIP features: the class token of every second layer through post_layernorm (the paper's
    words, mkshing's legacy CLIP path); mkshing's OpenCLIP path takes the pooled output and every
    second patch token of the last layer.
  * Weight offsets: dW = a @ b of rank `offset_rank` with b = 0, so training starts from the base
    model exactly; mkshing's WeightOffsets generator is an MLP that is non-zero at init.
  * `offset_reg` (0.01 * mean(dW^2)) has no counterpart in mkshing's code; 0 turns it off.
  * The embedding regularizer sums over the global batch; mkshing's sums over each GPU's batch
    (DDP averages the gradients), the same on one device.
  * Tuning draws an independent zoomed crop and flip per row; mkshing repeats one augmented
    crop 16 times.
  * The configs train in bf16 on accelerators (mkshing: float32); sampling is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.data.batch import CLIP_PIXELS, IDS
from persona_jax.diffusion.conditioning import negative_context
from persona_jax.errors import ConfigError
from persona_jax.image_encoder import MethodImageEncoder, load_method_image_encoder
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec, TokenSpec
from persona_jax.methods.spec import EvalRecipe, Knob, MethodSpec, ResultSpec, SamplingSpec
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.models.e4t_encoder import E4TEncoder, E4TEncoderConfig
from persona_jax.models.norms import LayerNorm
from persona_jax.models.unet import UNetEncoderFeatures, encoder_feature_dim

E4T = "e4t"
RESULT_FILE = "e4t.safetensors"
FORMAT = "persona_jax-e4t"
PHASES = ("pretrain", "tune")
SHIPPED = "shipped"
EXPORT_TIMESTEP = 500            # the timestep of the embedding `export` writes for diffusers
TARGETS = re.compile(r"unet/.*/attn[12]/to_(q|k|v)/kernel")


@dataclasses.dataclass(frozen=True)
class E4TConfig:
  phase: str = "pretrain"            # pretrain | tune (see the module docstring)
  class_word: str = "face"           # one token: w = e(class_word) + scale * E(image, z_t)
  placeholder: str = "*s"            # a new token, used in prompts
  scale: float = 0.1                 # s (the reference's domain_embed_scale); 0: encoder branch off
  image_encoder: str = ""            # a CLIPVisionModel(WithProjection) folder; "": MODEL/image_encoder
  train_image_encoder: bool = False  # the reference's --unfreeze_clip_vision
  encoder_width: int = 0             # the encoder's hidden width; 0: the image encoder's width
  offset_rank: int = 4               # dW = a @ b of this rank per matrix; 0: a full-shape dW
  embedding_reg: float = 0.01        # lambda of sum_b ||w||^2 (pre-training 0.01, tuning 1e-4)
  embedding_reg_target: str = "word"   # word: sum_b ||w||^2 (mkshing); offset: mean_b ||s E||^2
  offset_reg: float = 0.01           # lambda of mean(dW^2) over every offset element
  pretrained: str = ""               # an e4t_pretrain workdir or its e4t.safetensors; "shipped"


# ---------------------------------------------------------------------------------------------
# The conditioning: w from the image and z_t, injected as the placeholder's input embedding.


def clip_layers(config: CLIPVisionConfig) -> tuple[int, ...]:
  """Indices into the image encoder's hidden states of every second layer's output (layers 2,
  4, ...: transformers' `hidden_states[1:][1::2]`)."""
  if config.num_hidden_layers < 2:
    raise ConfigError(f"method.image_encoder: E4T reads every second layer; this image encoder "
                      f"has {config.num_hidden_layers}")
  return tuple(range(2, config.num_hidden_layers + 1, 2))


def clip_class_features(config: CLIPVisionConfig, params, pixels, layers):
  """[B, S, S, 3] CLIP pixels -> [B, K, D]: the class token of each chosen layer, through the
  tower's own post_layernorm (which the last layer's pooled output also gets)."""
  out = CLIPVisionModel(config).apply({"params": params}, pixels)
  cls = jnp.stack([out.hidden_states[i][:, 0] for i in layers], axis=1)           # [B, K, D]
  ln = LayerNorm(config.layer_norm_eps, config.dtype, config.param_dtype)
  return ln.apply({"params": params["vision_model"]["post_layernorm"]}, cls).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class E4TConditioning:
  """E4T's conditioning (diffusion/conditioning.py): the prompt's conditioning with the
  placeholder's embedding w = e(class) + s * E(image, z_t), recomputed at every position."""
  clip: CLIPVisionConfig
  encoder: E4TEncoderConfig
  layers: tuple[int, ...]
  class_id: int
  placeholder_id: int
  empty_ids: tuple[int, ...]         # the empty prompt, the UNet features' conditioning
  scale: float
  embedding_reg: float
  train_image_encoder: bool
  embedding_reg_target: str = "word"
  input_keys: tuple[str, ...] = (CLIP_PIXELS,)
  cacheable = False

  def prepare(self, models, params, inputs):
    """{"ids" [B, L], "clip" [B, K, D] image features, "empty" [1, L, D] empty-prompt context,
    "negative" [B, L, D] the negative prompt's context (sampling)}."""
    negative = negative_context(models, params, inputs)
    feats = clip_class_features(self.clip, params["image_encoder"], inputs[CLIP_PIXELS], self.layers)
    if not self.train_image_encoder:
      feats = jax.lax.stop_gradient(feats)
    empty = models.text_encoder.apply({"params": params["text_encoder"]},
                                      jnp.asarray([self.empty_ids], jnp.int32)).last_hidden_state
    return {"ids": inputs[IDS], "clip": feats, "empty": empty, "negative": negative}

  def word(self, models, params, state, noisy, t):
    """(w [B, D], s * E [B, D]) at the noised latents [B, h, w, c] and timesteps [B]."""
    b = noisy.shape[0]
    empty = jnp.broadcast_to(state["empty"], (b,) + state["empty"].shape[1:])
    feats = UNetEncoderFeatures(models.unet.config).apply({"params": params["unet"]}, noisy, t,
                                                          empty)              # [B, F]
    e = E4TEncoder(self.encoder).apply({"params": params[E4T]["encoder"]}, state["clip"], feats)
    offset = self.scale * e                                                    # [B, D]
    table = params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    return table[self.class_id][None].astype(jnp.float32) + offset, offset

  def at(self, models, params, state, noisy, t, step):
    """The prompt's context with w at the placeholder, and the embedding regularizer."""
    word, offset = self.word(models, params, state, noisy, t)
    ids = state["ids"]
    table = params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    is_placeholder = ids == self.placeholder_id                                # [B, L]
    embeds = jnp.take(table, jnp.where(is_placeholder, self.class_id, ids), axis=0)   # [B, L, D]
    embeds = jnp.where(is_placeholder[..., None], word[:, None, :].astype(table.dtype), embeds)
    context = models.text_encoder.apply({"params": params["text_encoder"]}, ids,
                                        embeds).last_hidden_state
    penalty = embedding_penalty(word, offset, self.embedding_reg, self.embedding_reg_target)
    return {"encoder_hidden_states": context}, {"embedding_reg": penalty}

  def negative(self, models, params, state):
    return {"encoder_hidden_states": state["negative"]}


# ---------------------------------------------------------------------------------------------
# Weight offsets: W' = W * (1 + dW) on attention q/k/v kernels.


def offset_targets(base_params) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """(kernel path, shape) of every attn1/attn2 to_q, to_k, to_v kernel of the UNet."""
  return tuple((p, tuple(v.shape)) for p, v in sorted(tree.flatten(base_params).items())
               if TARGETS.fullmatch(p))


def offset_key(kernel: str) -> str:
  return f"{E4T}/offsets/{kernel.rsplit('/', 1)[0]}"


def offset_value(flat, kernel: str):
  """dW [in, out] of a kernel from the flat trainable (or merged) tree."""
  key = offset_key(kernel)
  if f"{key}/dw" in flat:
    return flat[f"{key}/dw"]
  return flat[f"{key}/a"] @ flat[f"{key}/b"]


def init_offsets(rng, targets, rank: int) -> dict:
  """Flat {path: array}: a ~ N(0, 1/rank^2) [in, r] and b = 0 [r, out], or dw = 0 [in, out]."""
  out = {}
  for i, (kernel, shape) in enumerate(targets):
    key = offset_key(kernel)
    if rank == 0:
      out[f"{key}/dw"] = jnp.zeros(shape, jnp.float32)
    else:
      out[f"{key}/a"] = jax.random.normal(jax.random.fold_in(rng, i), (shape[0], rank)) / rank
      out[f"{key}/b"] = jnp.zeros((rank, shape[1]), jnp.float32)
  return out


def apply_offsets(params, targets):
  """The params with every target kernel W replaced by W * (1 + dW) (params hold `e4t/offsets`)."""
  flat = tree.flatten(params)
  for kernel, _ in targets:
    if kernel in flat:
      w = flat[kernel]
      flat[kernel] = (w.astype(jnp.float32) * (1.0 + offset_value(flat, kernel))).astype(w.dtype)
  return tree.unflatten(flat)


def offset_penalty(targets, weight: float, params, trainable, batch, aux):
  """A loss term: {"offset_reg": weight * mean(dW^2) over every offset element}."""
  flat = tree.flatten(trainable)
  total = sum(jnp.sum(jnp.square(offset_value(flat, k))) for k, _ in targets)
  return {"offset_reg": weight * total / sum(int(np.prod(s)) for _, s in targets)}


# ---------------------------------------------------------------------------------------------
# Building the method, from a config or from a result file.


@dataclasses.dataclass
class Parts:
  """What training and sampling both build from a config and a base model."""
  conditioning: E4TConditioning
  targets: tuple
  encoder: MethodImageEncoder


def embedding_penalty(word, offset, weight: float, target: str = "word"):
  """The word-embedding regularizer of a batch: `word` w [B, D] = e(class) + s E, `offset` s E
  [B, D]. "word": weight * sum_b ||w_b||^2 (mkshing: reg_lambda * domain_embed.pow(2).sum());
  "offset": weight * mean_b ||s E_b||^2."""
  if target == "offset":
    return weight * jnp.mean(jnp.sum(jnp.square(offset), axis=-1))
  return weight * jnp.sum(jnp.square(word.astype(jnp.float32)))


def clip_inputs(image, mask=None, rng=None, *, processor):
  """Data pipeline hook: uint8 [H, W, 3] -> {clip_pixels: [S, S, 3] float32} (mask and rng unused)."""
  from persona_jax.data.clip_images import preprocess_image
  return {CLIP_PIXELS: preprocess_image(image, processor)}


def build_parts(config: E4TConfig, base_params, tokenizer_dir, unet_config) -> Parts:
  from persona_jax.tokenizer import check_new_tokens, load_tokenizer, tokenize
  if unet_config is None:
    raise ConfigError("E4T needs the UNet's config (its encoder features)")
  for name in ("scale", "embedding_reg", "offset_reg"):
    if getattr(config, name) < 0:
      raise ConfigError(f"method.{name} must be >= 0, got {getattr(config, name)}")
  if config.embedding_reg_target not in ("word", "offset"):
    raise ConfigError(f"method.embedding_reg_target: '{config.embedding_reg_target}' is not one "
                      "of word, offset")
  if config.offset_rank < 0 or config.encoder_width < 0:
    raise ConfigError("method.offset_rank and method.encoder_width must be >= 0")
  table = base_params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]   # [V, D]
  tokenizer = load_tokenizer(tokenizer_dir)
  (class_id,) = check_new_tokens(tokenizer, (config.placeholder,),
                                 [config.class_word], table.shape[0],
                                 ("method.placeholder", "method.class_word"))
  image_encoder = load_method_image_encoder(config.image_encoder, tokenizer_dir)
  clip_config = image_encoder.config
  layers = clip_layers(clip_config)
  encoder = E4TEncoderConfig(len(layers), clip_config.hidden_size, encoder_feature_dim(unet_config),
                             config.encoder_width or clip_config.hidden_size, table.shape[1])
  empty = tokenize(tokenizer, [""])[0]
  conditioning = E4TConditioning(clip_config, encoder, layers, int(class_id), table.shape[0],
                                 tuple(int(i) for i in empty), float(config.scale),
                                 float(config.embedding_reg), config.train_image_encoder,
                                 config.embedding_reg_target)
  return Parts(conditioning, offset_targets(base_params), image_encoder)


def init_encoder(rng, encoder: E4TEncoderConfig) -> dict:
  return E4TEncoder(encoder).init(rng, jnp.zeros((1, encoder.num_features, encoder.clip_width)),
                                  jnp.zeros((1, encoder.unet_features)))["params"]


def select_rules(config: E4TConfig, clip_config: CLIPVisionConfig, layers) -> tuple:
  """Existing leaves that train: the UNet when tuning; the image encoder's parts E4T reads
  (embeddings, layers up to the last used one, the layer norms) with `train_image_encoder`."""
  rules = [(r"unet/.*", True)] if config.phase == "tune" else []
  if config.train_image_encoder:
    used = "|".join(str(i) for i in range(max(layers)))
    rules.append((rf"image_encoder/vision_model/(embeddings|pre_layrnorm|post_layernorm|"
                  rf"encoder/layers_({used}))/.*", True))
  return tuple(rules)


def shipped_state() -> Path:
  """The small pre-trained state shipped as package data (made by scripts/make_e4t_state.py)."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "e4t_tiny" / RESULT_FILE))


def pretrained_path(config: E4TConfig) -> Path | None:
  if config.pretrained == SHIPPED:
    path = shipped_state()
    if not path.is_file():
      raise ConfigError(f"method.pretrained: the shipped E4T state ({path}) is not in this "
                        "installation; pass --config.method.pretrained=WORKDIR (an e4t_pretrain "
                        "run) or create it with `python scripts/make_e4t_state.py`")
    return path
  if config.pretrained:
    return Path(config.pretrained)
  if config.phase == "tune":
    raise ConfigError("method.pretrained: E4T tuning starts from a pre-trained encoder; pass "
                      "--config.method.pretrained=WORKDIR (an e4t_pretrain run)")
  return None


def load_pretrained(config: E4TConfig, fresh: dict) -> dict:
  """The e4t/* and image_encoder/* leaves of `config.pretrained`, checked against the fresh
  init's shapes (`fresh`: flat {path: array}); {} without one."""
  path = pretrained_path(config)
  if path is None:
    return {}
  result = load_result(path)
  if result.meta.get("class_word") not in (None, config.class_word):
    raise ConfigError(f"method.class_word: '{config.class_word}', but {result.path} was "
                      f"pre-trained for '{result.meta['class_word']}'")
  if any(p.startswith("unet/") for p in result.weights):
    raise ConfigError(f"method.pretrained: {result.path} is a tuned E4T result; tuning starts "
                      "from an e4t_pretrain run")
  state = {p: v for p, v in result.weights.items() if p.startswith(f"{E4T}/")}
  for p, v in fresh.items():
    if p not in state or tuple(state[p].shape) != tuple(v.shape):
      got = "missing" if p not in state else list(state[p].shape)
      raise ConfigError(f"method.pretrained: {result.path}: {p} is {got}, this config needs "
                        f"{list(v.shape)} (another encoder_width, offset_rank, image encoder or "
                        "base model?)")
  extra = sorted(set(state) - set(fresh))
  if extra:
    raise ConfigError(f"method.pretrained: {result.path}: {extra[0]} does not fit this model")
  return result.weights


def make(config: E4TConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """The E4T method (either phase) for a base model."""
  if config.phase not in PHASES:
    raise ConfigError(f"method.phase: '{config.phase}' is not one of {', '.join(PHASES)}")
  parts = build_parts(config, base_params, tokenizer_dir, unet_config)
  targets, cond = parts.targets, parts.conditioning
  abstract = jax.eval_shape(
      lambda: {**tree.flatten({E4T: {"encoder": init_encoder(jax.random.PRNGKey(0), cond.encoder)}}),
               **init_offsets(jax.random.PRNGKey(0), targets, config.offset_rank)})
  pretrained = load_pretrained(config, abstract)
  clip_params = tree.unflatten({
      **tree.flatten({"image_encoder": parts.encoder.params}),
      **{p: jnp.asarray(v) for p, v in pretrained.items() if p.startswith("image_encoder/")}})

  def init(rng, base):
    if pretrained:
      return tree.unflatten({p: jnp.asarray(v, jnp.float32) for p, v in pretrained.items()
                             if p.startswith(f"{E4T}/")})
    enc_rng, off_rng = jax.random.split(rng)
    return tree.unflatten({**tree.flatten({E4T: {"encoder": init_encoder(enc_rng, cond.encoder)}}),
                           **init_offsets(off_rng, targets, config.offset_rank)})

  losses = ((functools.partial(offset_penalty, targets, config.offset_reg),)
            if config.offset_reg else ())
  return Method(name=E4T, params=ParamSpec(select_rules(config, cond.clip, cond.layers), init,
                                           functools.partial(apply_offsets, targets=targets)),
                conditioning=cond, tokens=TokenSpec((config.placeholder,)), losses=losses,
                components=lambda: clip_params,
                image_inputs=functools.partial(clip_inputs, processor=parts.encoder.processor),
                save=functools.partial(save, config, parts.encoder.folder))


# ---------------------------------------------------------------------------------------------
# Result files, sampling and export.


def save(config: E4TConfig, image_encoder: Path, trainable, context):
  """WORKDIR/e4t.safetensors: the trained leaves by path; metadata for sampling and export."""
  return result_file.write(context.workdir, RESULT_FILE, trainable, result_file.run_metadata(
      context, FORMAT, image_encoder=str(image_encoder.absolute()), class_word=config.class_word,
      placeholder=config.placeholder))


def load_result(path) -> result_file.Result:
  """Reads WORKDIR/e4t.safetensors (or the file itself); `.config` is the run's E4TConfig."""
  return result_file.read(path, RESULT_FILE, FORMAT, "E4T", "an e4t run", E4TConfig, pretrained="")


@dataclasses.dataclass
class Prepared:
  """A result ready to sample: params (base, image encoder, trained leaves, offsets merged), the
  tokenizer with the placeholder, the parts."""
  params: dict
  tokenizer: object
  parts: Parts


def prepare_image(image_path, resolution: int, processor) -> np.ndarray:
  """An image file as training saw it (shorter side to `resolution`, center crop), then
  CLIP-preprocessed: [1, S, S, 3]."""
  from persona_jax.data import images as img_ops
  image = img_ops.load_square(Path(image_path), resolution)
  return clip_inputs(image, processor=processor)[CLIP_PIXELS][None]


def prepare(result: result_file.Result, pipe, params=None) -> Prepared:
  """A result on `pipe` (`params`: the tree to start from, default the pipeline's)."""
  from persona_jax.tokenizer import tokenizer_with_tokens
  config = result.config
  parts = build_parts(config, pipe.params, pipe.tokenizer_dir, pipe.unet_config)
  base = pipe.params if params is None else params
  flat = tree.flatten({**base, "image_encoder": parts.encoder.params})
  result_file.check_fits(result.path, result.meta.get("base_model"), flat,
                         {p: v for p, v in result.weights.items() if not p.startswith(f"{E4T}/")})
  flat.update({p: jnp.asarray(v) for p, v in result.weights.items()})
  return Prepared(apply_offsets(tree.unflatten(flat), parts.targets),
                  tokenizer_with_tokens(pipe.tokenizer_dir, (config.placeholder,)), parts)


def sample(request):
  """The image's embedding of the placeholder, recomputed from the current latents at every step."""
  from persona_jax.text_to_image import Sampling
  ready = prepare(request.result, request.pipe, request.params)
  resolution = int(request.result.meta.get("resolution", 512))
  pixels = prepare_image(request.images[0], resolution, ready.parts.encoder.processor)
  return Sampling(ready.params, ready.tokenizer, ready.parts.conditioning,
                  inputs={CLIP_PIXELS: pixels})


def embedding_at(ready: Prepared, pipe, image_path, resolution: int, timestep: int,
                 seed: int = 0) -> np.ndarray:
  """The placeholder's embedding w [D] at `timestep`, with z_t the image's VAE latent (the
  posterior mean) noised by N(0, I) from `seed`: what E4T computes for that image at that noise
  level. (At sampling w is recomputed from the current latents at every step instead.)"""
  from persona_jax.data import images as img_ops
  from persona_jax.diffusion.schedules import add_noise, alphas_cumprod
  from persona_jax.models.components import SDModels
  image = img_ops.load_square(Path(image_path), resolution)
  models = SDModels(pipe.unet, pipe.text_encoder, pipe.vae)
  cond = ready.parts.conditioning
  clip_pixels = prepare_image(image_path, resolution, ready.parts.encoder.processor)

  @jax.jit
  def word(params, pixels, clip_pixels):
    moments = models.vae.apply({"params": params["vae"]}, pixels, method="encode")
    z0 = moments.mean.astype(jnp.float32) * models.vae.config.scaling_factor
    noise = jax.random.normal(jax.random.PRNGKey(seed), z0.shape, jnp.float32)
    t = jnp.full((1,), timestep, jnp.int32)
    zt = add_noise(jnp.asarray(alphas_cumprod(pipe.scheduler_config)), z0, noise, t)
    state = cond.prepare(models, params, {IDS: jnp.zeros((1, 1), jnp.int32),
                                          CLIP_PIXELS: clip_pixels})
    return cond.word(models, params, state, zt, t)[0][0]
  return np.asarray(word(ready.params, img_ops.to_model_range(image)[None], clip_pixels))


def export(request):
  """The tuned pipeline with the offsets merged (OUT/), and OUT/e4t_embedding/: the
  placeholder's embedding for the run's first image at one timestep (`timestep`, default 500).
  Returns (paths, a record of the embedding)."""
  from persona_jax.convert.embedding_formats import write_diffusers_embedding
  from persona_jax.data.pipeline import example_subject_dir
  from persona_jax.data.sources import read_image_folder
  from persona_jax.pipeline import load_pipeline, save_pipeline
  result = request.result
  if result.config.phase != "tune":
    raise ConfigError(f"{request.workdir}: an e4t pre-training run has no subject to export; "
                      "export an e4t_tune run")
  pipe = load_pipeline(request.base)
  timestep = request.options.get("timestep")
  t = EXPORT_TIMESTEP if timestep is None else int(timestep)
  if not 0 <= t < pipe.scheduler_config.num_train_timesteps:
    raise ConfigError(f"--timestep {t}: must be in 0..{pipe.scheduler_config.num_train_timesteps - 1}")
  folder = request.config["data"].get("instance_dir") or example_subject_dir()
  image = read_image_folder(folder)[0].path
  ready = prepare(result, pipe)
  resolution = int(result.meta.get("resolution", request.config["data"]["resolution"]))
  word = embedding_at(ready, pipe, image, resolution, t)
  params = {k: ready.params[k] for k in pipe.params}
  merged = save_pipeline(dataclasses.replace(pipe, params=params), request.out, overwrite=True)
  token = result.config.placeholder
  note = (f"E4T's embedding of {token} for {image.name} at timestep {t}; persona-jax sample --e4t "
          "recomputes it at every denoising step, diffusers keeps this one")
  path = write_diffusers_embedding({token: word[None]}, request.out / "e4t_embedding",
                                   metadata={"timestep": t, "image": str(image), "note": note})
  return [merged, path], {"e4t_embedding": {"token": token, "timestep": t, "image": str(image),
                                            "file": str(path), "note": note}}


def upgrade(method: dict, config: dict) -> None:
  """A config.json from before `embedding_reg_target`: its run regularized the offset s E."""
  method.setdefault("embedding_reg_target", "offset")


SPEC = MethodSpec(
    name=E4T, config=E4TConfig, make=make, result=ResultSpec(RESULT_FILE, FORMAT),
    load=load_result, sample=sample, upgrade=upgrade,
    sampling=SamplingSpec(images="one", flag="--e4t",
                          flag_help="an e4t run's workdir: its encoder, weight offsets (and tuned "
                                    "UNet); the placeholder's embedding is predicted from --image "
                                    "at every step (e.g. --prompt 'a painting of *s'; default "
                                    "--model: the run's base)"),
    exports={"diffusers": export},
    export_options=(Knob("timestep", "e4t: the timestep of the exported embedding (default "
                         f"{EXPORT_TIMESTEP})", int),),
    eval={"e4t": EvalRecipe("one_image", "*s", "e4t_tune", 15, 1e-4,
                            (("method.class_word", "{cls}"), ("method.placeholder", "*s"),
                             ("data.num_images", 1)), state_key="method.pretrained")})
