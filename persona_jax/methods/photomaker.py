"""PhotoMaker v1/v2 (Li et al. 2024; TencentARC/PhotoMaker) on an SDXL base: sampling with the
official files.

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
Training (the ID encoder's projections, fuse module and LoRA) is not built yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from persona_jax.convert import photomaker_files as pmf
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.photomaker_conditioning import (ID_EMBEDS, ID_PIXELS, PHOTOMAKER, START,
                                                         START_MERGE_STEP, PhotoMakerConditioning)
from persona_jax.methods.photomaker_inputs import (TRIGGER_WORD, check_base, check_prompt,
                                                   face_embeddings, id_pixels, trigger_tokenizers)
from persona_jax.methods.photomaker_verify import verify_file
from persona_jax.methods.spec import Knob, MethodSpec, ResultSpec, SamplingSpec, VerifySpec
FILE_HELP = ("photomaker-v1.bin / photomaker-v2.bin (pickles: with --allow-pickle) or a "
             ".safetensors with the same id_encoder.* and lora_weights.* keys")


@dataclasses.dataclass(frozen=True)
class PhotoMakerOptions:
  """Training options (training is not built yet)."""
  trigger_word: str = TRIGGER_WORD


def make(config, base_params, tokenizer_dir=None, unet_config=None):
  raise ConfigError("method.name: photomaker trains nothing yet; sample with an official file "
                    "(persona-jax sample --photomaker FILE)")


# ---------------------------------------------------------------------------------------------
# The file, the base, the tokenizers.


def load(path) -> result_file.Result:
  """A PhotoMaker file (read when sampling, which may need --allow-pickle): path and metadata."""
  path = Path(path)
  if not path.is_file():
    raise ModelFileError(f"{path}: no PhotoMaker file here; pass {FILE_HELP}")
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
    result=ResultSpec("photomaker.safetensors"), sdxl=True, load=load, sample=sample,
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
