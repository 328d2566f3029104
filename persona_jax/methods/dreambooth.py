"""DreamBooth (Ruiz et al. 2022): fine-tune the whole UNet (and optionally the text encoder) on a
few images captioned "a [identifier] [class noun]", with class-prior preservation.

Prior preservation is on when the run's data has class images (`data.num_class_images > 0`):
each step's batch holds `batch_size` instance examples and as many class examples (generated
from the base model by the same sampler as `make-class-images`, prompt "a [class noun]"), one
forward, and the loss is mean(instance) + `prior_loss_weight` * mean(class), as in diffusers'
train_dreambooth.py. The loss target follows the base's `prediction_type` (epsilon or v). The
text encoder's own learning rate (diffusers' `--text_encoder_lr`) is a learning-rate group:
`--config.optim.lr_groups='(("text_encoder/.*", 2e-6),)'`.

The result is a diffusers folder, WORKDIR/model, with the trained UNet (and text encoder):
`sample --run WORKDIR` samples it (it is its own base); exports: the folder (diffusers) or an
original single file (A1111, ComfyUI).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from persona_jax.diffusion.conditioning import unread_text_rules
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.spec import EvalRecipe, Knob, MethodSpec, ResultSpec

log = logging.getLogger(__name__)

RESULT_DIR = "model"
IDENTIFIER = "sks"


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
  train_text_encoder: bool = False


def select_rules(config: DreamBoothConfig, base_params=None):
  """The whole UNet and, with `train_text_encoder`, every text encoder (SDXL: both, as
  train_dreambooth_lora_sdxl.py's --train_text_encoder) but the leaves the text conditioning
  never reads (SDXL's first encoder's last layer)."""
  if not config.train_text_encoder:
    return (("unet/.*", True),)
  return unread_text_rules(base_params or {}) + (("unet/.*", True), ("text_encoder(_2)?/.*", True))


def save(trainable, context):
  """Writes WORKDIR/model: the base folder's components with the trained weights (float32)."""
  from persona_jax.pipeline import save_pipeline
  params = context.full_params(trainable)
  pipe = dataclasses.replace(context.pipe, params={k: params[k] for k in context.pipe.params})
  out = save_pipeline(pipe, Path(context.workdir) / RESULT_DIR, overwrite=True)
  log.info("wrote the fine-tuned model to %s (a diffusers folder)", out)
  return [str(out)]


def make(config: DreamBoothConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  return Method(name="dreambooth", params=ParamSpec(select=select_rules(config, base_params)),
                save=save)


def load(path) -> result_file.Result:
  """WORKDIR/model (or the model folder itself): the fine-tuned pipeline folder."""
  path = Path(path)
  folder = path / RESULT_DIR if (path / RESULT_DIR).is_dir() else path
  if not (folder / "model_index.json").is_file():
    raise ModelFileError(f"{path}: no {RESULT_DIR}/ here (the run has not finished: run the same "
                         "`train` command again to complete it)")
  return result_file.Result(folder, {}, {"base_model": str(folder)})


def sample(request):
  """The fine-tuned folder is the pipeline sampled (`base_model`): nothing to add."""
  from persona_jax.text_to_image import Sampling
  if Path(request.pipe.path or "").resolve() != Path(request.result.path).resolve():
    raise ConfigError(f"--model {request.pipe.path}: a dreambooth run's result "
                      f"({request.result.path}) is its own base; drop --model")
  return Sampling(request.params)


def upgrade(method: dict, config: dict) -> None:
  """Run configs from before the method lifecycle: the text encoder's lr became a group."""
  lr = method.pop("text_encoder_lr", 0.0)
  if lr and method.get("train_text_encoder"):
    optim = config.setdefault("optim", {})
    optim["lr_groups"] = [["text_encoder/.*", lr]] + list(optim.get("lr_groups", []))


def export_folder(request):
  """The run's model folder copied whole (the base's tokenizer files are already in it)."""
  from persona_jax.convert.files import copy_file
  model = request.result.path
  written = []
  for src in sorted(p for p in model.rglob("*") if p.is_file()):
    written.append(copy_file(src, request.out / src.relative_to(model)))
  return ([request.out] if written else []), {}


def export_single_file(request):
  from persona_jax.convert.single_file import save_single_file
  from persona_jax.pipeline import load_pipeline
  base_single_file = request.options.get("base_single_file")
  if base_single_file is None and Path(request.base).is_file():
    base_single_file = request.base
  path = request.out / f"{request.workdir.absolute().name}.safetensors"
  return [save_single_file(load_pipeline(request.result.path), path,
                           base_single_file=base_single_file)], {}


PROMPT = f"a photo of a {IDENTIFIER} {{cls}}"
EVAL = EvalRecipe("tuned", f"{IDENTIFIER} {{cls}}", "dreambooth", 150, 2e-4,
                  (("data.prompt", PROMPT),), prior=True)
SPEC = MethodSpec(
    name="dreambooth", config=DreamBoothConfig, make=make, result=ResultSpec(RESULT_DIR), sdxl=True,
    load=load, sample=sample, upgrade=upgrade,
    exports={"diffusers": export_folder, "single-file": export_single_file},
    export_options=(Knob("base_single_file", "dreambooth, single-file export of an SD 2.x run: the "
                         "base's own single file (its extra text-encoder layer is carried over; "
                         "default: the run's base if it is a single file)", Path),),
    eval={"dreambooth": EVAL,
          "dreambooth_noprior": dataclasses.replace(
              EVAL, prior=False, options=EVAL.options + (("prior_loss_weight", 0.0),))})
