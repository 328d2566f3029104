"""LoRA files in the formats other tools read and write (formats.md 4.1).

Every format holds, per adapted module, a down factor A and an up factor B with
`W' = W + s * B @ A` (PyTorch layout: A [r, in(, kh, kw)], B [out, r(, 1, 1)]). Ours
(`lora.safetensors`, methods/lora.py) holds a [fan_in, r], b [r, out] and alpha per kernel path.

  diffusers / PEFT   `unet.<module>.lora_A.weight` / `.lora_B.weight`, text encoders under
                     `text_encoder.text_model.<module>` (SDXL's second: `text_encoder_2.`, as
                     StableDiffusionXLPipeline.save_lora_weights writes); we fold the scale into
                     B and write `lora_adapter_metadata` with lora_alpha = r (so it loads at
                     scale 1 in diffusers >= 0.34 and, without reading the metadata, in older ones)
  kohya / A1111      `lora_unet_<module, . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (ComfyUI too)      and `lora_te_text_model_<...>`; scale = alpha / r. With two text encoders
                     (SDXL, sdxl_train_network.py) `lora_te1_` / `lora_te2_` and the UNet in
                     LDM/SGM names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
                     `lora_names.sgm_modules`); both UNet spellings are read on any base
  old diffusers      `unet.<module>.processor.to_q_lora.down.weight` (attention processors),
                     `<module>.lora.down.weight`, `text_encoder.<...>.q_proj.lora_linear_layer.down`
                     (read only)

The variants (methods/lora_variants.py) in the same files:
  DoRA   ours `<target>/magnitude` [out] beside a, b; PEFT `<module>.lora_magnitude_vector` ([out],
         a conv's [1, out, 1, 1]; `use_dora` in the metadata); kohya/LyCORIS `<name>.dora_scale`
         [out, 1(, 1, 1)] (LyCORIS's wd_on_out layout, which ComfyUI reads too; diffusers drops
         `dora_scale` keys of kohya files with a warning)
  LoKr   `<target>/lokr_w1` (or `lokr_w1_a`, `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a`,
         `lokr_w2_b`); kohya/LyCORIS `lora_unet_<module>.lokr_w1` ... and `.alpha`
  LoHa   `<target>/hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`; kohya/LyCORIS likewise
LoKr/LoHa tensors keep LyCORIS's PyTorch orientation in every file; the PEFT layout holds LoRA
and DoRA only.

`read_lora_file` recognises each (and ours) by its keys and returns our LoRAFactors; a key it
cannot place is an error naming the file and the key (diffusers silently ignores UNet keys
without the `unet.` prefix; we do not).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
import numpy as np

from persona_jax import tree
from persona_jax.convert.lora_names import COMPONENTS, TEXT_ENCODERS, kohya_names, module_names
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import lora_variants as variants
from persona_jax.methods.lora_variants import DoRAFactor, Factor

__all__ = ["Factor", "DoRAFactor", "LoRAFactors"]

# ---------------------------------------------------------------------------------------------
# Ours: WORKDIR/lora.safetensors, `<target>/a` [fan_in, r], `<target>/b` [r, out] and
# `<target>/alpha` [] per target (the kernel's path without `/kernel`), metadata format OURS.

OURS = "persona_jax-lora"
FILE_KEY = re.compile(r"((?:unet|text_encoder|text_encoder_2)/.+)/(alpha|"
                      + "|".join(variants.LEAF_NAMES) + ")")

# base kernel path (`unet/.../to_q/kernel`) -> its factor (Factor, DoRAFactor, LoKrFactor, LoHaFactor)
LoRAFactors = dict[str, variants.AnyFactor]


def read_lora_tensors(path) -> dict[str, np.ndarray]:
  """The tensors of a LoRA file, which must be a .safetensors (pickles are refused), float and
  finite; an integer kohya `.alpha` (diffusers' convert_state_dict_to_kohya writes int64) is read
  as float32."""
  from persona_jax.convert.files import check_weights, read_safetensors
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ModelFileError(f"{path}: LoRA files are read as .safetensors only (pickle formats such as "
                         ".pt/.ckpt/.bin are refused)")
  if not path.is_file():
    raise ModelFileError(f"{path}: LoRA file not found")
  tensors = dict(read_safetensors(path))
  for key, value in tensors.items():
    if key.endswith(".alpha") and np.ndim(value) == 0 and np.issubdtype(value.dtype, np.integer):
      tensors[key] = np.asarray(value, np.float32)
  return dict(check_weights(tensors, path, finite=True))


def load_lora_file(path, base_params=None, *, tensors=None) -> LoRAFactors:
  """Reads a lora.safetensors written by methods/lora.py (`tensors`: its contents, when already
  read). A target without `alpha` (files from before it was stored) gets alpha = r (scale 1,
  kohya's rule for a missing alpha). Other tools' formats: `read_lora_file`.

  With `base_params` (the pipeline's tree) every target must name a kernel of that base, with
  a @ b of the kernel's [fan_in, out]. Errors name the file and the first bad key.
  """
  path = Path(path)
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, value in sorted((read_lora_tensors(path) if tensors is None else tensors).items()):
    m = FILE_KEY.fullmatch(key)
    if not m:
      raise ModelFileError(f"{path}: key '{key}' is not a persona_jax LoRA key (<target>/a, /b, "
                           "/alpha); files of other tools are read by `sample --lora` "
                           "(read_lora_file below)")
    parts.setdefault(m[1], {})[m[2]] = value
  if not parts:
    raise ModelFileError(f"{path}: holds no LoRA factors")
  base = tree.flatten(base_params) if base_params is not None else None
  out = {}
  for target, p in parts.items():
    leaves = {k: v for k, v in p.items() if k != "alpha"}
    low_rank = not (set(leaves) & set(variants.LEAVES["lokr"] + variants.LEAVES["loha"]))
    if low_rank:                              # LoRA / DoRA: a [fan_in, r], b [r, out]
      for name in ("a", "b"):
        if name not in p:
          raise ModelFileError(f"{path}: '{target}/{name}' is missing (the target has only "
                               f"{', '.join(sorted(p))})")
      a, b = p["a"], p["b"]
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.shape[1] == 0:
        raise ModelFileError(f"{path}: '{target}/a' {list(a.shape)} and '{target}/b' {list(b.shape)} "
                             "are not [fan_in, r] and [r, out] with r >= 1")
    alpha = p.get("alpha")
    if alpha is not None and (np.size(alpha) != 1 or not np.isfinite(alpha).all()):
      raise ModelFileError(f"{path}: '{target}/alpha' must be a finite scalar, got "
                           f"{np.asarray(alpha).ravel()[:4]} of shape {list(np.shape(alpha))}")
    kernel = f"{target}/kernel"
    if base is not None:
      if kernel not in base:
        first = "a" if low_rank else sorted(leaves)[0]
        raise ModelFileError(f"{path}: '{target}/{first}': the base model has no kernel {kernel} "
                             "(a LoRA trained on another model?)")
      shape = tuple(base[kernel].shape)
      want = (int(np.prod(shape[:-1])), shape[-1])
      if low_rank and (a.shape[0], b.shape[1]) != want:
        raise ModelFileError(f"{path}: '{target}/a' @ '{target}/b' is [{a.shape[0]}, {b.shape[1]}]; "
                             f"the base kernel {list(shape)} needs [{want[0]}, {want[1]}]")
    elif low_rank:
      shape = (a.shape[0], b.shape[1])
    else:
      raise ModelFileError(f"{path}: '{target}': LoKr/LoHa factors are read against the base model "
                           "(a conv's kernel size is not in them)")
    rank = variants.rank_of(leaves) or 1
    alpha = float(np.ravel(alpha)[0]) if alpha is not None else float(rank)
    out[kernel] = variants.make_factor(leaves, alpha, shape, f"{path}: '{target}'")
  return out


def write_ours(path, factors: dict[str, tuple[dict, float]], metadata: dict) -> Path:
  """Writes our LoRA file: {target (kernel path without /kernel): (leaves, alpha)}, the leaves
  under their lora_variants.LEAVES names (float32)."""
  from persona_jax.convert.files import write_safetensors
  flat = {}
  for target, (leaves, alpha) in factors.items():
    for name, value in leaves.items():
      flat[f"{target}/{name}"] = np.asarray(value, np.float32)
    flat[f"{target}/alpha"] = np.asarray(alpha, np.float32)
  path = Path(path)
  write_safetensors(path, flat, {"format": OURS, **metadata})
  return path


# ---------------------------------------------------------------------------------------------
# Other tools' formats.

PEFT_FILE = "pytorch_lora_weights.safetensors"


def to_torch(factor: Factor, kernel_shape) -> tuple[np.ndarray, np.ndarray]:
  """(A [r, in(, kh, kw)], B [out, r(, 1, 1)]) of our factor for a kernel of `kernel_shape`
  ([in, out] or HWIO); the scale is not applied."""
  r = factor.a.shape[1]
  if len(kernel_shape) == 4:
    kh, kw, cin, cout = kernel_shape
    down = factor.a.reshape(kh, kw, cin, r).transpose(3, 2, 0, 1)
    return np.ascontiguousarray(down), np.ascontiguousarray(factor.b.T[:, :, None, None])
  return np.ascontiguousarray(factor.a.T), np.ascontiguousarray(factor.b.T)


def from_torch(down: np.ndarray, up: np.ndarray, kernel_shape, scale: float, where: str) -> Factor:
  """Our Factor from PyTorch-layout factors (the inverse of `to_torch`); `where` names the key
  in errors."""
  down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
  if up.ndim == 4:
    if up.shape[2:] != (1, 1):
      raise ModelFileError(f"{where}: up factor {list(up.shape)} is not [out, r, 1, 1]")
    up = up[:, :, 0, 0]
  r = down.shape[0]
  if up.ndim != 2 or up.shape[1] != r:
    raise ModelFileError(f"{where}: down {list(down.shape)} and up {list(up.shape)} do not share a rank")
  if len(kernel_shape) == 4:
    kh, kw, cin, cout = kernel_shape
    if down.ndim == 2 and kh == kw == 1:
      down = down[:, :, None, None]
    if down.shape != (r, cin, kh, kw) or up.shape[0] != cout:
      raise ModelFileError(f"{where}: factors {list(down.shape)} / {list(up.shape)} do not fit the "
                           f"base's {kh}x{kw} conv from {cin} to {cout} channels")
    a = down.transpose(2, 3, 1, 0).reshape(kh * kw * cin, r)
  else:
    cin, cout = kernel_shape
    if down.ndim == 4 and down.shape[2:] == (1, 1):
      down = down[:, :, 0, 0]
    if down.shape != (r, cin) or up.shape[0] != cout:
      raise ModelFileError(f"{where}: factors {list(down.shape)} / {list(up.shape)} do not fit the "
                           f"base's linear layer from {cin} to {cout}")
    a = down.T
  return Factor(np.ascontiguousarray(a), np.ascontiguousarray(up.T), np.asarray(scale, np.float32))


# ---------------------------------------------------------------------------------------------
# writing

def _shapes(base_params) -> dict[str, tuple]:
  return {p: tuple(v.shape) for p, v in tree.flatten(base_params).items()}


def peft_state_dict(factors: LoRAFactors, base_params) -> tuple[dict, dict]:
  """(tensors, metadata) of the diffusers/PEFT file, the scale folded into B."""
  names, shapes = module_names(base_params), _shapes(base_params)
  kinds = {variants.variant_of(f) for f in factors.values()}
  if not kinds <= {"lora", "dora"} or len(kinds) > 1:
    raise ConfigError(f"the diffusers/PEFT layout holds LoRA or DoRA factors, not {'/'.join(sorted(kinds))}: "
                      "export LoKr/LoHa with --format kohya (the LyCORIS layout ComfyUI, A1111 "
                      "and LyCORIS read)")
  dora = kinds == {"dora"}
  tensors, ranks = {}, {}
  for path, f in sorted(factors.items()):
    down, up = to_torch(f, shapes[path])
    module = names[path]
    tensors[f"{module}.lora_A.weight"] = down
    tensors[f"{module}.lora_B.weight"] = (up * np.float32(f.scale)).astype(np.float32)
    if dora:                                  # PEFT's shapes: [out], a conv's [1, out, 1, 1]
      m = np.asarray(f.magnitude, np.float32)
      tensors[f"{module}.lora_magnitude_vector"] = m.reshape(1, -1, 1, 1) if down.ndim == 4 else m
    ranks[module] = down.shape[0]
  config = {}
  for component in COMPONENTS:
    # Module names relative to the component; the text encoder's without `text_model.`: PEFT
    # matches target names as suffixes, so they fit transformers 4 (text_model.encoder...) and
    # 5 (encoder...) alike.
    mine = {m[len(component) + 1:].removeprefix("text_model."): r for m, r in ranks.items()
            if m.startswith(component + ".")}
    if not mine:
      continue
    r = Counter(mine.values()).most_common(1)[0][0]
    pattern = {m: v for m, v in mine.items() if v != r}
    config.update({f"{component}.r": r, f"{component}.lora_alpha": r,
                   f"{component}.target_modules": sorted(mine),
                   f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern),
                   f"{component}.use_dora": dora, f"{component}.lora_bias": False})
  return tensors, {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True),
                   "format": "pt"}


def kohya_state_dict(factors: LoRAFactors, base_params, *, base_version: str) -> tuple[dict, dict]:
  """(tensors, metadata) of the kohya / A1111 / ComfyUI file (names: `kohya_names`);
  `base_version` is kohya's ss_base_model_version ("sd_v1", "sd_v2", "sd_v2_v",
  "sdxl_base_v1-0"). Every module gets the file's most common alpha, a module whose own alpha
  differs its up factor rescaled by alpha / common (the same W + alpha / r * B @ A): diffusers'
  kohya loader keeps only the majority alpha for attention projections (their alpha keys get
  processor names, lora_conversion_utils._get_alpha_name), as with per-block ranks at alpha = r."""
  names, shapes = kohya_names(base_params), _shapes(base_params)
  kinds = {variants.variant_of(f) for f in factors.values()}
  low_rank = {p: f for p, f in factors.items() if isinstance(f, (Factor, DoRAFactor))}
  alphas = {path: float(np.float32(f.scale) * f.a.shape[1]) for path, f in low_rank.items()}
  common = Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0
  tensors, ranks = {}, []
  for path, f in sorted(factors.items()):
    if path not in names:
      raise ModelFileError(f"{path}: kohya's format has no name for this layer")
    name = names[path]
    if path not in low_rank:                  # LoKr / LoHa: LyCORIS's own tensors and alpha
      leaves = variants.leaves_of(f)
      tensors.update({f"{name}.{k}": np.ascontiguousarray(v, np.float32) for k, v in leaves.items()})
      tensors[f"{name}.alpha"] = np.asarray(variants.alpha_of(f), np.float32)
      ranks.append(variants.rank_of(leaves) or 1)
      continue
    down, up = to_torch(f, shapes[path])
    if alphas[path] != common:
      up = (up * np.float32(alphas[path] / common)).astype(np.float32)
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.alpha"] = np.asarray(common, np.float32)
    if isinstance(f, DoRAFactor):             # LyCORIS's wd_on_out layout: [out, 1(, 1, 1)]
      tensors[f"{name}.dora_scale"] = np.asarray(f.magnitude, np.float32).reshape(
          (-1,) + (1,) * (down.ndim - 1))
    ranks.append(down.shape[0])
  metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
              "ss_network_alpha": str(common), "ss_base_model_version": base_version,
              "ss_v2": str(base_version.startswith("sd_v2")),
              "modelspec.sai_model_spec": "1.0.1",
              "modelspec.architecture": ARCHITECTURES.get(base_version, "stable-diffusion-v1") + "/lora"}
  if kinds != {"lora"}:                       # LyCORIS's network metadata (lycoris.kohya)
    algo = {"dora": "locon", "lokr": "lokr", "loha": "loha"}[sorted(kinds - {"lora"})[0]]
    metadata.update({"ss_network_module": "lycoris.kohya",
                     "ss_network_args": json.dumps({"algo": algo, "dora_wd": str("dora" in kinds)}),
                     "modelspec.architecture": metadata["modelspec.architecture"][:-len("lora")] + "lycoris"})
  return tensors, metadata


# kohya's ss_base_model_version -> modelspec.architecture (library/sai_model_spec.py).
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                 "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def base_version(pipe) -> str:
  """kohya's ss_base_model_version of a pipeline: SDXL has two text encoders, SD 2.x a
  1024-wide one."""
  if "text_encoder_2" in pipe.params:
    return "sdxl_base_v1-0"
  if pipe.text_encoder_config.hidden_size >= 1024:
    return "sd_v2_v" if pipe.scheduler_config.get("prediction_type") == "v_prediction" else "sd_v2"
  return "sd_v1"


# ---------------------------------------------------------------------------------------------
# reading

_PEFT = re.compile(r"(.+)\.lora_([AB])\.weight")
_KOHYA = re.compile(r"(lora_(?:unet|te|te1|te2)_.+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|"
                    + "|".join(n for n in variants.LEAF_NAMES if n.startswith(("lokr_", "hada_"))) + ")")
_TUCKER = re.compile(r"lora_(?:unet|te|te1|te2)_.+\.(lokr_t[12]|hada_t[12]|lora_mid\.weight)")
_MAGNITUDE = re.compile(r"(.+)\.lora_magnitude_vector(?:\.weight)?")
_OLD = [  # (pattern, module rewrite): the older diffusers spellings
    (re.compile(r"(.+)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight"), r"\1.\2"),
    (re.compile(r"(.+)\.processor\.to_out_lora\.(down|up)\.weight"), r"\1.to_out.0"),
    (re.compile(r"(.+)\.to_(q|k|v)_lora\.(down|up)\.weight"), r"\1.\2_proj"),
    (re.compile(r"(.+)\.to_out_lora\.(down|up)\.weight"), r"\1.out_proj"),
    (re.compile(r"(.+)\.lora_linear_layer\.(down|up)\.weight"), r"\1"),
    (re.compile(r"(.+)\.lora\.(down|up)\.weight"), r"\1"),
]


def _diffusers_key(key: str):
  """(module, 'down' | 'up') of a diffusers-family key (PEFT or an older spelling), else None.
  diffusers itself mixes them: `convert_state_dict_to_diffusers` writes text-encoder attention
  as `q_proj.lora_linear_layer.down` beside `fc1.lora_A`."""
  m = _PEFT.fullmatch(key)
  if m:
    return m[1], {"A": "down", "B": "up"}[m[2]]
  m = _MAGNITUDE.fullmatch(key)
  if m:
    return m[1], "magnitude"
  for pattern, rewrite in _OLD:
    m = pattern.fullmatch(key)
    if m:
      return m.expand(rewrite), m[m.lastindex]
  return None


def detect_format(keys) -> str:
  """'persona_jax', 'kohya' or 'diffusers' (PEFT and the older spellings) from a file's keys
  (the first that all keys fit); 'unknown' otherwise."""
  keys = list(keys)
  if keys and all(FILE_KEY.fullmatch(k) for k in keys):
    return "persona_jax"
  if keys and all(_KOHYA.fullmatch(k) for k in keys):
    return "kohya"
  if keys and all(_diffusers_key(k) for k in keys):
    return "diffusers"
  return "unknown"


def _component_module(module: str, path: Path, key: str) -> str:
  """A diffusers module name with its component prefix, the text encoder's `text_model.` added
  when the file leaves it out (transformers >= 5.6 spelling)."""
  component, _, rest = module.partition(".")
  if component not in COMPONENTS:
    raise ModelFileError(f"{path}: key '{key}' has no 'unet.', 'text_encoder.' or 'text_encoder_2.' "
                         "prefix (diffusers would silently skip it); add the prefix of the model "
                         "part it adapts")
  if component in TEXT_ENCODERS and not rest.startswith(("text_model.", "text_projection")):
    module = f"{component}.text_model.{rest}"
  return module


def read_lora_file(path, base_params, *, tensors=None) -> LoRAFactors:
  """Reads a LoRA file in any supported format against the base it applies to (the pipeline's
  params). Returns {base kernel path: Factor}. Errors name the file and the first bad key (on an
  SDXL base, saying so: an SD 1.x/2.x LoRA does not fit it). `tensors`: the LoRA's tensors when
  they are part of another file (`path` then only names it; no metadata alphas are read)."""
  try:
    return _read_lora_file(Path(path), base_params, tensors)
  except ModelFileError as e:
    if "text_encoder_2" not in base_params:
      raise
    if any(_SDXL_ONLY.search(k) for k in (tensors if tensors is not None
                                          else read_lora_tensors(Path(path)))):
      raise
    raise ModelFileError(f"{e}; the model is SDXL: is this an SD 1.x/2.x LoRA? Use a LoRA made "
                         "for this base model") from None


# Keys only SDXL LoRAs have: kohya's two text encoders and SGM block names, diffusers' second encoder.
_SDXL_ONLY = re.compile(r"^lora_te[12]_|^lora_unet_(?:input_blocks|middle_block|output_blocks)_|"
                        r"^text_encoder_2\.")


def _read_lora_file(path: Path, base_params, given=None) -> LoRAFactors:
  tensors = read_lora_tensors(path) if given is None else dict(given)
  kind = detect_format(tensors)
  if kind == "persona_jax":
    return load_lora_file(path, base_params, tensors=tensors)
  tucker = next((k for k in sorted(tensors) if _TUCKER.fullmatch(k)), None)
  if tucker:
    raise ModelFileError(f"{path}: key '{tucker}': Tucker-decomposed conv factors (LyCORIS "
                         "use_tucker / LoCon lora_mid) are not read; train without use_tucker")
  if kind == "unknown":
    bad = next((k for k in sorted(tensors) if not (FILE_KEY.fullmatch(k) or _KOHYA.fullmatch(k)
                                                    or _diffusers_key(k))),
               next(iter(sorted(tensors)), "(no keys)"))
    raise ModelFileError(f"{path}: key '{bad}' fits no LoRA format persona_jax reads (diffusers/PEFT "
                         "'unet.<module>.lora_A.weight', kohya 'lora_unet_<module>.lora_down.weight', "
                         "older diffusers '...processor.to_q_lora.down.weight', or ours); "
                         "mixed formats in one file are not read")
  names = {m: p for p, m in module_names(base_params).items()}
  shapes = _shapes(base_params)
  parts: dict[str, dict[str, np.ndarray]] = {}      # kernel path -> {"down", "up"(, "alpha")}
  labels: dict[str, str] = {}                        # kernel path -> its module name in the file
  if kind == "kohya":
    by_kohya = {n: p for p, spellings in kohya_names(base_params, every_spelling=True).items()
                for n in spellings}
    for key, value in sorted(tensors.items()):
      m = _KOHYA.fullmatch(key)
      if m[1] not in by_kohya:
        raise ModelFileError(f"{path}: key '{key}': the base model has no module {m[1]} (a LoRA "
                             "for another model?)")
      kernel = by_kohya[m[1]]
      if labels.setdefault(kernel, m[1]) != m[1]:
        raise ModelFileError(f"{path}: '{m[1]}' and '{labels[kernel]}' name the same layer")
      parts.setdefault(kernel, {})[m[2].split(".")[0].replace("lora_", "")] = value
  else:
    for key, value in sorted(tensors.items()):
      module, which = _diffusers_key(key)
      module = _component_module(module, path, key)
      if module not in names:
        raise ModelFileError(f"{path}: key '{key}': the base model has no module {module}")
      labels[names[module]] = module
      parts.setdefault(names[module], {})[which] = value
  alphas = _peft_alphas(tensors, path) if kind == "diffusers" and given is None else {}
  out = {}
  for kernel, p in parts.items():
    where = f"{path}: {labels[kernel]}"
    leaves = {k: v for k, v in p.items() if k.startswith(("lokr_", "hada_"))}
    if leaves:                                # LoKr / LoHa: LyCORIS's tensors as they are
      if set(p) - set(leaves) - {"alpha"}:
        raise ModelFileError(f"{where}: LoKr/LoHa tensors mixed with {sorted(set(p) - set(leaves))}")
      alpha = float(np.ravel(p["alpha"])[0]) if "alpha" in p else 0.0
      if not np.isfinite(alpha):
        raise ModelFileError(f"{where}: alpha is not finite")
      alpha = alpha or float(variants.rank_of(leaves) or 1)    # LyCORIS: 0 or none means rank
      out[kernel] = variants.make_factor(leaves, alpha, shapes[kernel], where)
      continue
    for name in ("down", "up"):
      if name not in p:
        raise ModelFileError(f"{where}: the {name} factor is missing")
    r = p["down"].shape[0]
    alpha = float(np.ravel(p["alpha"])[0]) if "alpha" in p else alphas.get(labels[kernel], float(r))
    if not np.isfinite(alpha):
      raise ModelFileError(f"{where}: alpha is not finite")
    alpha = alpha or float(r)                 # kohya: a missing or zero alpha means alpha = r
    factor = from_torch(p["down"], p["up"], shapes[kernel], alpha / r, where)
    source = next((k for k in ("dora_scale", "magnitude") if k in p), None)
    if source:
      out[kernel] = _dora(factor, p[source], source == "dora_scale", shapes[kernel], where)
    else:
      out[kernel] = factor
  return out


def _dora(factor: Factor, magnitude, kohya: bool, kernel_shape, where: str) -> DoRAFactor:
  """DoRA's magnitude per output feature: PEFT's [out] or [1, out, 1, 1], LyCORIS's dora_scale
  [out, 1(, 1, 1)]. LyCORIS's older per-input layout (wd_on_out=False, [1, in(, 1, 1)]) is
  another decomposition, not read."""
  out_dim = kernel_shape[-1]
  magnitude = np.asarray(magnitude, np.float32)
  axis = 0 if kohya or magnitude.ndim == 1 else 1
  if magnitude.size != out_dim or magnitude.ndim < axis + 1 or magnitude.shape[axis] != out_dim:
    raise ModelFileError(f"{where}: DoRA magnitude {list(magnitude.shape)} is not one value per "
                         f"output feature ({out_dim}; LyCORIS's per-input dora_scale, wd_on_out="
                         "False, is not read)")
  return DoRAFactor(factor.a, factor.b, factor.scale, magnitude.reshape(-1))


def _peft_alphas(tensors, path: Path) -> dict[str, float]:
  """Per-module lora_alpha from a PEFT file's `lora_adapter_metadata` (none: alpha = r)."""
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    metadata = f.metadata() or {}
  if "lora_adapter_metadata" not in metadata:
    return {}
  try:
    config = json.loads(metadata["lora_adapter_metadata"])
  except json.JSONDecodeError as e:
    raise ModelFileError(f"{path}: metadata 'lora_adapter_metadata' is not JSON ({e})") from None
  out = {}
  modules = {_component_module(_diffusers_key(k)[0], path, k) for k in tensors}
  for module in modules:
    component = module.split(".", 1)[0]
    rest = module[len(component) + 1:]
    short = rest[len("text_model."):] if rest.startswith("text_model.") else rest
    r_alpha = config.get(f"{component}.lora_alpha")
    pattern = config.get(f"{component}.alpha_pattern") or {}
    hit = next((v for k, v in pattern.items() if rest.endswith(k) or short.endswith(k)), None)
    if hit is not None:
      out[module] = float(hit)
    elif r_alpha is not None:
      out[module] = float(r_alpha)
  return out
