"""BLIP-Diffusion (Li et al. 2023, arXiv 2305.14720; salesforce/LAVIS): zero-shot subject-driven
sampling with a BLIP-Diffusion folder (Salesforce/blipdiffusion's layout), as diffusers'
deprecated `BlipDiffusionPipeline` computes it.

  persona-jax sample --model BLIPDIFFUSION_DIR --image subject.png --subject-class dog \\
      --target-class dog --prompt "swimming underwater" [--prompt-strength 1.0] [--prompt-reps 20]
      [--negative-prompt "..."] [--guidance 7.5] [--steps 50]
  persona-jax verify BLIPDIFFUSION_DIR
  persona-jax make-random-model OUT --preset blip_diffusion

The folder is recognised by its model_index.json class (BlipDiffusionPipeline) and read by
methods/blip_diffusion_folder.py; the conditioning is methods/blip_diffusion_conditioning.py.
Per sampling call:
* the subject image (`--image`, exactly one) through BLIP's image processing (data/blip_images.py:
  bicubic resize to the Q-Former's size, the folder's mean and std); images of other modes (RGBA,
  LA, P, L, CMYK, 16-bit) become RGB as data/images.py reads every image: alpha composited onto
  white, as diffusers' convert_to_rgb does;
* the subject class (`--subject-class`, required) tokenized by the Q-Former's BERT tokenizer
  (qformer_tokenizer.py). A class of several words ("teddy bear") is one text, every word a token
  the Q-Former attends to, as the pipeline passes it;
* each prompt assembled as `_build_prompt` does: "a {target} {prompt}" repeated
  int(prompt_strength x prompt_reps) times joined by ", " (strength 1, reps 20 by default; 0
  repetitions give the empty prompt), `--target-class` defaulting to the subject class; then CLIP
  ids padded or cut (EOS kept last) to the text encoder's positions less the query tokens
  (77 - 16 = 61 in the release), the query embeddings going in at `ctx_begin_pos` (2: after
  "<bos> a", before the target class's words);
* the negative prompt (default "", as the pipeline) through the same text encoder without query
  embeddings, at full length; classifier-free guidance (7.5 by default).
Sampling uses DDIM where the folder's scheduler is PNDM (the release's), which we do not have,
with the rewrite our SD 1.x sampling applies (steps_offset 1, clip_sample False); `--scheduler`
picks another of ours.
Bad input: no --subject-class, a prompt strength or reps below 0, an unreadable image, a folder
whose Q-Former vocabulary is not its tokenizer's size: one-line errors.

Training, both stages (stage-2 pre-training, subject fine-tuning), is
methods/blip_diffusion_training.py; a run's result (WORKDIR/model, a BLIP-Diffusion folder)
samples with `sample --run WORKDIR`: a pre-trained one as above, a fine-tuned one with its trained
subject embedding and no --image (`--subject-class` defaults to the run's class).
`persona-jax eval --method blip_diffusion|blip_diffusion_finetune --state STAGE2_WORKDIR`: the
toy world's benchmark (world/efficacy.py; the recipes are EVAL below).
"""

from __future__ import annotations

import dataclasses
import functools

from persona_jax.errors import ConfigError
from persona_jax.methods.blip_diffusion_conditioning import (PROMPT_REPS, PROMPT_STRENGTH,
                                                             build_prompt)
from persona_jax.methods.blip_diffusion_training import (FORMAT, RESULT_DIR, BlipDiffusionOptions,
                                                         folder_source, load, make)
from persona_jax.methods.spec import (EvalRecipe, Knob, MethodSpec, PipelineSpec, ResultSpec,
                                      SamplingSpec)

BLIP_DIFFUSION = "blip_diffusion"
SUBJECT, TARGET = "subject_class", "target_class"
STRENGTH, REPS = "prompt_strength", "prompt_reps"


def subject_inputs(pipe, image, subject_class: str) -> dict:
  """The conditioning's subject inputs of one image: {blip_pixels [1, S, S, 3], blip_category_ids
  [1, T], blip_category_mask [1, T]}. `image`: a path (read as data/images.py reads images), a
  PIL image or an [H, W, 3] uint8 array."""
  from pathlib import Path

  from persona_jax.data.clip_images import preprocess_image
  from persona_jax.data.images import load_image
  from persona_jax.methods.blip_diffusion_conditioning import (BLIP_PIXELS, CATEGORY_IDS,
                                                               CATEGORY_MASK)
  from persona_jax.qformer_tokenizer import tokenize_category
  if isinstance(image, (str, Path)):
    image = load_image(Path(image))
  pixels = preprocess_image(image, pipe.image_processing)[None]
  ids, mask = tokenize_category(pipe.qformer_tokenizer, [subject_class])
  return {BLIP_PIXELS: pixels, CATEGORY_IDS: ids, CATEGORY_MASK: mask}


def sampling_knobs(inputs) -> tuple[str, str, float, int]:
  """(subject class, target class, prompt strength, prompt reps) of the knobs given, checked."""
  subject = str(inputs.get(SUBJECT) or "").strip()
  if not subject:
    raise ConfigError("blip_diffusion: --subject-class WORD is needed: the category of the "
                      "--image subject (e.g. dog, or 'teddy bear')")
  target = str(inputs.get(TARGET) or subject).strip()
  strength = float(inputs.get(STRENGTH, PROMPT_STRENGTH))
  reps = int(inputs.get(REPS, PROMPT_REPS))
  if not strength >= 0 or reps < 0:
    raise ConfigError(f"blip_diffusion: --prompt-strength {strength} and --prompt-reps {reps} "
                      "must be >= 0 (the prompt is repeated int(strength x reps) times)")
  return subject, target, strength, reps


def sample(request):
  """Zero-shot sampling on a BLIP-Diffusion --model or a pre-training run's folder; a fine-tuning
  run's folder with its subject embedding (module docstring)."""
  from persona_jax.methods.blip_diffusion_folder import BlipDiffusionPipeline
  from persona_jax.text_to_image import Sampling
  pipe, result = request.pipe, request.result
  if not isinstance(pipe, BlipDiffusionPipeline):
    raise ConfigError(f"{pipe.path or 'the model'}: blip_diffusion samples on a BLIP-Diffusion "
                      "folder (model_index.json BlipDiffusionPipeline); pass it as --model")
  embedding = result.weights.get("embedding") if result is not None else None
  cond, inputs, params = pipe.conditioning(), dict(request.inputs), request.params
  if embedding is not None:
    inputs[SUBJECT] = inputs.get(SUBJECT) or result.meta.get(SUBJECT, "")
  subject, target, strength, reps = sampling_knobs(inputs)
  expand = functools.partial(build_prompt, target_class=target, prompt_strength=strength,
                             prompt_reps=reps)
  if embedding is not None:
    if request.images:
      raise ConfigError(f"{result.path}: a fine-tuned blip_diffusion run samples its trained "
                        "subject embedding; drop --image")
    shape = (1, cond.qformer.num_query_tokens, cond.text_encoder.hidden_size)
    if tuple(embedding.shape) != shape:
      raise ConfigError(f"{result.path}: its subject embedding is {list(embedding.shape)}, this "
                        f"model's query embeddings {list(shape)} (another base?)")
    return Sampling({**params, "blip_subject": {"embedding": embedding}},
                    conditioning=dataclasses.replace(cond, subject_embedding=True),
                    expand_prompt=expand, prompt_length=cond.prompt_length)
  if len(request.images) != 1:
    what = "--run (blip_diffusion)" if result is not None else "--model (blip_diffusion)"
    raise ConfigError(f"{what} needs --image PATH" if not request.images
                      else f"{what} reads one --image")
  return Sampling(params, conditioning=cond, expand_prompt=expand,
                  inputs=subject_inputs(pipe, request.images[0], subject),
                  prompt_length=cond.prompt_length)


def _load_folder(path, **kwargs):
  from persona_jax.methods.blip_diffusion_folder import read_blip_folder
  return read_blip_folder(path, **kwargs)


def _verify_folder(pipe, path, **kwargs):
  from persona_jax.methods.blip_diffusion_verify import verify_folder
  return verify_folder(pipe, path, **kwargs)


def _make_random(out, seed: int = 0, overwrite: bool = False):
  from persona_jax.methods.blip_diffusion_folder import make_random_folder
  return make_random_folder(out, seed=seed, overwrite=overwrite)


# `persona-jax eval` (world/efficacy.py), both from a stage-2 run given as --state: zero-shot with
# the first reference and the subject's class as the Q-Former's category; fine-tuned as LAVIS's
# finetune-db-dog.yaml (the UNet and the mean subject embedding, constant lr) on all references,
# its steps and lr scaled to the toy world as DreamBooth's are: lr the toy DreamBooth's (LAVIS
# fine-tunes at DreamBooth's 5e-6), 40 steps (LAVIS's dog).
EVAL = {
    BLIP_DIFFUSION: EvalRecipe("tuning_free", "{cls}", subject_images="first",
                               inputs=((SUBJECT, "{cls}"),)),
    f"{BLIP_DIFFUSION}_finetune": EvalRecipe(
        "tuned", "{cls}", "blip_diffusion:tiny_finetune", 40, 2e-4,
        (("data.source", "blip_diffusion"), ("method.subject_class", "{cls}")),
        state_key="model", state_default="", state_result=True),
}

SPEC = MethodSpec(
    name=BLIP_DIFFUSION, config=BlipDiffusionOptions, make=make,
    result=ResultSpec(RESULT_DIR, FORMAT), load=load, sample=sample,
    data_sources={"blip_diffusion": folder_source}, eval=EVAL,
    sampling=SamplingSpec(
        images="any",
        knobs=(Knob(SUBJECT, "blip_diffusion: the --image subject's category (required; several "
                    "words are one category, e.g. 'teddy bear'; a fine-tuned run: its own)", str),
               Knob(TARGET, "blip_diffusion: the category the prompt renders ('a TARGET PROMPT'; "
                    "default: the subject class)", str),
               Knob(STRENGTH, f"blip_diffusion: prompt repetitions = int(strength x reps) "
                    f"(default {PROMPT_STRENGTH})"),
               Knob(REPS, f"blip_diffusion: see --prompt-strength (default {PROMPT_REPS})", int))),
    pipeline=PipelineSpec(("BlipDiffusionPipeline",), load=_load_folder, verify=_verify_folder,
                          preset=BLIP_DIFFUSION, make_random=_make_random))
