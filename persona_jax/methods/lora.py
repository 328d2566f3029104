"""Block-wise LoRA / LoCon (Hu et al. 2021; kohya's and LyCORIS' conventions, methods.md 4).

For every target kernel W the method adds factors `a` [fan_in, r] (Gaussian, std 1/r as PEFT's
"gaussian" init) and `b` [r, out] (zeros), and its transform merges them into the weight:
  W' = W + (alpha / r) * reshape(a @ b, W.shape)
so at step 0 the model is the base bit for bit, and the unchanged networks run on merged weights
(STYLE.md 8.4). For a k x k conv (LoCon) fan_in = k * k * in (the im2col view of an HWIO kernel).
Under mixed_precision="bf16" the frozen kernels are bf16, where a merge would round every update
below half a bf16 ulp of W away; there the factors go beside the kernel instead and the layer
adds its low-rank path before its one rounding (models/low_rank.py).

Targets (`/`-joined param paths):
  targets     transformer linears (rank: `rank`), any of "attn" (attn1/attn2 to_q, to_k, to_v,
              to_out_0), "ff" (ff net_0/proj, net_2), "proj" (proj_in / proj_out), or a named
              set: "diffusers" = ("attn",), the default (train_dreambooth_lora.py's
              target_modules to_k/to_q/to_v/to_out.0), "kohya" = ("attn", "ff", "proj") (kohya's
              networks/lora.py: every Linear and 1x1 conv of a Transformer2DModel; with
              `conv_rank` its LoCon convs too: the `lora:kohya` config)
  convs       resnet conv1 / conv2 / conv_shortcut, down/upsampler convs (rank: `conv_rank`; LoCon)
  text        text encoder self_attn q/k/v/out_proj, mlp fc1/fc2 (block BASE), in the encoders
              `text_encoder` names: True = every encoder of the base (SDXL: both, as
              train_dreambooth_lora_sdxl.py's --train_text_encoder and kohya's SDXL default),
              "te1" / "te2" one of SDXL's (kohya's lora_te1_ / lora_te2_), "both", or a tuple;
              not the layers the conditioning never reads (SDXL: the first encoder's last one,
              diffusion/conditioning.py `unread_text_rules`), where factors would get no gradient
Variants (`variant`; the math in methods/lora_variants.py, the same targets, ranks and blocks):
  lora  the above
  dora  DoRA (Liu et al. 2024) as PEFT's use_dora: a, b as LoRA plus `magnitude` [out], started
        at the norm of W per output feature; W' = magnitude * V / ||V||, V = W + (alpha/r) a @ b,
        the norm detached from gradients as PEFT does (LoCon convs too, the norm over kh*kw*in)
  lokr  LoKr as LyCORIS: dW = (alpha/r) kron(w1, w2) in PyTorch layout, w1 [out_l, in_m] full
        (or lokr_w1_a @ lokr_w1_b with `decompose_both`), w2 [out_k, in_n(, kh, kw)] full when
        the rank is at least half its larger side (or `full_matrix`), else lokr_w2_a @ lokr_w2_b;
        `factor` picks the split (LyCORIS's factorization); w2 (or w2_b) starts at zero, w1 and
        w2_a kaiming-uniform; both halves full: scale 1 (alpha unused), as LyCORIS
  loha  LoHa as LyCORIS: dW = (alpha/r) (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b),
        hada_w2_a starts at zero (w1_a ~ N(0, 0.1), w1_b, w2_b ~ N(0, 1)); convs flattened
        [r, in*kh*kw] (no Tucker)
Under mixed_precision="bf16" a variant's whole update is computed in float32 and put beside the
kernel (models/low_rank.py `lora_delta`: one extra product of the kernel's size), not merged.
Per-block rank and alpha (block names from models/block_names.py: IN00..OUT11, MID, BASE on SD 1.x,
IN00..IN08, MID, OUT00..OUT08, BASE on SDXL) override the uniform values; rank 0 skips a block.
Trainable leaves: `lora/<target path>/{a,b}` (DoRA: and `magnitude`; LoKr: `lokr_w1` or
`lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`; LoHa: `hada_w1_a`, `hada_w1_b`,
`hada_w2_a`, `hada_w2_b`; LoKr/LoHa in LyCORIS's PyTorch orientation).

Result file WORKDIR/lora.safetensors, per target (the kernel's path without `/kernel`):
`<target>/a` [fan_in, r], `<target>/b` [r, out] and `<target>/alpha` [] (float32; kohya's
convention: scale = alpha / r, r = b.shape[0]); convert/lora_formats.py reads and writes it (and
the formats of other tools). A run samples as its file does with `--lora FILE`
(methods/lora_compose.py); exports: diffusers/PEFT (`pipe.load_lora_weights`; `unet.`,
`text_encoder.`, `text_encoder_2.`) and kohya/A1111 (SDXL: `lora_unet_input_blocks_...`,
`lora_te1_`, `lora_te2_`).
The variants' files: ours holds each target's leaves under the names above (+ alpha); exports:
  dora  diffusers/PEFT: lora_A/lora_B + `lora_magnitude_vector` (use_dora in the metadata; read
        by diffusers' `load_lora_weights`); kohya: lora_down/lora_up/alpha + `dora_scale` [out, 1]
        (LyCORIS's layout, read by LyCORIS and ComfyUI, whose output-axis rule divides by ||W||
        where DoRA divides by ||W + dW||; diffusers drops kohya `dora_scale` keys)
  lokr, loha  kohya only (LyCORIS keys `lora_unet_..._to_q.lokr_w1`, `.hada_w1_a`, `.alpha`:
        read by LyCORIS, ComfyUI, A1111); `export --format diffusers` is an error naming kohya
All are read back by `sample --lora FILE` (methods/lora_compose.py: a variant's update times
the LoRA's weight and block weight).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.convert import lora_formats as lf
from persona_jax.diffusion.conditioning import text_encoders, unread_text_rules
from persona_jax.errors import ConfigError
from persona_jax.methods import lora_variants, result_file
from persona_jax.methods.base import Method, ParamSpec
from persona_jax.methods.spec import EvalRecipe, MethodSpec, ResultSpec, VerifySpec
from persona_jax.models import block_names, low_rank
from persona_jax.models.configs import UNetConfig

LORA = "lora"
LINEAR_TARGETS = {"attn": r"attn[12]/to_(q|k|v|out_0)", "ff": r"ff/net_0/proj|ff/net_2",
                  "proj": r"proj_in|proj_out"}
TARGET_SETS = {"diffusers": ("attn",), "kohya": ("attn", "ff", "proj")}
CONVS = re.compile(r"unet/.*/(resnets_\d+/(conv1|conv2|conv_shortcut)|(down|up)samplers_0/conv)/kernel")
TEXT = re.compile(r"(text_encoder|text_encoder_2)/.*/(self_attn/(q|k|v|out)_proj|mlp/fc[12])/kernel")
# `text_encoder` values naming encoders (kohya's prefixes, the components, the SDXL file keys).
ENCODER_NAMES = {"te1": "text_encoder", "text_encoder": "text_encoder", "clip_l": "text_encoder",
                 "te2": "text_encoder_2", "text_encoder_2": "text_encoder_2", "clip_g": "text_encoder_2"}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 4                      # attention/linear targets
  alpha: float = 0.0                 # 0: alpha = rank (scale 1, PEFT's default)
  conv_rank: int = 0                 # LoCon on resnet and sampler convs; 0: off
  conv_alpha: float = 0.0            # 0: alpha = conv_rank
  # LoRA on text encoders too (block BASE): False, True (every encoder of the base), "te1",
  # "te2", "both", or a tuple of encoder names. The command line takes True/False (the field is a
  # bool there); a config file sets the others inside `with c.ignore_type():`.
  text_encoder: bool | str | tuple = False
  # Per block: {block: value}, or 26 / 17 values in the preset's order (BASE, IN00.., MID, OUT..;
  # or BASE and the attention blocks). Rank 0 skips a block.
  block_ranks: Mapping | tuple = dataclasses.field(default_factory=dict)
  block_alphas: Mapping | tuple = dataclasses.field(default_factory=dict)
  # Blocks that get factors: "" all; a lora-block-weight preset (ALL, INS, IND, INALL, MIDD,
  # OUTD, OUTS, OUTALL) or 17 / 26 numbers in the preset order, 0 skipping a block (SD 1.x names).
  blocks: str = ""
  # Transformer linears: "attn" (q/k/v/out), "ff", "proj", or a TARGET_SETS name ("kohya").
  targets: tuple = ("attn",)
  # "lora", "dora" (PEFT's use_dora), "lokr" or "loha" (LyCORIS's); see the module docstring.
  variant: str = "lora"
  # LoKr only (LyCORIS's options of the same names): `factor` splits each dimension into
  # (m, n), m <= factor (-1: the most balanced split); `decompose_both` makes the smaller
  # Kronecker half low rank too; `full_matrix` keeps both halves full (scale 1, alpha unused).
  factor: int = -1
  decompose_both: bool = False
  full_matrix: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
  kernel: str                        # path of the base kernel, e.g. unet/.../to_q/kernel
  shape: tuple[int, ...]
  rank: int
  alpha: float
  variant: str = "lora"
  lokr: tuple = ()                   # LoKr's (factor, decompose_both, full_matrix)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def key(self) -> str:              # the factors' place in the trainable tree
    return f"{LORA}/{self.kernel.rsplit('/', 1)[0]}"


def _per_block(values, unet_config: UNetConfig, field: str) -> dict:
  """{block: value} for the blocks given: a {name: value} mapping, or one value per block of the
  26 or 17 preset in its order (kohya's block_dims with BASE first; the lbw extension's order)."""
  if not values:
    return {}
  given = block_names.per_block(dict(values) if isinstance(values, Mapping) else tuple(values),
                                unet_config, field)
  return {b: v for b, v in given.items() if v is not None}


def chosen_encoders(value, base_params) -> tuple[str, ...]:
  """The text encoders a `text_encoder` value names, of those the base has (`text_encoders`)."""
  have = text_encoders(base_params)
  if isinstance(value, str):
    word = value.strip().lower()
    if word in ("", "false", "none", "0"):
      return ()
    if word in ("true", "all", "1"):
      return have
    value = ("te1", "te2") if word == "both" else tuple(w.strip() for w in word.split(","))
  elif not isinstance(value, (tuple, list)):
    return have if value else ()
  out = []
  for name in value:
    encoder = ENCODER_NAMES.get(str(name).strip().lower())
    if encoder is None:
      raise ConfigError(f"method.text_encoder: '{name}' is not a text encoder (give True, False, "
                        "'te1', 'te2', 'both' or a tuple of them)")
    if encoder not in have:
      raise ConfigError(f"method.text_encoder: '{name}': the model has one text encoder (SD "
                        "1.x/2.x); use text_encoder=True")
    out.append(encoder)
  return tuple(e for e in have if e in out)


def targets(config: LoRAConfig, base_params, unet_config: UNetConfig) -> tuple[Target, ...]:
  """The kernels that get factors, with their rank and scale (blocks resolved)."""
  if config.variant not in lora_variants.VARIANTS:
    raise ConfigError(f"method.variant: '{config.variant}' is not one of {', '.join(lora_variants.VARIANTS)}")
  if config.variant != "lokr" and (config.factor != -1 or config.decompose_both or config.full_matrix):
    raise ConfigError("method.factor / decompose_both / full_matrix are LoKr's options: set "
                      "method.variant=lokr or leave them at -1 / False")
  lokr = ((int(config.factor), bool(config.decompose_both), bool(config.full_matrix))
          if config.variant == "lokr" else ())
  for name, value in (("rank", config.rank), ("conv_rank", config.conv_rank)):
    if value < 0:
      raise ConfigError(f"method.{name} must be >= 0, got {value}")
  ranks = {b: int(r) for b, r in _per_block(config.block_ranks, unet_config, "method.block_ranks").items()}
  alphas = {b: float(a) for b, a in _per_block(config.block_alphas, unet_config, "method.block_alphas").items()}
  enabled = (None if not config.blocks else
             {b for b, v in block_names.block_values(config.blocks, unet_config, "method.blocks").items() if v})
  names = {n for t in config.targets for n in TARGET_SETS.get(t, (t,))}
  unknown = sorted(names - set(LINEAR_TARGETS))
  if unknown:
    raise ConfigError(f"method.targets: '{unknown[0]}' is not one of "
                      f"{', '.join([*LINEAR_TARGETS, *TARGET_SETS])}")
  linear = re.compile(r"unet/.*/(" + "|".join(LINEAR_TARGETS[t] for t in sorted(names)) + r")/kernel")
  encoders = chosen_encoders(config.text_encoder, base_params)
  unread = [re.compile(rule) for rule, _ in unread_text_rules(base_params)]
  out = []
  for path, leaf in tree.flatten(base_params).items():
    text = TEXT.fullmatch(path)
    if text and any(rule.fullmatch(path) for rule in unread):
      continue                              # SDXL never reads the first encoder's last layer
    if (names and linear.fullmatch(path)) or (text and text[1] in encoders):
      rank, alpha = config.rank, config.alpha
    elif config.conv_rank and CONVS.fullmatch(path):
      rank, alpha = config.conv_rank, config.conv_alpha
    else:
      continue
    block = block_names.param_block(path, unet_config)
    rank = ranks.get(block, rank)
    if rank <= 0 or (enabled is not None and block not in enabled):
      continue
    alpha = alphas.get(block, alpha) or rank
    out.append(Target(path, tuple(leaf.shape), rank, float(alpha), config.variant, lokr))
  if not out:
    raise ConfigError("method: LoRA selects no layers (every rank is 0?)")
  return tuple(out)


RESULT_FILE = "lora.safetensors"


def param_spec(chosen: tuple[Target, ...]) -> ParamSpec:
  """LoRA's parameter space over the chosen targets: new factors, merged into the weights."""
  def init(rng, base):
    flat_base = tree.flatten(base)
    leaves = {}
    for i, t in enumerate(chosen):
      factor, decompose_both, full_matrix = t.lokr or (-1, False, False)
      made = lora_variants.init_leaves(t.variant, t.shape, t.rank, jax.random.fold_in(rng, i),
                                       flat_base.get(t.kernel), factor=factor,
                                       decompose_both=decompose_both, full_matrix=full_matrix)
      leaves.update({f"{t.key}/{n}": v for n, v in made.items()})
    return tree.unflatten(leaves)

  def transform(params):
    flat = tree.flatten(params)
    for t in chosen:
      if t.kernel not in flat:              # a component the step does not need
        continue
      w = flat[t.kernel]
      if t.variant == "lora":
        a, b = flat[f"{t.key}/a"], flat[f"{t.key}/b"]
        if w.dtype == jnp.float32:
          flat[t.kernel] = w + t.scale * (a @ b).reshape(t.shape)
        else:                               # bf16: a merge would round small updates away
          low_rank.attach(flat, t.kernel, a, b, t.scale)
        continue
      names = lora_variants.LEAVES[t.variant]
      factor = _factor(t, {n: flat[f"{t.key}/{n}"] for n in names if f"{t.key}/{n}" in flat})
      delta = factor.update(w.astype(jnp.float32))
      if w.dtype == jnp.float32:
        flat[t.kernel] = w + delta
      else:                                 # bf16: the whole update beside the kernel
        low_rank.attach_delta(flat, t.kernel, delta)
    return tree.unflatten(flat)
  return ParamSpec(init=init, transform=transform)


def _factor(t: Target, leaves: dict):
  """The variant's factor (methods/lora_variants.py) of one target's trainable leaves (traced)."""
  scale = jnp.asarray(lora_variants.scale_of(leaves, t.alpha), jnp.float32)
  if t.variant == "dora":
    return lora_variants.DoRAFactor(leaves["a"], leaves["b"], scale, leaves["magnitude"])
  if t.variant == "loha":
    return lora_variants.LoHaFactor(*(leaves[n] for n in lora_variants.LEAVES["loha"]), scale)
  return lora_variants.LoKrFactor(*(leaves.get(n) for n in lora_variants.LEAVES["lokr"]), scale)


def make(config: LoRAConfig, base_params, tokenizer_dir=None, unet_config: UNetConfig | None = None) -> Method:
  if unet_config is None:
    raise ConfigError("LoRA needs the UNet's config for its block names")
  chosen = targets(config, base_params, unet_config)
  return Method(name="lora", params=param_spec(chosen),
                save=functools.partial(save, chosen))


def save(chosen: tuple[Target, ...], trainable, context):
  """WORKDIR/lora.safetensors: our factors by target (`<target>/a`, `<target>/b`) and each
  target's `<target>/alpha` (a float32 scalar), so the file alone gives the merge."""
  flat = tree.flatten(trainable)
  factors = {}
  for t in chosen:
    leaves = {n: flat[f"{t.key}/{n}"] for n in lora_variants.LEAVES[t.variant] if f"{t.key}/{n}" in flat}
    if leaves:
      factors[t.key[len(LORA) + 1:]] = (leaves, t.alpha)
  path = lf.write_ours(Path(context.workdir) / RESULT_FILE, factors,
                      result_file.run_metadata(context, lf.OURS))
  return [str(path)]


# ---------------------------------------------------------------------------------------------
# Result, sampling, export, verify.


def load(path) -> result_file.Result:
  """WORKDIR/lora.safetensors (or the file): its tensors and metadata."""
  path = Path(path)
  path = path / RESULT_FILE if path.is_dir() else path
  return result_file.Result(path, lf.read_lora_tensors(path), result_file.metadata(path))


def sample(request):
  """The run's factors merged into the weights, as `sample --lora FILE` merges them."""
  from persona_jax.methods.lora_compose import apply_loras
  from persona_jax.text_to_image import Sampling
  unet_config = request.pipe.unet_config
  factors = lf.load_lora_file(request.result.path, request.params, tensors=request.result.weights)
  ones = np.ones((1, len(block_names.all_blocks(unet_config))), np.float32)
  return Sampling(apply_loras(request.params, [factors], ones, unet_config))


def export(request, fmt: str):
  from persona_jax.convert.files import write_safetensors
  from persona_jax.pipeline import load_pipeline
  pipe = load_pipeline(request.base)
  result = request.result
  factors = lf.load_lora_file(result.path, pipe.params, tensors=result.weights)
  if fmt == "diffusers":
    tensors, metadata = lf.peft_state_dict(factors, pipe.params)
    path = request.out / lf.PEFT_FILE
  else:
    tensors, metadata = lf.kohya_state_dict(factors, pipe.params, base_version=lf.base_version(pipe))
    path = request.out / f"{request.workdir.absolute().name}.safetensors"
  write_safetensors(path, tensors, {**metadata, "persona_jax_base_model": str(request.base)})
  return [path], {}


def verify_file(pipe, model_path, value, **options):
  """A LoRA file loaded by diffusers (`load_lora_weights`, then `fuse_lora`) and by persona_jax;
  our own lora.safetensors is handed to diffusers as the PEFT file `export` writes."""
  from persona_jax.verify import compare_adapter

  def load_both(ref, pipe, tmp):
    from persona_jax.convert.files import read_safetensors, write_safetensors
    from persona_jax.methods.lora_compose import LoRASpec, with_loras
    from persona_jax.text_to_image import Sampling
    factors = lf.read_lora_file(value, pipe.params)
    file = Path(value)
    if lf.detect_format(read_safetensors(file)) == "persona_jax":
      tensors, meta = lf.peft_state_dict(factors, pipe.params)
      file = Path(tmp) / lf.PEFT_FILE
      write_safetensors(file, tensors, meta)
    ref.load_lora_weights(str(file.parent), weight_name=file.name)
    ref.fuse_lora()
    return pipe, Sampling(with_loras(pipe.params, [LoRASpec(Path(value))], pipe.unet_config)), None
  return compare_adapter(pipe, model_path, load_both, seed=options.get("seed", 0))


SPEC = MethodSpec(
    name="lora", config=LoRAConfig, make=make, result=ResultSpec(RESULT_FILE, lf.OURS), sdxl=True,
    load=load, sample=sample,
    exports={"diffusers": lambda r: export(r, "diffusers"), "kohya": lambda r: export(r, "kohya"),
             "a1111": lambda r: export(r, "kohya")},
    eval={"lora": EvalRecipe("tuned", "sks {cls}", "lora", 200, 1e-3,
                             (("data.prompt", "a photo of a sks {cls}"),)),
          # DreamBooth-LoRA (train_dreambooth_lora(_sdxl).py): the same with prior preservation.
          "dreambooth_lora": EvalRecipe("tuned", "sks {cls}", "lora", 200, 1e-3,
                                        (("data.prompt", "a photo of a sks {cls}"),), prior=True)},
    verify=VerifySpec("--lora", "FILE", "compare one LoRA file (ours, diffusers/PEFT, kohya) "
                      "loaded by diffusers and by persona_jax", verify_file))
