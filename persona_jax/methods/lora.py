"""Block-wise LoRA / LoCon (Hu et al. 2021; kohya's and LyCORIS' conventions, methods.md 4).

For every target kernel W the method adds factors `a` [fan_in, r] (Gaussian, std 1/r as PEFT's
"gaussian" init) and `b` [r, out] (zeros), and its transform merges them into the weight:
  W' = W + (alpha / r) * reshape(a @ b, W.shape)
so at step 0 the model is the base bit for bit, and the unchanged networks run on merged weights
(STYLE.md 8.4). For a k x k conv (LoCon) fan_in = k * k * in (the im2col view of an HWIO kernel).

Targets (`/`-joined param paths):
  targets     transformer linears (rank: `rank`), any of "attn" (attn1/attn2 to_q, to_k, to_v,
              to_out_0), "ff" (ff net_0/proj, net_2), "proj" (proj_in / proj_out)
  convs       resnet conv1 / conv2 / conv_shortcut, down/upsampler convs (rank: `conv_rank`; LoCon)
  text        text encoder self_attn q/k/v/out_proj, mlp fc1/fc2 (block BASE; `text_encoder=True`)
Per-block rank and alpha (block names from models/block_names.py: IN00..OUT11, MID, BASE) override
the uniform values; rank 0 skips a block. Trainable leaves: `lora/<target path>/{a,b}`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import tree
from persona_jax.errors import ConfigError
from persona_jax.methods.base import Method
from persona_jax.models import block_names
from persona_jax.models.configs import UNetConfig

LORA = "lora"
LINEAR_TARGETS = {"attn": r"attn[12]/to_(q|k|v|out_0)", "ff": r"ff/net_0/proj|ff/net_2",
                  "proj": r"proj_in|proj_out"}
CONVS = re.compile(r"unet/.*/(resnets_\d+/(conv1|conv2|conv_shortcut)|(down|up)samplers_0/conv)/kernel")
TEXT = re.compile(r"text_encoder/.*/(self_attn/(q|k|v|out)_proj|mlp/fc[12])/kernel")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 4                      # attention/linear targets
  alpha: float = 0.0                 # 0: alpha = rank (scale 1, PEFT's default)
  conv_rank: int = 0                 # LoCon on resnet and sampler convs; 0: off
  conv_alpha: float = 0.0            # 0: alpha = conv_rank
  text_encoder: bool = False         # LoRA on the text encoder too (block BASE)
  block_ranks: Mapping = dataclasses.field(default_factory=dict)   # {block: rank}; 0 skips it
  block_alphas: Mapping = dataclasses.field(default_factory=dict)  # {block: alpha}
  targets: tuple = ("attn", "ff", "proj")   # transformer linears: attention q/k/v/out, ff, proj


@dataclasses.dataclass(frozen=True)
class Target:
  kernel: str                        # path of the base kernel, e.g. unet/.../to_q/kernel
  shape: tuple[int, ...]
  rank: int
  scale: float                       # alpha / rank

  @property
  def key(self) -> str:              # the factors' place in the trainable tree
    return f"{LORA}/{self.kernel.rsplit('/', 1)[0]}"


def targets(config: LoRAConfig, base_params, unet_config: UNetConfig) -> tuple[Target, ...]:
  """The kernels that get factors, with their rank and scale (blocks resolved)."""
  for name, value in (("rank", config.rank), ("conv_rank", config.conv_rank)):
    if value < 0:
      raise ConfigError(f"method.{name} must be >= 0, got {value}")
  ranks = {block_names.canonical(b, unet_config, "method.block_ranks"): int(r)
           for b, r in dict(config.block_ranks).items()}
  alphas = {block_names.canonical(b, unet_config, "method.block_alphas"): float(a)
            for b, a in dict(config.block_alphas).items()}
  unknown = sorted(set(config.targets) - set(LINEAR_TARGETS))
  if unknown:
    raise ConfigError(f"method.targets: '{unknown[0]}' is not one of {', '.join(LINEAR_TARGETS)}")
  linear = re.compile(r"unet/.*/(" + "|".join(LINEAR_TARGETS[t] for t in config.targets) + r")/kernel")
  out = []
  for path, leaf in tree.flatten(base_params).items():
    if (config.targets and linear.fullmatch(path)) or (config.text_encoder and TEXT.fullmatch(path)):
      rank, alpha = config.rank, config.alpha
    elif config.conv_rank and CONVS.fullmatch(path):
      rank, alpha = config.conv_rank, config.conv_alpha
    else:
      continue
    block = block_names.param_block(path, unet_config)
    rank = ranks.get(block, rank)
    if rank <= 0:
      continue
    alpha = alphas.get(block, alpha) or rank
    out.append(Target(path, tuple(leaf.shape), rank, alpha / rank))
  if not out:
    raise ConfigError("method: LoRA selects no layers (every rank is 0?)")
  return tuple(out)


def make(config: LoRAConfig, base_params, tokenizer_dir=None, unet_config: UNetConfig | None = None) -> Method:
  if unet_config is None:
    raise ConfigError("LoRA needs the UNet's config for its block names")
  chosen = targets(config, base_params, unet_config)

  def init_trainable(rng, base):
    factors = {}
    for i, t in enumerate(chosen):
      fan_in = int(np.prod(t.shape[:-1]))
      a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, t.rank), jnp.float32) / t.rank
      factors[t.key] = {"a": a, "b": jnp.zeros((t.rank, t.shape[-1]), jnp.float32)}
    return tree.unflatten({f"{k}/{n}": v for k, f in factors.items() for n, v in f.items()})

  def transform(frozen, trainable):
    flat = tree.flatten(frozen)
    lora = tree.flatten(trainable)
    for t in chosen:
      if t.kernel not in flat:              # a component the step does not need
        continue
      w = flat[t.kernel]
      delta = (lora[f"{t.key}/a"] @ lora[f"{t.key}/b"]).reshape(t.shape)
      flat[t.kernel] = (w.astype(jnp.float32) + t.scale * delta).astype(w.dtype)
    return tree.unflatten(flat)

  return Method(name="lora", init_trainable=init_trainable, transform=transform,
                save_result=save_result, trains_text=config.text_encoder)


def save_result(run, trainable, workdir):
  """WORKDIR/lora.safetensors: our factors by path (`<target>/a`, `<target>/b`) with the scales
  in the metadata. diffusers/PEFT and kohya files come with the export work."""
  import json

  from persona_jax.convert.files import write_safetensors
  flat = {p[len(LORA) + 1:]: np.asarray(v, np.float32) for p, v in tree.flatten(trainable).items()}
  path = workdir / "lora.safetensors"
  write_safetensors(path, flat, {"format": "persona_jax-lora",
                                 "base_model": str(run.model_dir),
                                 "method": json.dumps(dict(run.config.method_options), default=str)})
  return [str(path)]
