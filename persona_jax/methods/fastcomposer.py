"""FastComposer, tuning-free multi-subject generation (Xiao et al. 2023; methods.md 8;
mit-han-lab/fastcomposer).

  persona-jax train --config fastcomposer:tiny --workdir runs/fc          # toy-world subjects
  persona-jax train --config configs/fastcomposer.py --workdir runs/fc \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/folder
  persona-jax sample --fastcomposer runs/fc --image ball.png --image box.png \\
      --prompt "a ball <|image|> next to a box <|image|> on grass" --out out/

Subjects are marked in the caption as in the official code: `<|image|>` right after the subject's
noun. The markers are removed from the token ids and the preceding (noun) token is flagged; the
k-th marker is the k-th subject image (`--image`, in order). At the text encoder's OUTPUT each
flagged token t is replaced by the post-fuse MLP of t and the subject's image embedding e (CLIP
image encoder + visual_projection):
  h = MLP1([t; e]) + t;  h = MLP2(h) (residual);  out = LayerNorm(h)
(MLP: LayerNorm -> Linear -> GELU -> Linear). Other tokens are the text encoder's, unchanged;
without markers (or without subject images at sampling) this is the plain text path.

Losses (`method_loss`): the denoising MSE; with probability `mask_loss_prob`, drawn once per batch
as the reference draws it (fastcomposer/model.py: `torch.rand(1) < mask_loss_prob`), prediction and
target are multiplied by the union of the kept subjects' masks (`subject_union`,
data/fastcomposer.py) and the MSE stays the mean over the whole latent, so a masked example
weighs its subject's area, not more (`loss_weights`); plus `localization_weight` (1e-3) times the
cross-attention localization loss (balanced L1, `localization_loss`) on the attn2 layers of the
middle min(`localization_layers`, n) of the UNet's n cross-attention blocks (`localization_blocks`;
SD 1.5: down_blocks.1, down_blocks.2, mid_block, up_blocks.1, up_blocks.2).

Variants (`variant`):
  full   the paper's: the whole UNet, the fuse MLP and the last `image_encoder_trainable_layers`
         (2) transformer layers of the image encoder train;
  light  for small machines: the fuse MLP and LoRA factors on the UNet's transformer linears
         (methods/lora.py's init and transform; rank `lora_rank`); the image encoder is frozen.
Sampling: delayed subject conditioning, the plain prompt (markers removed) for the first
`start_merge_step` steps, the fused one after (diffusion/conditioning.py's `delayed`).

Data (`data/fastcomposer.py`): image, caption with markers, one mask per marker; batch keys
`ids` (with markers), `pixels`, `mask`, `subject_pixels` [B, K, S, S, 3] (CLIP-preprocessed
subject crops, K = `max_subjects`, zeros where absent) and `subject_masks` [B, K, h, w].

Result WORKDIR/fastcomposer.safetensors: every trained leaf by path (float32), metadata: the
format, the base model, the image encoder folder and the method options. The official release
becomes one with `persona-jax import-fastcomposer` (methods/fastcomposer_official.py).

Differences from the reference: the subject crops get no random augmentation
(the reference's `--no_object_augmentation`); the image embedding is visual_projection of the
pooled output, or the pooled output itself for an encoder without a projection (then the fuse
MLP's input width follows it).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.data.batch import IDS, NEGATIVE_IDS, SUBJECT_MASKS, SUBJECT_PIXELS, SUBJECT_UNION
from persona_jax.diffusion.conditioning import delayed, negative_context
from persona_jax.errors import ConfigError
from persona_jax.image_encoder import (MethodImageEncoder, image_encoder_dir,
                                       load_method_image_encoder)
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec, TokenSpec, compose
from persona_jax.methods.spec import (DataBuild, EvalRecipe, Knob, MethodSpec, ResultSpec,
                                     SamplingSpec)
from persona_jax.models import block_names
from persona_jax.models.addons import AttentionMaps
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig, UNetConfig
from persona_jax.models.postfuse import PostfuseModule, init_fuse

FASTCOMPOSER = "fastcomposer"
RESULT_FILE = "fastcomposer.safetensors"
FORMAT = "persona_jax-fastcomposer"
IMAGE_TOKEN = "<|image|>"
VARIANTS = ("full", "light")
START = "start_merge_step"           # a sampler input: the first step with subject conditioning


@dataclasses.dataclass(frozen=True)
class FastComposerConfig:
  variant: str = "full"                  # full | light (see the module docstring)
  image_encoder: str = ""                # a CLIPVisionModel(WithProjection) folder; "": MODEL/image_encoder
  image_encoder_trainable_layers: int = 2   # full: the last N transformer layers train
  lora_rank: int = 4                     # light: rank of the UNet's LoRA factors
  localization_weight: float = 1e-3      # lambda of the localization loss (0: off)
  localization_layers: int = 5           # the middle min(N, n) cross-attention blocks
  mask_loss_prob: float = 0.5            # share of batches whose denoising loss is masked
  max_subjects: int = 4                  # K: subject slots per example
  start_merge_step: int = 10             # sampling: steps with the plain prompt first
  uncondition_prob: float = 0.1          # data: empty caption, no subjects (for CFG)
  object_appear_prob: float = 0.9        # data: each subject keeps its marker with this probability


# ---------------------------------------------------------------------------------------------
# Markers: `<|image|>` tokens removed, the preceding token flagged.


def split_markers(ids, marker_id: int, pad_id: int, max_subjects: int):
  """Token ids with markers -> (ids without them [B, L] (padded with `pad_id` at the end),
  subject token positions [B, K] int32 (0 where absent), valid [B, K] float32): subject k is the
  token before the k-th marker. Traceable."""
  ids = jnp.asarray(ids)
  b, length = ids.shape
  is_marker = ids == marker_id
  keep = ~is_marker
  new_pos = jnp.cumsum(keep, axis=1) - 1                                       # [B, L]
  dest = jnp.where(keep, new_pos, length)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
  plain = jnp.full((b, length + 1), pad_id, ids.dtype).at[rows, dest].set(ids)[:, :length]
  rank = jnp.cumsum(is_marker, axis=1) - 1                                     # k of each marker
  onehot = is_marker[:, None, :] & (rank[:, None, :] == jnp.arange(max_subjects)[None, :, None])
  before = jnp.concatenate([jnp.zeros((b, 1), new_pos.dtype), new_pos[:, :-1]], axis=1)
  index = jnp.sum(jnp.where(onehot, before[:, None, :], 0), axis=2).astype(jnp.int32)
  return plain, index, jnp.any(onehot, axis=2).astype(jnp.float32)


def fuse_text(fuse_params, plain, image_embeds, index, valid):
  """plain [B, L, D], image_embeds [B, K, E], index/valid [B, K] -> [B, L, D]: the flagged
  tokens replaced by the fuse MLP's output, every other token `plain` exactly."""
  b, length, d = plain.shape
  tokens = jnp.take_along_axis(plain, index[..., None], axis=1)                # [B, K, D]
  fused = PostfuseModule(d).apply({"params": fuse_params}, tokens.astype(jnp.float32),
                                  image_embeds.astype(jnp.float32))             # [B, K, D]
  onehot = (index[..., None] == jnp.arange(length)[None, None]) & (valid[..., None] > 0)   # [B, K, L]
  at = jnp.einsum("bkl,bkd->bld", onehot.astype(jnp.float32), fused,
                  precision=jax.lax.Precision.HIGHEST)
  hit = jnp.any(onehot, axis=1)[..., None]                                     # [B, L, 1]
  return jnp.where(hit, at.astype(plain.dtype), plain)


def image_embeddings(clip: CLIPVisionConfig, params, pixels):
  """[B, K, S, S, 3] CLIP pixels -> [B, K, E]: visual_projection(pooled) (or the pooled output
  of an encoder without a projection)."""
  b, k = pixels.shape[:2]
  out = CLIPVisionModel(clip).apply({"params": params}, pixels.reshape((b * k,) + pixels.shape[2:]))
  embeds = out.image_embeds if out.image_embeds is not None else out.pooler_output
  return embeds.reshape(b, k, -1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FastComposerConditioning:
  """FastComposer's conditioning (diffusion/conditioning.py): the prompt's text-encoder output
  with each marked noun fused with its subject's image embedding; not latent-dependent. Sampling
  delays it: the plain prompt before step `start_merge_step` (an input, traced)."""
  clip: CLIPVisionConfig
  marker_id: int
  pad_id: int
  max_subjects: int
  start_merge_step: int
  train_image_encoder: bool
  input_keys: tuple[str, ...] = (SUBJECT_PIXELS,)
  cacheable = False

  def prepare(self, models, params, inputs):
    """{"plain": [B, L, D] the prompt without markers, "fused": [B, L, D]; when sampling the
    "negative" context and the "start" step (default the config's)}."""
    negative = negative_context(models, params, inputs)
    ids, index, valid = split_markers(inputs[IDS], self.marker_id, self.pad_id, self.max_subjects)
    plain = models.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    embeds = image_embeddings(self.clip, params["image_encoder"], inputs[SUBJECT_PIXELS])
    if not self.train_image_encoder:
      embeds = jax.lax.stop_gradient(embeds)
    fused = fuse_text(params[FASTCOMPOSER]["fuse"], plain, embeds, index, valid)
    start = None
    if NEGATIVE_IDS in inputs:
      start = jnp.asarray(inputs.get(START, self.start_merge_step), jnp.int32)
      start = start.reshape(-1)[0] if start.ndim else start
    return {"plain": plain, "fused": fused, "negative": negative, "start": start}

  def at(self, models, params, state, noisy, t, step):
    fused = {"encoder_hidden_states": state["fused"]}
    if step is None:                    # training: always the fused prompt
      return fused, {}
    return delayed(step, state["start"], {"encoder_hidden_states": state["plain"]}, fused), {}

  def negative(self, models, params, state):
    return {"encoder_hidden_states": state["negative"]}


# ---------------------------------------------------------------------------------------------
# The localization loss.


def cross_attention_blocks(config: UNetConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """The UNet's blocks holding cross-attention in forward order, diffusers-named (down_blocks_1,
  mid_block, up_blocks_2, ...), each with its block names (IN04, ...) for `attention_maps`."""
  down = config.layers_per_block_list
  out = []
  for i, kind in enumerate(config.down_block_types):
    if kind.startswith("CrossAttn"):
      out.append((f"down_blocks_{i}", tuple(block_names.unet_block(
          f"down_blocks_{i}/attentions_{j}/", config) for j in range(down[i]))))
  if config.mid_block_type is not None:
    out.append(("mid_block", (block_names.MID,)))
  up = tuple(n + 1 for n in reversed(down))
  for i, kind in enumerate(config.up_block_types):
    if kind.startswith("CrossAttn"):
      out.append((f"up_blocks_{i}", tuple(block_names.unet_block(
          f"up_blocks_{i}/attentions_{j}/", config) for j in range(up[i]))))
  return tuple(out)


def localization_blocks(config: UNetConfig, layers: int = 5) -> tuple[str, ...]:
  """The middle min(layers, n) of the n cross-attention blocks (the reference's
  `UNET_LAYER_NAMES[(n - k) // 2:][:k]`; SD 1.5: down_blocks_1, down_blocks_2, mid_block,
  up_blocks_1, up_blocks_2), diffusers-named."""
  blocks = [name for name, _ in cross_attention_blocks(config)]
  k = min(layers, len(blocks))
  start = (len(blocks) - k) // 2
  return tuple(blocks[start: start + k])


def localization_map_names(config: UNetConfig, layers: int = 5) -> tuple[str, ...]:
  """The `attention_maps` option (block names) of `localization_blocks`."""
  chosen = set(localization_blocks(config, layers))
  return tuple(n for name, names in cross_attention_blocks(config) if name in chosen for n in names)


def resize_masks(masks, hw: tuple[int, int]):
  """[B, K, H, W] -> [B, K, h, w] (bilinear, antialiased; unchanged at the same size)."""
  if tuple(masks.shape[2:]) == tuple(hw):
    return masks
  return jax.image.resize(masks, masks.shape[:2] + tuple(hw), "linear", antialias=True)


def localization_loss(maps: dict, masks, index, valid, eps: float = 1e-5):
  """FastComposer's balanced L1 localization loss.

  Args:
    maps: {attn2 path: [B, h, w, L]} cross-attention probabilities (head mean: the loss is linear
      in the map, so it equals the reference's per-head mean).
    masks: [B, K, H, W] subject masks in [0, 1]; index, valid: [B, K] subject token positions.
  Returns:
    mean over layers of mean over b of [sum_k valid_k (bg_k - fg_k) / (sum_k valid_k + eps)],
    bg_k = sum(A_k (1 - m_k)) / (sum(1 - m_k) + eps), fg_k = sum(A_k m_k) / (sum(m_k) + eps).
  """
  losses = []
  for a in maps.values():
    b, h, w, length = a.shape
    m = resize_masks(masks.astype(jnp.float32), (h, w)).reshape(b, -1, h * w)   # [B, K, hw]
    probs = jnp.take_along_axis(a.reshape(b, h * w, length), index[:, None, :], axis=2)
    probs = jnp.swapaxes(probs, 1, 2).astype(jnp.float32)                       # [B, K, hw]
    bg = jnp.sum(probs * (1 - m), -1) / (jnp.sum(1 - m, -1) + eps)
    fg = jnp.sum(probs * m, -1) / (jnp.sum(m, -1) + eps)
    per = jnp.sum((bg - fg) * valid, -1) / (jnp.sum(valid, -1) + eps)           # [B]
    losses.append(per.mean())
  return sum(losses) / len(losses)


def masked_loss_weights(batch, rng, *, prob: float):
  """The denoising loss's weights [B, h, w, 1]: with probability `prob`, one draw for the whole
  batch, the subjects' union mask of every example (zeros for an example without kept subjects,
  as the reference's), else ones."""
  union = batch[SUBJECT_UNION].astype(jnp.float32)
  return jnp.where(jax.random.uniform(rng) < prob, union, jnp.ones_like(union))


def localization_term(params, trainable, batch, aux, *, marker_id: int, pad_id: int,
                      max_subjects: int, weight: float):
  """A loss term: {"localization_loss": weight * L_loc} on the maps of the UNet's forward."""
  _, index, valid = split_markers(batch[IDS], marker_id, pad_id, max_subjects)
  return {"localization_loss": weight * localization_loss(aux["maps"], batch[SUBJECT_MASKS], index,
                                                          valid)}


# ---------------------------------------------------------------------------------------------
# Building the method.


@dataclasses.dataclass
class Parts:
  conditioning: FastComposerConditioning
  encoder: MethodImageEncoder
  text_dim: int
  image_dim: int


def build_parts(config: FastComposerConfig, base_params, tokenizer_dir) -> Parts:
  from persona_jax.tokenizer import load_tokenizer, tokenize
  if config.variant not in VARIANTS:
    raise ConfigError(f"method.variant: '{config.variant}' is not one of {', '.join(VARIANTS)}")
  for name in ("localization_weight", "mask_loss_prob", "uncondition_prob", "object_appear_prob",
               "start_merge_step", "image_encoder_trainable_layers"):
    if getattr(config, name) < 0:
      raise ConfigError(f"method.{name} must be >= 0, got {getattr(config, name)}")
  if config.max_subjects < 1 or config.localization_layers < 1 or config.lora_rank < 1:
    raise ConfigError("method.max_subjects, method.localization_layers and method.lora_rank "
                      "must be >= 1")
  encoder = load_method_image_encoder(config.image_encoder, tokenizer_dir)
  clip_config = encoder.config
  if config.image_encoder_trainable_layers > clip_config.num_hidden_layers:
    raise ConfigError(f"method.image_encoder_trainable_layers: {config.image_encoder_trainable_layers}"
                      f" > the image encoder's {clip_config.num_hidden_layers} layers")
  table = base_params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]     # [V, D]
  empty = tokenize(load_tokenizer(tokenizer_dir), [""])[0]
  pad_id = int(empty[-1])
  conditioning = FastComposerConditioning(
      clip_config, int(table.shape[0]), pad_id, config.max_subjects, config.start_merge_step,
      config.variant == "full" and config.image_encoder_trainable_layers > 0)
  image_dim = clip_config.projection_dim if clip_config.with_projection else clip_config.hidden_size
  return Parts(conditioning, encoder, int(table.shape[1]), int(image_dim))


def select_rules(config: FastComposerConfig, clip: CLIPVisionConfig) -> tuple:
  """Existing leaves that train: full: the UNet and the image encoder's last N layers."""
  if config.variant != "full":
    return ()
  rules = [(r"unet/.*", True)]
  n = config.image_encoder_trainable_layers
  if n:
    last = "|".join(str(i) for i in range(clip.num_hidden_layers - n, clip.num_hidden_layers))
    rules.append((rf"image_encoder/vision_model/encoder/layers_({last})/.*", True))
  return tuple(rules)


def make(config: FastComposerConfig, base_params, tokenizer_dir=None,
         unet_config: UNetConfig | None = None) -> Method:
  """The FastComposer method (either variant) for a base model."""
  from persona_jax.methods import lora
  if unet_config is None:
    raise ConfigError("FastComposer needs the UNet's config (its localization blocks)")
  parts = build_parts(config, base_params, tokenizer_dir)
  cond = parts.conditioning
  clip_params = {"image_encoder": parts.encoder.params}

  def init_fuse_mlp(rng, base):
    return {FASTCOMPOSER: {"fuse": init_fuse(rng, parts.text_dim, parts.image_dim)}}
  fuse = ParamSpec(select=select_rules(config, cond.clip), init=init_fuse_mlp)
  if config.variant == "light":   # the fuse MLP and LoRA factors on the UNet's linears
    second = lora.param_spec(lora.targets(lora.LoRAConfig(rank=config.lora_rank, targets=("kohya",)),
                                          base_params, unet_config))
  else:                           # the fuse MLP; the UNet and image-encoder layers it selects
    second = ParamSpec()
  losses, addons = (), ()
  if config.localization_weight > 0:
    losses = (functools.partial(localization_term, marker_id=cond.marker_id, pad_id=cond.pad_id,
                                max_subjects=cond.max_subjects, weight=config.localization_weight),)
    addons = (AttentionMaps(localization_map_names(unet_config, config.localization_layers)),)
  return Method(name=FASTCOMPOSER, params=compose(fuse, second), conditioning=cond,
                tokens=TokenSpec((IMAGE_TOKEN,)), unet=addons, losses=losses,
                loss_weights=(functools.partial(masked_loss_weights, prob=config.mask_loss_prob)
                              if config.mask_loss_prob > 0 else None),
                components=lambda: clip_params,
                save=functools.partial(save, parts.encoder.folder))


# ---------------------------------------------------------------------------------------------
# Data, result file and sampling.


def folder_source(request):
  """The `fastcomposer` data source: data.instance_dir, a folder of images with captions that
  mark each subject (`<|image|>`) and one mask per subject (data/fastcomposer.py)."""
  from persona_jax.data.fastcomposer import read_folder
  d = request.config.data
  if not d.instance_dir:
    raise ConfigError("data.instance_dir: the fastcomposer data source reads a folder (captions "
                      "with <|image|> markers and subject masks, data/fastcomposer.py)")
  return examples_source(request, read_folder(d.instance_dir, d.resolution))


def run_options(request) -> FastComposerConfig:
  """The run's FastComposer options (its data sources are for this method only)."""
  config = request.config
  if config.method_name != FASTCOMPOSER:
    raise ConfigError(f"data.source: FastComposer's data (captions with subject markers) is for "
                      f"method fastcomposer, not {config.method_name}")
  return FastComposerConfig(**config.method_options)


def examples_source(request, examples):
  """A FastComposer run's DataBuild over `examples` (data/fastcomposer.py's Example list)."""
  from persona_jax.data import fastcomposer as fc_data
  from persona_jax.data.clip_images import load_image_processor
  config, options = request.config, run_options(request)
  folder = image_encoder_dir(options.image_encoder, request.pipe.tokenizer_dir)
  processor = load_image_processor(folder, request.method.conditioning.clip.image_size)
  dataset = fc_data.make_dataset(examples, request.tokenizer, processor, config.data,
                                 config.batch_size, config.seed, request.pipe.vae_scale_factor,
                                 max_subjects=options.max_subjects,
                                 uncondition_prob=options.uncondition_prob,
                                 object_appear_prob=options.object_appear_prob)
  return DataBuild(dataset, None, frozenset({"unet", "vae", "text_encoder", "image_encoder"}))


def save(image_encoder: Path, trainable, context):
  """WORKDIR/fastcomposer.safetensors: the trained leaves by path; metadata for sampling."""
  return result_file.write(context.workdir, RESULT_FILE, trainable, result_file.run_metadata(
      context, FORMAT, image_encoder=str(image_encoder.absolute())))


def load_result(path) -> result_file.Result:
  """Reads WORKDIR/fastcomposer.safetensors (or the file itself); `.config` is the run's
  FastComposerConfig."""
  return result_file.read(path, RESULT_FILE, FORMAT, "FastComposer", "a fastcomposer run",
                          FastComposerConfig)


def prompt_markers(images: int):
  """The prompt rewrite of a sampling with `images` subject images: each prompt must hold one
  `<|image|>` marker per image; without images the markers are removed (the plain text path)."""
  def expand(prompt: str) -> str:
    if not images:
      return " ".join(prompt.replace(IMAGE_TOKEN, " ").split())
    if prompt.count(IMAGE_TOKEN) != images:
      raise ConfigError(f"--prompt '{prompt}' has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} "
                        f"marker(s) for {images} --image(s); put one marker right after each "
                        "subject's noun, in the order of the images")
    return prompt
  return expand


def sample(request):
  """The subject images (in marker order; each the subject segmented or cropped, padded to a
  square with black as the reference does) fused at the marked nouns, after `start_merge_step`
  plain-prompt steps (a traced knob; default the run's). Without images: the plain text path
  (markers removed), the trained UNet untouched by any subject."""
  from persona_jax.data import fastcomposer as fc_data
  from persona_jax.data.clip_images import load_image_processor
  from persona_jax.text_to_image import Sampling
  from persona_jax.tokenizer import tokenizer_with_tokens
  result, pipe, images = request.result, request.pipe, request.images
  config = result.config
  made = make(config, pipe.params, pipe.tokenizer_dir, pipe.unet_config)
  cond = made.conditioning
  flat = tree.flatten({**request.params, **made.components()})
  result_file.check_fits(result.path, result.meta.get("base_model"), flat,
                         {p: v for p, v in result.weights.items()
                          if p.startswith(("unet/", "image_encoder/"))})
  trainable = tree.unflatten({p: jnp.asarray(v) for p, v in result.weights.items()})
  frozen = tree.unflatten({p: v for p, v in flat.items() if p not in result.weights})
  params = made.params.apply(frozen, trainable)
  tokenizer = tokenizer_with_tokens(pipe.tokenizer_dir, (IMAGE_TOKEN,))
  expand = prompt_markers(len(images))
  if not images:             # the plain text path: the pipeline's components, the text sampler
    return Sampling({k: params[k] for k in ("unet", "text_encoder", "vae")}, tokenizer, None,
                    expand)
  if len(images) > config.max_subjects:
    raise ConfigError(f"--image: {len(images)} subject images, this model takes at most "
                      f"{config.max_subjects}")
  processor = load_image_processor(image_encoder_dir(config.image_encoder, pipe.tokenizer_dir),
                                   cond.clip.image_size)
  pixels = np.zeros((1, config.max_subjects) + (cond.clip.image_size,) * 2 + (3,), np.float32)
  for k, image_path in enumerate(images):
    pixels[0, k] = fc_data.subject_pixels_from_file(image_path, processor)
  start = int(request.inputs.get(START, config.start_merge_step))
  if start < 0:
    raise ConfigError(f"--start-merge-step must be >= 0, got {start}")
  return Sampling(params, tokenizer, cond, expand,
                  {SUBJECT_PIXELS: pixels, START: np.asarray([start], np.int32)})


TOY_SOURCE = "persona_jax.world.fastcomposer_data:toy_source"     # fastcomposer:tiny's data


def upgrade(method: dict, config: dict) -> None:
  """Run configs from before the data-source registry: a folder, or the toy world's scenes."""
  data = config.setdefault("data", {})
  data.setdefault("source", "fastcomposer" if data.get("instance_dir") else TOY_SOURCE)


SPEC = MethodSpec(
    name=FASTCOMPOSER, config=FastComposerConfig, make=make, result=ResultSpec(RESULT_FILE, FORMAT),
    load=load_result, sample=sample,
    sampling=SamplingSpec(
        images="any", flag="--fastcomposer",
        flag_help="a fastcomposer run's workdir: mark each subject's noun with <|image|> and give "
                  "one --image per marker, in order, e.g. --prompt 'a ball <|image|> next to a box "
                  "<|image|> on grass' --image ball.png --image box.png; without --image the "
                  "prompt is sampled as plain text (markers removed)",
        knobs=(Knob(START, "fastcomposer: the steps before it use the plain prompt (default: the "
                    "run's)", int),)),
    eval={"fastcomposer": EvalRecipe("tuning_free", f"{{cls}} {IMAGE_TOKEN}", class_prompts="run",
                                     subject_images="segmented")},
    data_sources={"fastcomposer": folder_source}, upgrade=upgrade)
