"""PhotoMaker v1/v2 (Li et al. 2024; TencentARC/PhotoMaker) on an SDXL base: sampling with the
official files, and training both.

  persona-jax sample --model SDXL_DIR --photomaker photomaker-v2.bin --allow-pickle \\
      --image A.png [--image B.png ...] --prompt "a photo of a man img, in the snow" \\
      [--face-analysis PACK_DIR | --face-embedding FILE.npy] [--start-merge-step 10]
  persona-jax verify SDXL_DIR --photomaker FILE [--image A.png ...]

What the official `PhotoMakerStableDiffusionXLPipeline` does, and we do:
* the file: `id_encoder.*` (models/photomaker.py, read strictly with sizes from the weights by
  convert/photomaker_files.py) and `lora_weights.*`, the UNet LoRA in diffusers' older
  attention-processor names, merged into the UNet at `lora_scale` (1: the official `fuse_lora`)
  by our LoRA reader; `photomaker-v1.bin` / `-v2.bin` are pickles, read only with --allow-pickle;
  a .safetensors with the same flattened keys needs nothing;
* the trigger word (`img`, `--trigger-word`) added as one special token to both tokenizers; the
  prompt holds it exactly once, right after the class word ("a man img");
* the ID images through CLIP's image processor at the tower's size (224, CLIPImageProcessor's
  defaults); the prompt expanded, the ID encoder fusing them into the class positions once per
  sampling call, and the text-only prompt for steps i <= start_merge_step
  (methods/photomaker_conditioning.py);
* v2's face embeddings: `--face-embedding FILE.npy` ([N, 512], or [512] for every image) or
  `--face-analysis PACK_DIR` (face/analysis.py on an insightface pack such as buffalo_l: the
  first detected face, retrying at smaller detection sizes, raw embedding, as the official
  scripts' `analyze_faces`).
Where we differ, deliberately: an ID image without a face is left out (with a warning naming it)
together with its embedding, where the official script keeps the image but not the embedding and
then fails on the mismatch (none with a face: an error, as there); a trigger word that follows
no class word (right after the start token) is an error, where the official code would repeat
the start token; a trigger word in the negative prompt is removed.

Training v1 (the authors released no training code; the paper's recipe, ours in the details):
  persona-jax train --config photomaker:tiny --workdir runs/pm
  persona-jax sample --run runs/pm --image A.png --image B.png --prompt "a photo of a ball img"
* trainable: the ID encoder's `visual_projection_2` and `fuse_module` (fresh, flax's default
  initializers; `fuse_dim` the base's context width, text_encoder + text_encoder_2) and a UNet
  LoRA on every attention's to_q/to_k/to_v/to_out.0 (`rank`, default 64; alpha = rank); frozen:
  the CLIP tower and its `visual_projection` (`image_encoder`, a CLIPVisionModelWithProjection
  folder, default MODEL/image_encoder), both text encoders (read in the step: the fused prompt
  depends on trainable leaves), the UNet and the VAE. The paper trains the fuse MLP and the
  projection it adds beside CLIP's own (which keeps the pretrained image embedding CLIP learned;
  the new one widens the token to the prompt's width), and the UNet by LoRA;
* data (data/photomaker.py, `data.source = "photomaker"`): identity folders; each example a target
  image conditioned on 1 .. `num_references` OTHER images of the same person, its caption with the
  class word followed by the trigger word; the class word repeated once per ID image;
* result: WORKDIR/photomaker.safetensors in the official flattened layout (`id_encoder.*`, tower
  included, and `lora_weights.*` in the older attention-processor names, the LoRA scale folded
  in), which `sample --photomaker` reads, as does the official `load_photomaker_adapter` (tested:
  `verify --photomaker` on a result loads it strictly into the torch re-creation of the official
  ID encoder and diffusers' `load_lora_weights`, and matches it); `persona-jax export WORKDIR
  --format official` adds photomaker-VERSION.bin, the released files' pickled layout.
Training v2 (`method.version=v2`): the same, with the ID images' face embeddings (data/photomaker.py:
each image's first detected face, raw embedding, as the official v2 pipeline embeds ID images;
`method.face_analysis` an insightface pack folder or "toy"; the toy world's data source embeds its
faces with the toy identity encoder on true keypoints). Trainable: `qformer_perceiver` (fresh;
the official sizes: 2 tokens per image, token_proj 4 x 512, 4 layers of 128-wide heads) and
`fuse_module`, with the UNet LoRA; the tower and CLIP's projection frozen, and
`visual_projection_2`, which the official v2 class owns but never reads, written as zeros so the
file loads strictly. Each ID image gives 2 tokens: the class word is repeated 2n times.
`method.pretrained` (an official-layout file of `method.version`, e.g. a run's result or
photomaker-v1.bin / -v2.bin with `allow_pickle`) starts from its tower (frozen), heads and LoRA
(its rank).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np

from persona_jax.convert import photomaker_files as pmf
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec, TokenSpec, compose
from persona_jax.methods.photomaker_conditioning import (ID_EMBEDS, ID_PIXELS, PHOTOMAKER, START,
                                                         START_MERGE_STEP, PhotoMakerConditioning)
from persona_jax.methods.photomaker_inputs import (TRIGGER_WORD, check_base, check_prompt,
                                                   face_embeddings, id_pixels, trigger_tokenizers)
from persona_jax.methods.photomaker_verify import verify_file
from persona_jax.methods.spec import (DataBuild, EvalRecipe, Knob, MethodSpec, ResultSpec,
                                      SamplingSpec, VerifySpec)
from persona_jax.models.photomaker import V1, V2, PhotoMakerConfig, init_params
log = logging.getLogger(__name__)

FILE_HELP = ("photomaker-v1.bin / photomaker-v2.bin (pickles: with --allow-pickle) or a "
             ".safetensors with the same id_encoder.* and lora_weights.* keys")


RESULT_FILE = "photomaker.safetensors"
FORMAT = "persona_jax-photomaker"


@dataclasses.dataclass(frozen=True)
class PhotoMakerOptions:
  """Training options (module docstring)."""
  version: str = V1                  # "v1" | "v2" (face embeddings through the QFormerPerceiver)
  image_encoder: str = ""            # a CLIPVisionModelWithProjection folder; "": MODEL/image_encoder
  num_references: int = 4            # ID images per example: 1 .. this many (random)
  rank: int = 64                     # the UNet LoRA's rank (alpha = rank unless `alpha`)
  alpha: float = 0.0
  trigger_word: str = TRIGGER_WORD
  pretrained: str = ""               # an official-layout file of `version` to start from (its
                                     # tower frozen, its heads and LoRA trained on)
  allow_pickle: bool = False         # read `pretrained` as a pickled .bin (trusted files only)
  face_analysis: str = ""            # v2, folder data: an insightface pack folder (buffalo_l) or
                                     # "toy" (the toy world's), embedding every image's face


def trigger_tokens(tokenizer_dir, word: str):
  """(trigger id, (pad id, pad id 2)) of SDXL's two tokenizers with `word` added (the same id in
  both; as the loop adds the method's tokens)."""
  from persona_jax.methods.ip_adapter import second_tokenizer_dir
  from persona_jax.tokenizer import load_tokenizer, tokenizers_with_tokens
  if not word or len(word.split()) != 1:
    raise ConfigError(f"method.trigger_word {word!r}: one word without spaces")
  folders = (tokenizer_dir, second_tokenizer_dir(tokenizer_dir))
  for folder in folders:
    if word in load_tokenizer(folder).get_vocab():
      raise ConfigError(f"method.trigger_word {word!r} is already a token of {folder}; use a word "
                        f"that is not (the official one: {TRIGGER_WORD})")
  tok, tok_2 = tokenizers_with_tokens(folders, (word,))
  return tok.convert_tokens_to_ids(word), (tok.pad_token_id, tok_2.pad_token_id)


def id_encoder_config(clip, fuse_dim: int, version: str = V1, id_dim: int = 512) -> PhotoMakerConfig:
  """The ID encoder on image encoder `clip` for prompt embeddings `fuse_dim` wide: the
  visual_projection_2 widens CLIP's projection to fuse_dim; the fuse MLPs are fuse_dim wide; v2's
  QFormerPerceiver as the official one (`num_tokens` 2, token_proj 4 x the `id_dim`-wide face
  embedding, 4 layers of 128-wide heads; on a base whose width 128 does not divide, the widest
  head that does, recorded in the file)."""
  if not clip.with_projection:
    raise ConfigError("method.image_encoder: PhotoMaker reads CLIP's projected image embedding; "
                      "this encoder has no visual_projection (a CLIPVisionModelWithProjection)")
  if (clip.hidden_act, clip.layer_norm_eps) != ("quick_gelu", 1e-5):
    raise ConfigError(f"method.image_encoder: {clip.hidden_act} / eps {clip.layer_norm_eps}; a "
                      "PhotoMaker file records no activation and is read as CLIP ViT-L's "
                      "(quick_gelu, 1e-5): use such an encoder")
  width = fuse_dim - clip.projection_dim
  if width <= 0:
    raise ConfigError(f"method.image_encoder: its projection ({clip.projection_dim}) must be "
                      f"narrower than the prompt embeddings ({fuse_dim})")
  v1 = PhotoMakerConfig(V1, vision=clip, projection_2_dim=width, fuse_dim=fuse_dim,
                        mlp1_hidden_dim=fuse_dim, mlp2_hidden_dim=fuse_dim)
  if version == V1:
    return v1
  head_dim = pmf.PERCEIVER_HEAD_DIM
  if fuse_dim % head_dim:                  # a small base: the widest head that divides it
    head_dim = math.gcd(fuse_dim, head_dim)
  return dataclasses.replace(v1, version=V2, id_embeddings_dim=id_dim,
                             token_proj_hidden_dim=4 * id_dim, perceiver_heads=fuse_dim // head_dim,
                             perceiver_head_dim=head_dim)


def make(config: PhotoMakerOptions, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """PhotoMaker v1 training on an SDXL base: the ID encoder's heads and a UNet LoRA."""
  from persona_jax.image_encoder import load_method_image_encoder
  from persona_jax.methods import lora
  if "text_encoder_2" not in base_params:
    raise ConfigError("method photomaker trains on SDXL bases (two text encoders); this model is "
                      "SD 1.x/2.x: pass an SDXL --config.model (e.g. toy-xl)")
  if config.version not in (V1, V2):
    raise ConfigError(f"method.version: '{config.version}': one of {V1}, {V2}")
  if config.num_references < 1:
    raise ConfigError(f"method.num_references must be >= 1, got {config.num_references}")
  width = unet_config.cross_attention_dim
  if config.pretrained:
    pm_config, id_params, lora_factors = read_pretrained(config, base_params, width)
  else:
    encoder = load_method_image_encoder(config.image_encoder, tokenizer_dir)
    pm_config = id_encoder_config(encoder.config, width, config.version)
    id_params, lora_factors = None, None
  trigger_id, pad_ids = trigger_tokens(tokenizer_dir, config.trigger_word)
  cond = PhotoMakerConditioning(pm_config, trigger_id, pad_ids, config.num_references)
  rank = config.rank
  if lora_factors:
    rank = int(next(iter(lora_factors.values())).a.shape[1])
  lora_options = lora.LoRAConfig(rank=rank, alpha=0.0 if lora_factors else config.alpha,
                                 targets=("attn",))
  factors = lora.make(lora_options, base_params, tokenizer_dir, unet_config)
  chosen = lora.targets(lora_options, base_params, unet_config)
  trained = trained_heads(pm_config.version)
  if id_params is not None:
    tower = {k: v for k, v in id_params.items() if k not in trained}
  else:
    tower = {k: encoder.params[k] for k in ("vision_model", "visual_projection")}
    if pm_config.version == V2:          # in the official layout, read by nothing in v2
      tower["visual_projection_2"] = {"kernel": np.zeros((pm_config.vision.hidden_size,
                                                          pm_config.projection_2_dim), np.float32)}
  tower = {PHOTOMAKER: tower}

  def init(rng, base):
    heads = id_params if id_params is not None else init_params(rng, pm_config)
    return {PHOTOMAKER: {k: heads[k] for k in trained}}
  lora_params = factors.params
  if lora_factors is not None:
    loaded = pretrained_lora(lora_factors, chosen, config.pretrained)
    lora_params = dataclasses.replace(lora_params, init=lambda rng, base: loaded)
  return Method(name=PHOTOMAKER, params=compose(ParamSpec(init=init), lora_params),
                conditioning=cond, tokens=TokenSpec(added=(config.trigger_word,)),
                components=lambda: tower, save=functools.partial(save, pm_config, chosen))


def read_pretrained(config: PhotoMakerOptions, base_params, width: int):
  """(PhotoMakerConfig, ID-encoder params, the LoRA factors by base kernel) of
  `method.pretrained`, an official-layout file of `method.version` for this base."""
  from persona_jax.convert.lora_formats import read_lora_file
  path = load(config.pretrained).path
  pm_config, id_params, lora_tensors = read_file(path, config.allow_pickle)
  if pm_config.version != config.version:
    raise ConfigError(f"method.pretrained: {path} is a PhotoMaker {pm_config.version} file; set "
                      f"method.version={pm_config.version} (now {config.version})")
  if pm_config.fuse_dim != width:
    raise ModelFileError(f"{path}: the ID encoder fuses {pm_config.fuse_dim}-wide prompt "
                         f"embeddings; this SDXL base's are {width} wide (a file for another base?)")
  factors = read_lora_file(path, base_params, tensors=lora_tensors) if lora_tensors else {}
  return pm_config, id_params, factors


def pretrained_lora(factors, chosen, source) -> dict:
  """The LoRA tree (`lora/<target>/{a, b}`, alpha = rank) of a file's factors: one per chosen
  target, of one rank, the file's scale folded into b."""
  from persona_jax import tree
  missing = [t.kernel for t in chosen if t.kernel not in factors]
  if missing or len(factors) != len(chosen):
    raise ModelFileError(f"{source}: its lora_weights cover {len(factors)} layers, not the "
                         f"{len(chosen)} attention projections of this UNet"
                         + (f" (missing {missing[0]})" if missing else ""))
  out = {}
  for t in chosen:
    f = factors[t.kernel]
    if f.a.shape[1] != t.rank:
      raise ModelFileError(f"{source}: its LoRA ranks differ ({f.a.shape[1]} and {t.rank}); "
                           "PhotoMaker training takes one rank")
    out[f"{t.key}/a"] = np.asarray(f.a, np.float32)
    out[f"{t.key}/b"] = np.asarray(f.b, np.float32) * np.float32(f.scale / t.scale)
  return tree.unflatten(out)


def trained_heads(version: str) -> tuple[str, ...]:
  """The ID encoder's trained parts: v1 the projection beside CLIP's and the fuse module; v2 the
  QFormerPerceiver and the fuse module (its visual_projection_2 reaches no output)."""
  return ("visual_projection_2", "fuse_module") if version == V1 else ("qformer_perceiver",
                                                                       "fuse_module")


def run_options(request) -> PhotoMakerOptions:
  """The run's PhotoMaker options (its data sources are for this method only)."""
  config = request.config
  if config.method_name != PHOTOMAKER:
    raise ConfigError(f"data.source: PhotoMaker's identity data is for method photomaker, not "
                      f"{config.method_name}")
  return PhotoMakerOptions(**config.method_options)


def examples_source(request, people):
  """A PhotoMaker run's DataBuild over `people` (data/photomaker.py's Person list)."""
  from persona_jax.data import photomaker as pm_data
  from persona_jax.data.clip_images import CLIPImageProcessorConfig, load_image_processor
  from persona_jax.image_encoder import image_encoder_dir
  from persona_jax.tokenizer import tokenize_prompts
  config, options = request.config, run_options(request)
  cond = request.method.conditioning
  size = cond.config.vision.image_size
  if options.pretrained:             # as sampling preprocesses a file's ID images
    processor = CLIPImageProcessorConfig.for_image_size(size)
  else:
    processor = load_image_processor(
        image_encoder_dir(options.image_encoder, request.pipe.tokenizer_dir), size)
  tokenize = functools.partial(tokenize_prompts, request.tokenizers)
  pm_data.check_captions(people, lambda c: tokenize(c)["ids_2"], cond.trigger_id,
                         options.trigger_word)
  if cond.config.version == V2 and people[0].embeddings is None:
    if not options.face_analysis:
      raise ConfigError("method.face_analysis: PhotoMaker v2 trains on each ID image's face "
                        "embedding; give an insightface pack folder (buffalo_l) or 'toy'")
    from persona_jax.face.analysis import load_face_analysis
    people = pm_data.embed_faces(people, load_face_analysis(options.face_analysis))
  dataset = pm_data.make_dataset(people, tokenize, processor, options.num_references,
                                 config.data.random_flip, config.batch_size, config.seed)
  return DataBuild(dataset, None, frozenset({"unet", "vae", "text_encoder", "text_encoder_2"}))


def folder_source(request):
  """The `photomaker` data source: data.instance_dir/<identity>/*.png (data/photomaker.py)."""
  from persona_jax.data.photomaker import read_folders
  d = request.config.data
  if not d.instance_dir:
    raise ConfigError("data.instance_dir: the photomaker data source reads a folder of identity "
                      "folders (data/photomaker.py)")
  return examples_source(request, read_folders(d.instance_dir, d.resolution, d.prompt))


def save(pm_config: PhotoMakerConfig, chosen, trainable, context):
  """WORKDIR/photomaker.safetensors in the official flattened layout (module docstring)."""
  import jax

  from persona_jax import tree
  from persona_jax.convert import lora_formats as lf
  from persona_jax.convert.files import write_safetensors
  params = context.full_params(trainable)
  flat = tree.flatten(trainable)
  factors = {t.kernel: lf.Factor(np.asarray(flat[f"{t.key}/a"]), np.asarray(flat[f"{t.key}/b"]),
                                 np.float32(t.scale)) for t in chosen if f"{t.key}/a" in flat}
  peft, _ = lf.peft_state_dict(factors, context.pipe.params)
  id_encoder = jax.tree.map(lambda x: np.asarray(x, np.float32), params[PHOTOMAKER])
  tensors = {**pmf.to_official(id_encoder), **pmf.lora_to_official(peft)}
  vision = pm_config.vision
  dims = {"vision_head_dim": str(vision.hidden_size // vision.num_attention_heads)}
  if pm_config.version == V2:
    dims["perceiver_head_dim"] = str(pm_config.perceiver_head_dim)
  meta = result_file.run_metadata(context, FORMAT, **dims)
  path = Path(context.workdir) / RESULT_FILE
  write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, meta)
  return [str(path)]


def export(request):
  """OUT/photomaker.safetensors (the run's result: the official flattened keys, which the
  official `load_photomaker_adapter` reads) and, when torch is installed, OUT/photomaker-VERSION.bin
  in the official pickled layout (the released files' form)."""
  import importlib.util

  from persona_jax.convert.files import copy_file
  source = request.result.path
  written = [copy_file(source, request.out / RESULT_FILE)]
  if importlib.util.find_spec("torch") is None:
    log.info("export: torch is not installed; writing the safetensors file only (the official "
             "loader reads it as it reads the .bin)")
    return written, {}
  state = pmf.read_official(source)                  # read once: its version and its tensors
  dims = pmf.recorded_head_dims(source)
  config, _ = pmf.id_encoder_params(state, str(source), **dims)
  official = {"vision_head_dim": pmf.CLIP_HEAD_DIM, "perceiver_head_dim": pmf.PERCEIVER_HEAD_DIM}
  odd = {k: v for k, v in dims.items() if v != official[k]}
  if odd:
    log.warning("export: %s records head widths %s; a .bin records none and is read with the "
                "official ones (%s): use the .safetensors", source, odd, official)
  written.append(pmf.write_official_bin(request.out / f"photomaker-{config.version}.bin", state))
  return written, {}


# ---------------------------------------------------------------------------------------------
# The file, the base, the tokenizers.


def load(path) -> result_file.Result:
  """A PhotoMaker file (read when sampling, which may need --allow-pickle): path and metadata."""
  path = Path(path)
  if path.is_dir():
    path = path / RESULT_FILE
  if not path.is_file():
    raise ModelFileError(f"{path}: no PhotoMaker file here; pass {FILE_HELP} (or a photomaker "
                         "run's WORKDIR once its training finished)")
  return result_file.Result(path, {}, result_file.metadata(path))


def read_file(path, allow_pickle: bool = False):
  """(PhotoMakerConfig, ID-encoder params, the lora_weights tensors) of a PhotoMaker file."""
  state = pmf.read_official(path, allow_pickle)
  config, params = pmf.id_encoder_params(state, str(path), **pmf.recorded_head_dims(path))
  return config, params, pmf.lora_state(state)


# ---------------------------------------------------------------------------------------------
# Sampling.


def sample(request):
  """The file's ID encoder and LoRA on the base (module docstring)."""
  from persona_jax.convert.lora_formats import read_lora_file
  from persona_jax.methods.lora_compose import apply_loras
  from persona_jax.models import block_names
  from persona_jax.text_to_image import Sampling
  pipe, path, inputs = request.pipe, request.result.path, request.inputs
  if not pipe.is_sdxl:                 # before reading the file: the base is the user's mistake
    check_base(pipe, None, path)
  if not request.images:
    raise ConfigError("--photomaker needs the person's photos: --image PATH (repeat for several)")
  config, id_params, lora = read_file(path, request.allow_pickle)
  check_base(pipe, config, path)
  start = int(inputs.get(START, START_MERGE_STEP))
  if start < 0:
    raise ConfigError(f"--start-merge-step must be >= 0, got {start}")
  images, embeds = face_embeddings(config, list(request.images), inputs.get("face_embedding"),
                                   inputs.get("face_analysis"))
  word = str(inputs.get("trigger_word", TRIGGER_WORD))
  tok, tok_2, trigger_id = trigger_tokenizers(pipe, word)
  params = request.params
  if lora:
    factors = read_lora_file(path, pipe.params, tensors=lora)
    blocks = len(block_names.all_blocks(pipe.unet_config))
    scale = float(inputs.get("lora_scale", 1.0))
    params = apply_loras(params, [factors], np.full((1, blocks), scale, np.float32),
                         pipe.unet_config)
  cond = PhotoMakerConditioning(config, trigger_id, (tok.pad_token_id, tok_2.pad_token_id),
                                len(images))
  feed = {ID_PIXELS: id_pixels(config, images), START: np.asarray([start], np.int32)}
  if embeds is not None:
    feed[ID_EMBEDS] = embeds[None]
  return Sampling({**params, PHOTOMAKER: id_params}, tok, cond, check_prompt(tok_2, trigger_id, word),
                  feed, tokenizer_2=tok_2)


SPEC = MethodSpec(
    name=PHOTOMAKER, config=PhotoMakerOptions, make=make,
    result=ResultSpec(RESULT_FILE, FORMAT), sdxl=True, load=load, sample=sample,
    eval={"photomaker": EvalRecipe("tuning_free", "{cls} img")},
    data_sources={"photomaker": folder_source}, exports={"official": export},
    sampling=SamplingSpec(
        images="some", flag="--photomaker",
        flag_help=f"a PhotoMaker v1/v2 file ({FILE_HELP}) on an SDXL --model: --image the "
                  "person's photos (repeat for several), the prompt names the class word followed "
                  "by the trigger word ('a photo of a man img ...'); v2 needs --face-analysis or "
                  "--face-embedding",
        knobs=(Knob(START, "photomaker: the last step with the prompt without the ID "
                    f"(default {START_MERGE_STEP})", int),
               Knob("face_analysis", "photomaker v2: an insightface model pack folder (buffalo_l: "
                    "det_10g.onnx, w600k_r50.onnx) to embed the faces of the --image photos", Path),
               Knob("face_embedding", "photomaker v2: a .npy of raw ArcFace embeddings, [N, 512] "
                    "(one per --image) or [512]", Path),
               Knob("trigger_word", f"photomaker: the trigger word (default {TRIGGER_WORD})", str),
               Knob("lora_scale", "photomaker: the weight of the file's UNet LoRA (default 1)"))),
    verify=VerifySpec("--photomaker", "FILE", "compare a PhotoMaker file (official layout) with a "
                      "torch re-creation of the official modules and diffusers' load_lora_weights "
                      "(--image: ID images; default random pixels)", verify_file, images=True))
