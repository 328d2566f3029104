"""BLIP-Diffusion training on a BLIP-Diffusion folder (docs/blip_diffusion_training.md: LAVIS's
code where it speaks, the paper for stage 2's data and dropout), both stages:

  persona-jax train --config blip_diffusion:tiny --workdir runs/bd            (stage 2)
  persona-jax train --config blip_diffusion:tiny_finetune --workdir runs/bd_ft \\
      --config.model=runs/bd/model                                             (fine-tuning)
  persona-jax sample --run runs/bd --image subject.png --subject-class ball --prompt "on grass"
  persona-jax sample --run runs/bd_ft --prompt "on grass"          (no --image: its embedding)

`method.stage = "pretrain"` (subject-representation pre-training, the paper's stage 2):
* trainable: the Q-Former (query tokens, word/position embeddings and their norm, every layer)
  without its vision tower but with the tower's final norm (`visual_encoder/post_layernorm`,
  LAVIS's `ln_vision`, outside its frozen ViT), the ProjLayer (the paper; the code cannot set
  `proj_train`) and the whole UNet (never frozen in LAVIS); `method.train_text_encoder` adds the
  context text encoder (the paper's joint training; LAVIS's configs: off). Frozen: the vision
  tower's embeddings, pre_layernorm and layers, the text encoder, the VAE. Left out although the
  recipe trains them: the LAST Q-Former layer's text feed-forward (`encoder/layer_{N-1}/
  intermediate/` and `output/`): only the query outputs are read, so they get no gradient by
  construction (AdamW's decay alone would move them).
* each example's subject dropped with p `method.subject_dropout` (0.15: the paper's, for
  classifier-free guidance; not in LAVIS, which releases no stage-2 code): the caption alone at
  the text encoder's full length, no query embeddings, as the pipeline encodes its negative half.
* captions "a {category} ..." with the query embeddings at ctx_begin_pos (data/blip_diffusion.py).
* result: WORKDIR/model/, a BLIP-Diffusion folder in the released layout (the base folder's files,
  the trained qformer/ and unet/ (+ text_encoder/) weights written over them): `sample --run
  WORKDIR` or `sample --model WORKDIR/model` samples it zero-shot, and it is a stage-2 base for
  fine-tuning.
`method.stage = "finetune"` (LAVIS's subject fine-tuning): each of the subject's images is input
and target, captioned "a {method.subject_class}"; trainable: the UNet and one subject embedding
[1, Q, D] (`blip_subject/embedding`), set before the first step (the data source's `initialize`,
LAVIS's `before_training`) to the mean over the subject's images of the frozen Q-Former +
ProjLayer; the conditioning then reads it instead of running the Q-Former. Result: WORKDIR/model/
(the base folder with the trained UNet) and WORKDIR/model/subject_embedding.safetensors
(`ctx_embeddings_cache`, with the subject class); `sample --run WORKDIR` needs no --image.
Data sources: `blip_diffusion` (data.instance_dir: the subject's images, fine-tuning) and the toy
world's (world/blip_diffusion_data.py: `toy_pretraining_source`, `toy_subject_source`).
Where we differ: no dropout in our networks; AdamW decays every trainable leaf (LAVIS: not biases
and norms); captions padded to L - Q as the pipeline pads prompts (LAVIS trains unpadded).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from persona_jax.data.batch import LATENT_LOGVAR, LATENT_MEAN, PIXELS
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.blip_diffusion_conditioning import (CAPTION_IDS, DROPPED, QFORMER,
                                                             SUBJECT)
from persona_jax.methods.spec import DataBuild

log = logging.getLogger(__name__)

PRETRAIN, FINETUNE = "pretrain", "finetune"
RESULT_DIR = "model"
EMBEDDING_FILE = "subject_embedding.safetensors"
EMBEDDING_KEY = "ctx_embeddings_cache"          # LAVIS's name for it
FORMAT = "persona_jax-blip_diffusion"


@dataclasses.dataclass(frozen=True)
class BlipDiffusionOptions:
  """Training options (module docstring)."""
  stage: str = PRETRAIN              # "pretrain" (stage 2) | "finetune" (one subject)
  subject_class: str = ""            # finetune: the subject's category ("dog", "teddy bear")
  subject_dropout: float = 0.15      # pretrain: p of an example without its subject (the paper's)
  train_text_encoder: bool = False   # pretrain: the context text encoder trains too (the paper)


def pretrain_rules(num_layers: int, train_text_encoder: bool = False) -> tuple:
  """Stage 2's trainable leaves (module docstring) as select rules, first match wins."""
  rules = ((f"{QFORMER}/encoder/layer_{num_layers - 1}/(intermediate|output)/.*", False),
           (f"{QFORMER}/visual_encoder/post_layernorm/.*", True),
           (f"{QFORMER}/visual_encoder/.*", False),
           (f"{QFORMER}/.*", True), ("unet/.*", True))
  return rules + ((("text_encoder/.*", True),) if train_text_encoder else ())


def check_options(config: BlipDiffusionOptions) -> None:
  if config.stage not in (PRETRAIN, FINETUNE):
    raise ConfigError(f"method.stage: '{config.stage}': one of {PRETRAIN} (stage-2 pre-training) "
                      f"or {FINETUNE} (one subject)")
  if not 0.0 <= config.subject_dropout < 1.0:
    raise ConfigError(f"method.subject_dropout {config.subject_dropout}: a probability in [0, 1)")
  if config.stage == FINETUNE and not config.subject_class.strip():
    raise ConfigError("method.subject_class: fine-tuning needs the subject's category (e.g. dog)")
  if config.stage == FINETUNE and config.train_text_encoder:
    raise ConfigError("method.train_text_encoder: fine-tuning trains the UNet and the subject "
                      "embedding only (LAVIS); set it False")


def make(config: BlipDiffusionOptions, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """BLIP-Diffusion training on a BLIP-Diffusion folder (module docstring)."""
  from persona_jax.methods.blip_diffusion_folder import read_conditioning
  check_options(config)
  if QFORMER not in base_params or tokenizer_dir is None:
    raise ConfigError("method.name: blip_diffusion trains on a BLIP-Diffusion folder "
                      "(model_index.json BlipDiffusionPipeline, with qformer/); pass it as "
                      "--config.model (the toy one: scripts/make_toy_blip_diffusion.py OUT)")
  cond = read_conditioning(Path(tokenizer_dir).parent)     # the folder's (tokenizer/ is in it)
  save = functools.partial(save_result, config)
  if config.stage == PRETRAIN:
    rules = pretrain_rules(cond.qformer.qformer_config.num_hidden_layers, config.train_text_encoder)
    return Method(name="blip_diffusion", params=ParamSpec(select=rules), conditioning=cond,
                  save=save)
  shape = (1, cond.qformer.num_query_tokens, cond.text_encoder.hidden_size)

  def init(rng, base):                 # a placeholder: the data source's `initialize` sets it
    return {SUBJECT: {"embedding": np.zeros(shape, np.float32)}}
  return Method(name="blip_diffusion",
                params=ParamSpec(select=(("unet/.*", True),), init=init),
                conditioning=dataclasses.replace(cond, subject_embedding=True), save=save)


# ---------------------------------------------------------------------------------------------
# Data.


def run_options(request) -> BlipDiffusionOptions:
  config = request.config
  if config.method_name != "blip_diffusion":
    raise ConfigError(f"data.source: BLIP-Diffusion's examples are for method blip_diffusion, not "
                      f"{config.method_name}")
  return BlipDiffusionOptions(**config.method_options)


def subject_query_embeddings(pipe, arrays: dict, batch: int = 16) -> np.ndarray:
  """[N, Q, D] the frozen Q-Former + ProjLayer on the examples' subject inputs."""
  import jax

  from persona_jax.methods.blip_diffusion_conditioning import BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK
  cond = pipe.conditioning()
  fn = jax.jit(cond.query_embeddings)
  n = len(arrays[BLIP_PIXELS])
  keys = (BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK)
  return np.concatenate([np.asarray(fn(pipe.params, {k: arrays[k][i:i + batch] for k in keys}))
                         for i in range(0, n, batch)])


def target_moments(pipe, pixels: np.ndarray, batch: int = 8) -> dict:
  """{latent_mean, latent_logvar} [N, h, w, c] of the targets [N, R, R, 3] in [-1, 1]: the frozen
  VAE runs once, not in every step (the step samples the latents from these moments)."""
  import jax
  encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode"))
  means, logvars = [], []
  for i in range(0, len(pixels), batch):
    chunk = pixels[i:i + batch]
    pad = batch - len(chunk)
    m = encode(pipe.params["vae"], np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]))
    means.append(np.asarray(m.mean, np.float32)[:len(chunk)])
    logvars.append(np.asarray(m.logvar, np.float32)[:len(chunk)])
  return {LATENT_MEAN: np.concatenate(means), LATENT_LOGVAR: np.concatenate(logvars)}


@dataclasses.dataclass
class Rows:
  """Index -> one example's arrays; with `dropout`, its subject dropped with that p (grain's
  `random_map` callable: no grain base class, so importing the method does not import grain)."""
  arrays: dict
  dropout: float

  def __call__(self, index, rng: np.random.Generator):
    out = {k: v[index] for k, v in self.arrays.items()}
    if self.dropout > 0:
      out[DROPPED] = np.float32(rng.random() < self.dropout)
    return out


def examples_source(request, examples) -> DataBuild:
  """A BLIP-Diffusion run's DataBuild over `examples` (data/blip_diffusion.py's SubjectExample):
  stage 2 with subject dropout, fine-tuning with the subject embedding set from them."""
  import grain

  from persona_jax.data.blip_diffusion import example_arrays
  from persona_jax.tokenizer import tokenize
  config, options, pipe = request.config, run_options(request), request.pipe
  if not examples:
    raise ConfigError("data: no BLIP-Diffusion examples (no images?)")
  processing = pipe.image_processing
  arrays = example_arrays(examples, clip_tokenizer=request.tokenizer,
                          qformer_tokenizer=pipe.qformer_tokenizer, mean=processing.image_mean,
                          std=processing.image_std, num_query_tokens=pipe.qformer_config.num_query_tokens)
  arrays.update(target_moments(pipe, arrays.pop(PIXELS)))
  needed = {"unet", "text_encoder"}
  dropout = 0.0
  initialize = None
  if options.stage == PRETRAIN:
    needed.add(QFORMER)
    dropout = options.subject_dropout
    if dropout > 0:
      arrays[CAPTION_IDS] = tokenize(request.tokenizer, [e.caption for e in examples])
  else:
    mean = subject_query_embeddings(pipe, arrays).mean(axis=0, keepdims=True)
    initialize = functools.partial(with_subject_embedding, mean.astype(np.float32))
  n = len(examples)
  batch = config.batch_size
  dataset = (grain.MapDataset.source(list(range(n))).seed(config.seed).shuffle().repeat()
             .random_map(Rows(arrays, dropout)).batch(batch, drop_remainder=True))
  return DataBuild(dataset, None, frozenset(needed), initialize=initialize)


def with_subject_embedding(embedding, trainable) -> dict:
  """`trainable` with its subject embedding set to `embedding` [1, Q, D]."""
  return {**trainable, SUBJECT: {"embedding": embedding}}


def subject_images(folder, resolution: int, blip_size: int) -> list[np.ndarray]:
  """The subject folder's images (jpg, png, webp, by name), each center-cropped square and resized
  (bicubic) to `resolution` (the target) and `blip_size` (the Q-Former's input), as LAVIS's
  processors do: [(target, subject)]."""
  from PIL import Image

  from persona_jax.data.images import load_image
  folder = Path(folder)
  if not folder.is_dir():
    raise ConfigError(f"data.instance_dir: {folder} is not a folder of the subject's images")
  paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
  if not paths:
    raise ConfigError(f"data.instance_dir: {folder} holds no .jpg/.png/.webp images")
  out = []
  for path in paths:
    image = Image.fromarray(load_image(path))
    side = min(image.size)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    image = image.crop((left, top, left + side, top + side))
    out.append((np.asarray(image.resize((resolution, resolution), Image.BICUBIC)),
                np.asarray(image.resize((blip_size, blip_size), Image.BICUBIC))))
  return out


def folder_source(request) -> DataBuild:
  """The `blip_diffusion` data source: fine-tuning on data.instance_dir (a subject's images),
  each image input and target, "a {method.subject_class}"."""
  from persona_jax.data.blip_diffusion import SubjectExample, training_caption
  options = run_options(request)
  if options.stage != FINETUNE:
    raise ConfigError("data.source: the blip_diffusion folder source is for method.stage="
                      f"{FINETUNE}; stage 2 takes a source of SubjectExamples (e.g. the toy "
                      "world's persona_jax.world.blip_diffusion_data:toy_pretraining_source)")
  d = request.config.data
  size = request.pipe.qformer_config.vision_config.image_size
  cls = options.subject_class.strip()
  examples = [SubjectExample(subject, target, cls, training_caption(cls))
              for target, subject in subject_images(d.instance_dir, d.resolution, size)]
  return examples_source(request, examples[:d.num_images] if d.num_images else examples)


# ---------------------------------------------------------------------------------------------
# The result.


def save_result(options: BlipDiffusionOptions, trainable, context):
  """WORKDIR/model/: the base folder with the trained weights written over its own (module
  docstring); fine-tuning adds subject_embedding.safetensors."""
  from persona_jax.convert import diffusers as convert
  from persona_jax.convert.blip_diffusion_weights import qformer_state_dict
  from persona_jax.convert.diffusers_folder import COMPONENTS
  from persona_jax.convert.files import write_safetensors
  params = context.full_params(trainable)
  trained = {p.split("/", 1)[0] for p in _paths(trainable)}
  base = Path(context.model_dir)
  out = Path(context.workdir) / RESULT_DIR
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    staged = tmp / "model"
    shutil.copytree(base, staged)
    for comp in COMPONENTS:
      if comp.name in trained:
        _clear_weights(staged / comp.name)
        state = convert.params_to_state_dict(params[comp.name], prefix=comp.save_prefix,
                                             unprefixed=("text_projection.",))
        write_safetensors(staged / comp.name / f"{comp.weights_stem}.safetensors", _f32(state))
    if QFORMER in trained:
      _clear_weights(staged / QFORMER)
      state = qformer_state_dict(params[QFORMER])
      rows = params[QFORMER]["embeddings"]["position_embeddings"]["embedding"].shape[0]
      state["embeddings.position_ids"] = np.arange(rows, dtype=np.int64)[None]  # torch's buffer
      write_safetensors(staged / QFORMER / "model.safetensors", _f32(state))
    if SUBJECT in trainable:
      meta = result_file.run_metadata(context, FORMAT, subject_class=options.subject_class.strip())
      embedding = np.asarray(trainable[SUBJECT]["embedding"], np.float32)
      write_safetensors(staged / EMBEDDING_FILE, {EMBEDDING_KEY: embedding}, meta)
    if out.exists():
      shutil.rmtree(out)
    staged.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info("wrote the trained BLIP-Diffusion folder to %s", out)
  return [str(out)]


def _paths(tree_):
  from persona_jax import tree
  return tree.flatten(tree_)


def _f32(state: dict) -> dict:
  return {k: (np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
          for k, v in state.items()}


def _clear_weights(folder: Path) -> None:
  """Removes a component's weight files (every variant), keeping its config."""
  for f in folder.iterdir():
    if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
      f.unlink()


def load(path) -> result_file.Result:
  """WORKDIR/model (or the folder itself): a trained BLIP-Diffusion folder; its subject
  embedding (fine-tuning) as the tensor `embedding` when it has one."""
  from persona_jax.convert.files import read_safetensors
  path = Path(path)
  folder = path / RESULT_DIR if (path / RESULT_DIR).is_dir() else path
  if not (folder / "model_index.json").is_file():
    raise ModelFileError(f"{path}: no {RESULT_DIR}/ here (the run has not finished: run the same "
                         "`train` command again to complete it)")
  embedding = folder / EMBEDDING_FILE
  if not embedding.is_file():
    return result_file.Result(folder, {}, {"base_model": str(folder)})
  tensors = read_safetensors(embedding)
  if EMBEDDING_KEY not in tensors:
    raise ModelFileError(f"{embedding}: no '{EMBEDDING_KEY}' tensor (not a fine-tuning result?)")
  meta = dict(result_file.metadata(embedding), base_model=str(folder))
  return result_file.Result(folder, {"embedding": np.asarray(tensors[EMBEDDING_KEY], np.float32)},
                            meta)
