"""Pivotal tuning: Textual Inversion rows and a UNet LoRA trained together (diffusers'
examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py and, on SDXL,
train_dreambooth_lora_sdxl_advanced.py, after replicate/cog-sdxl), composed from this package's
Textual Inversion and LoRA pieces.

  persona-jax train --config pivotal:tiny --workdir runs/pivotal
  persona-jax sample --run runs/pivotal --prompt "a photo of <s0> on the beach" --out out/
  persona-jax export runs/pivotal --format kohya --out for_webui/      # LoRA + A1111 embedding
  persona-jax export runs/pivotal --format diffusers --out for_diffusers/

New tokens (`placeholder` and, for `num_vectors` N > 1, `<tok>_1 ... <tok>_{N-1}`, diffusers'
multi-vector rule) get rows initialized from `initializer`; they enter the text encoder as input
embeddings (methods/textual_inversion.py). The UNet gets LoRA factors on its attention q/k/v/out
(`targets`, methods/lora.py; `text_encoder=True` adds LoRA on the text encoder's q/k/v/out and
fc layers, kohya's set). Trainable leaves: `tokens` [N, D] and `lora/<target>/{a, b}`. On SDXL
the new tokens have rows in both text encoders (`tokens` [N, D1], `tokens_2` [N, D2]), as the
SDXL script's TokenEmbeddingsHandler adds them to both tokenizers and encoders.

The recipe's knobs are the run config's (configs/pivotal.py): the rows' own learning rate and
the pivot, `optim.lr_groups = (("tokens(_2)?", LR, STOP),)`: the rows stop training after the
STOP fraction of the steps (the script's `--train_text_encoder_ti_frac`, 0.5) while the LoRA goes
on.

Result: WORKDIR/learned_embeds.safetensors (the rows, diffusers' file) and WORKDIR/lora.safetensors
(the factors), the two methods' own files: `sample --embedding ... --lora ...` reads them too.
Exports: "kohya"/"a1111" (kohya's LoRA file `<run>.safetensors` and the A1111 embedding
`<placeholder>.safetensors`: the webui's `<lora:...>` plus the trigger word) and "diffusers"
(pytorch_lora_weights.safetensors for `load_lora_weights` and learned_embeds.safetensors for
`load_textual_inversion`, side by side). On SDXL both embedding files are the SDXL embedding
{"clip_l": [N, D1], "clip_g": [N, D2]}, loaded as the SDXL script's README does:
  state_dict = load_file("learned_embeds.safetensors")
  pipe.load_textual_inversion(state_dict["clip_l"], token=["<s0>", "<s0>_1"],
                              text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
  pipe.load_textual_inversion(state_dict["clip_g"], token=["<s0>", "<s0>_1"],
                              text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
  pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
and the prompt says `<s0>` (diffusers expands it to `<s0> <s0>_1`).

Where the script differs and we keep our way: its rows start random (times the embedding table's
std), ours from `initializer`'s row (Textual Inversion's rule); after every step it rescales the
new rows towards the table's std (`retract_embeddings`, off_ratio ** 0.1), we do not; its pivot
counts epochs (and its LambdaLR scheduler likely restores the group's lr one step later), ours is
a fraction of the steps; its rows train at `--text_encoder_lr` under the same AdamW, ours at
their lr_groups entry. Its N tokens are `<s0><s1>...` (the prompt spells them all), ours `<s0>
<s0>_1 ...` (the prompt says `<s0>`, diffusers' multi-vector rule); its SDXL `<run>_emb.safetensors`
reads here as `--embedding FILE:<s0>` (the same rows in order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from persona_jax.errors import ModelFileError
from persona_jax.methods import lora, result_file, textual_inversion
from persona_jax.methods.base import compose
from persona_jax.methods.spec import EvalRecipe, MethodSpec, ResultSpec

PIVOTAL = "pivotal"


@dataclasses.dataclass(frozen=True)
class PivotalConfig:
  placeholder: str = "<s0>"          # a new token (the script's TOK -> <s0><s1>)
  initializer: str = "object"        # a one-token word whose row starts the new rows
  num_vectors: int = 2               # the script's --num_new_tokens_per_abstraction
  rank: int = 4                      # LoRA rank (alpha = rank: PEFT's lora_alpha=rank)
  alpha: float = 0.0
  targets: tuple = ("attn",)         # the UNet's to_q/to_k/to_v/to_out.0 (the script's)
  text_encoder: bool = False         # LoRA on the text encoder(s) too (the script's
                                     # --train_text_encoder; methods/lora.py's values)


def parts(config: PivotalConfig):
  """(Textual Inversion options, LoRA options) of a pivotal config."""
  return (textual_inversion.TextualInversionConfig(config.placeholder, config.initializer,
                                                   config.num_vectors),
          lora.LoRAConfig(rank=config.rank, alpha=config.alpha, targets=tuple(config.targets),
                          text_encoder=config.text_encoder))


def make(config: PivotalConfig, base_params, tokenizer_dir=None, unet_config=None):
  """Textual Inversion's method with LoRA's parameter space composed in; both save."""
  ti_options, lora_options = parts(config)
  rows = textual_inversion.make(ti_options, base_params, tokenizer_dir)
  factors = lora.make(lora_options, base_params, tokenizer_dir, unet_config)

  def save(trainable, context):
    return rows.save(trainable, context) + factors.save(trainable, context)
  return dataclasses.replace(rows, name=PIVOTAL, params=compose(rows.params, factors.params),
                             save=save)


def load(path) -> result_file.Result:
  """A pivotal run folder: weights {"embedding": TI Result, "lora": LoRA Result}."""
  path = Path(path)
  folder = path if path.is_dir() else path.parent
  if not (folder / lora.RESULT_FILE).is_file():
    raise ModelFileError(f"{folder}: no {lora.RESULT_FILE}; the run has not finished (run the same "
                         "`train` command again to complete it)")
  parts_ = {"embedding": textual_inversion.load(folder), "lora": lora.load(folder)}
  return result_file.Result(folder, parts_, parts_["embedding"].meta)


def sample(request):
  """The LoRA merged into the weights, then the rows as Textual Inversion samples them."""
  merged = lora.sample(dataclasses.replace(request, result=request.result.weights["lora"]))
  return textual_inversion.sample(dataclasses.replace(
      request, params=merged.params, result=request.result.weights["embedding"]))


def export(request, fmt: str):
  """The LoRA and the embedding, each in the format the target tool reads."""
  def part(name):
    return dataclasses.replace(request, result=request.result.weights[name])
  lora_files, _ = lora.export(part("lora"), "diffusers" if fmt == "diffusers" else "kohya")
  embedding_files, _ = textual_inversion.export(part("embedding"),
                                                "diffusers" if fmt == "diffusers" else "a1111")
  return list(lora_files) + list(embedding_files), {}


SPEC = MethodSpec(
    name=PIVOTAL, config=PivotalConfig, make=make, result=ResultSpec(lora.RESULT_FILE),
    load=load, sample=sample,
    exports={"diffusers": lambda r: export(r, "diffusers"), "kohya": lambda r: export(r, "kohya"),
             "a1111": lambda r: export(r, "kohya")},
    eval={PIVOTAL: EvalRecipe("tuned", "<s0>", PIVOTAL, 200, 1e-3,
                              (("method.initializer", "{cls}"), ("data.caption_source", "prompt"),
                               ("data.prompt", "a photo of a <s0>")))},
    sdxl=True)
