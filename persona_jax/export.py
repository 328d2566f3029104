"""`persona-jax export WORKDIR --format FORMAT --out DIR`: a training run's result in the format
another tool reads (formats.md 4). Which formats fit depends on the run's method:

  lora                diffusers   OUT/pytorch_lora_weights.safetensors (PEFT keys, scale folded;
                                  `pipe.load_lora_weights(OUT)`)
                      kohya       OUT/NAME.safetensors (lora_unet_/lora_te_ keys with .alpha; kohya,
                      a1111       AUTOMATIC1111, ComfyUI and diffusers read it)
  textual_inversion   diffusers   OUT/learned_embeds.safetensors (one token; several tokens: one
                                  OUT/TOKEN/learned_embeds.safetensors each)
                      a1111       OUT/TRIGGER.safetensors ({"emb_params": [n, D]}; the file name
                                  is the trigger word)
  dreambooth          diffusers   OUT/ a full diffusers folder (from_pretrained(OUT))
                      single-file OUT/NAME.safetensors, the original (LDM) layout A1111 and
                                  ComfyUI load; SD 2.x only when the base was itself a single file
                                  (or `--base-single-file`), whose extra OpenCLIP layer and
                                  text_projection it carries (diffusers folders drop them)
  custom_diffusion    diffusers   OUT/pytorch_custom_diffusion_weights.safetensors (attention-
                                  processor weights; also the .bin when torch is installed) and
                                  OUT/<new1>.safetensors per modifier token (load_textual_inversion)
                      merged      OUT/ a full diffusers folder whose UNet holds the new K/V (loads
                                  everywhere) and OUT/tokens/<new1>.safetensors
  ip_adapter          diffusers   OUT/ip_adapter.safetensors (the official layout) and
                                  OUT/image_encoder/ (the run's CLIP image encoder):
                                  `pipe.load_ip_adapter(OUT, subfolder="", weight_name=
                                  "ip_adapter.safetensors", image_encoder_folder="image_encoder")`
  e4t (tune)          diffusers   OUT/ a full diffusers folder (the tuned UNet with the weight
                                  offsets merged) and OUT/e4t_embedding/learned_embeds.safetensors:
                                  the placeholder's embedding for the run's image at one stated
                                  timestep (`--timestep`, default 500; in export.json)

diffusers cannot recompute E4T's embedding at every denoising step from the current latents (it
has no E4T encoder): `pipe.load_textual_inversion(OUT/e4t_embedding)` fixes it at the exported
timestep's value, an approximation of what `persona-jax sample --e4t` does.

diffusers' `unet.load_attn_procs` cannot load the Custom Diffusion .safetensors it writes itself
(diffusers issue #9320; formats.md 4.3); what works with diffusers 0.42:
  pipe.unet.load_attn_procs(OUT, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
or, from the .safetensors,
  procs = pipe.unet._process_custom_diffusion(safetensors.torch.load_file(FILE))
  pipe.unet.set_attn_processor({n: procs.get(n, AttnProcessor2_0()) for n in pipe.unet.attn_processors})
then `pipe.load_textual_inversion(OUT, weight_name="<new1>.safetensors")` for each token.

Every file is written under a temporary name and renamed; OUT/export.json records the run, the
base model, the method config and the files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError, ModelFileError

FORMATS = {
    "lora": ("diffusers", "kohya", "a1111"),
    "textual_inversion": ("diffusers", "a1111"),
    "dreambooth": ("diffusers", "single-file"),
    "custom_diffusion": ("diffusers", "merged"),
    "e4t": ("diffusers",),
    "ip_adapter": ("diffusers",),
}
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights"
ALL_FORMATS = ("diffusers", "kohya", "a1111", "single-file", "merged")


def read_run(workdir: Path) -> dict:
  """WORKDIR/config.json (the resolved run config), checked to be a finished run's."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise ModelFileError(f"{workdir}: no config.json; export takes a `persona-jax train` workdir")
  return json.loads(path.read_text())


def export(workdir, fmt: str, out, *, base_single_file=None, timestep: int | None = None) -> list[Path]:
  """Writes the run's result in `fmt` into the folder `out` (created); returns the paths.
  `base_single_file`: the single file an SD 2.x base came from (default: the run's base when it
  is one), for `single-file` exports. `timestep`: E4T's embedding is exported at this one."""
  from persona_jax.default_model import resolve_model
  workdir, out = Path(workdir), Path(out)
  config = read_run(workdir)
  method = config["method"]["name"]
  fits = FORMATS.get(method, ())
  if fmt not in fits:
    raise ConfigError(f"--format {fmt}: a {method} run exports as "
                      f"{', '.join(fits) if fits else 'nothing yet'}"
                      + ("" if fmt in ALL_FORMATS else f" (formats: {', '.join(ALL_FORMATS)})"))
  base = resolve_model(config["model"])
  out.mkdir(parents=True, exist_ok=True)
  extra = {}
  if method == "e4t":
    written, extra["e4t_embedding"] = _e4t(workdir, config, out, base, timestep)
  elif method == "ip_adapter":
    written = _ip_adapter(workdir, out)
  elif method == "dreambooth" and fmt == "single-file":
    from persona_jax.convert.single_file import save_single_file
    from persona_jax.pipeline import load_pipeline
    if base_single_file is None and Path(base).is_file():
      base_single_file = base
    path = out / f"{workdir.absolute().name}.safetensors"
    written = [save_single_file(load_pipeline(_result(workdir, "model")), path,
                                base_single_file=base_single_file)]
  else:
    written = {"lora": _lora, "textual_inversion": _textual_inversion,
               "dreambooth": _dreambooth, "custom_diffusion": _custom_diffusion}[method](
                   workdir, fmt, out, base)
  record = {"run": str(workdir.absolute()), "base_model": str(base), "method": config["method"],
            "format": fmt, "files": [str(p) for p in written], **extra}
  from persona_jax.convert.files import write_json
  write_json(out / "export.json", record)
  return written


def _result(workdir: Path, name: str) -> Path:
  path = workdir / name
  if not path.exists():
    raise ModelFileError(f"{workdir}: no {name}; the run has not finished (run the same `train` "
                         "command again to complete it)")
  return path


def _lora(workdir: Path, fmt: str, out: Path, base: Path) -> list[Path]:
  from persona_jax.convert import lora_formats as lf
  from persona_jax.convert.files import write_safetensors
  from persona_jax.methods.lora import load_lora_file
  from persona_jax.pipeline import load_pipeline
  pipe = load_pipeline(base)
  factors = load_lora_file(_result(workdir, "lora.safetensors"), pipe.params)
  if fmt == "diffusers":
    tensors, metadata = lf.peft_state_dict(factors, pipe.params)
    path = out / lf.PEFT_FILE
  else:
    tensors, metadata = lf.kohya_state_dict(factors, pipe.params, base_version=lf.base_version(pipe))
    path = out / f"{workdir.absolute().name}.safetensors"
  write_safetensors(path, tensors, {**metadata, "persona_jax_base_model": str(base)})
  return [path]


def _textual_inversion(workdir: Path, fmt: str, out: Path, base: Path) -> list[Path]:
  from persona_jax.convert import embedding_formats as ef
  embeddings = ef.read_embedding_file(_result(workdir, "learned_embeds.safetensors"))
  written = []
  for token, rows in embeddings.items():
    if fmt == "a1111":
      written.append(ef.write_a1111_embedding(token, rows, out))
    else:
      folder = out if len(embeddings) == 1 else out / ef.a1111_file_name(token).removesuffix(".safetensors")
      written.append(ef.write_diffusers_embedding({token: rows}, folder,
                                                  metadata={"base_model": str(base)}))
  return written


def _dreambooth(workdir: Path, fmt: str, out: Path, base: Path) -> list[Path]:
  """The run's model folder copied whole (the base's tokenizer files are already in it)."""
  model = _result(workdir, "model")
  written = []
  for src in sorted(p for p in model.rglob("*") if p.is_file()):
    dst = out / src.relative_to(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    written.append(dst)
  return [out] if written else []


def _token_files(result, folder: Path) -> list[Path]:
  """One {token: [D]} file per modifier token, as diffusers' Custom Diffusion example saves them."""
  from persona_jax.convert.files import write_safetensors
  written = []
  for concept, row in zip(result.concepts, result.tokens):
    path = folder / f"{concept['token']}.safetensors"
    write_safetensors(path, {concept["token"]: np.asarray(row, np.float32)}, {"format": "pt"})
    written.append(path)
  return written


def custom_diffusion_processors(weights: dict) -> dict:
  """Our attn2 leaves by param path -> diffusers' attention-processor state dict
  (`<block>.attn2.processor.to_k_custom_diffusion.weight` [out, in], ...)."""
  from persona_jax.convert.diffusers import torch_name
  names = {"to_k": "to_k_custom_diffusion", "to_v": "to_v_custom_diffusion",
           "to_q": "to_q_custom_diffusion", "to_out_0": "to_out_custom_diffusion.0"}
  out = {}
  for path, value in sorted(weights.items()):
    parts = path.split("/")[1:]                       # drop "unet"
    *block, layer, leaf = parts                       # [..., "attn2"], "to_k", "kernel"|"bias"
    prefix = torch_name((*block, "x"))[: -len(".x")]
    key = f"{prefix}.processor.{names[layer]}.{'weight' if leaf == 'kernel' else 'bias'}"
    out[key] = np.ascontiguousarray(value.T if leaf == "kernel" else value, np.float32)
  return out


def _custom_diffusion(workdir: Path, fmt: str, out: Path, base: Path) -> list[Path]:
  from persona_jax.methods import custom_diffusion as cd
  result = cd.load_result(_result(workdir, cd.RESULT_FILE))
  if fmt == "diffusers":
    from persona_jax.convert.files import write_safetensors
    state = custom_diffusion_processors(result.weights)
    path = out / f"{CUSTOM_DIFFUSION_FILE}.safetensors"
    write_safetensors(path, state)
    written = [path]
    try:
      import torch
    except ImportError:
      torch = None
    if torch is not None:          # the file diffusers' load_attn_procs(..., _pipeline=) takes
      attn1 = {k.replace("attn2.processor", "attn1.processor").rsplit(".processor.", 1)[0]
               + ".processor" for k in state}
      blob = {k: torch.from_numpy(v) for k, v in state.items()}
      blob.update({name: {} for name in attn1})
      tmp = out / f".{CUSTOM_DIFFUSION_FILE}.bin.tmp"
      torch.save(blob, tmp)
      tmp.replace(out / f"{CUSTOM_DIFFUSION_FILE}.bin")
      written.append(out / f"{CUSTOM_DIFFUSION_FILE}.bin")
    return written + _token_files(result, out)
  import dataclasses

  from persona_jax.pipeline import load_pipeline, save_pipeline
  pipe = load_pipeline(base)
  params, _, _ = cd.for_sampling(dataclasses.replace(result, concepts=[]), pipe)
  merged = save_pipeline(dataclasses.replace(pipe, params=params), out, overwrite=True)
  return [merged] + _token_files(result, out / "tokens")


def _e4t(workdir: Path, config: dict, out: Path, base: Path, timestep: int | None):
  """The tuned pipeline with offsets merged, and the embedding at `timestep` for the run's first
  image. Returns (paths, a record of the embedding)."""
  import dataclasses

  from persona_jax.convert.embedding_formats import write_diffusers_embedding
  from persona_jax.data.pipeline import example_subject_dir
  from persona_jax.data.sources import read_image_folder
  from persona_jax.methods import e4t
  from persona_jax.pipeline import load_pipeline, save_pipeline
  result = e4t.load_result(_result(workdir, e4t.RESULT_FILE))
  if result.config.phase != "tune":
    raise ConfigError(f"{workdir}: an e4t pre-training run has no subject to export; export an "
                      "e4t_tune run")
  pipe = load_pipeline(base)
  t = e4t.EXPORT_TIMESTEP if timestep is None else int(timestep)
  if not 0 <= t < pipe.scheduler_config.num_train_timesteps:
    raise ConfigError(f"--timestep {t}: must be in 0..{pipe.scheduler_config.num_train_timesteps - 1}")
  folder = config["data"].get("instance_dir") or example_subject_dir()
  image = read_image_folder(folder)[0].path
  sampling = e4t.for_sampling(result, pipe, image)
  resolution = int(result.meta.get("resolution", config["data"]["resolution"]))
  word = e4t.embedding_at(sampling, pipe, image, resolution, t)
  params = {k: sampling.params[k] for k in pipe.params}
  merged = save_pipeline(dataclasses.replace(pipe, params=params), out, overwrite=True)
  token = result.config.placeholder
  note = (f"E4T's embedding of {token} for {image.name} at timestep {t}; persona-jax sample --e4t "
          "recomputes it at every denoising step, diffusers keeps this one")
  path = write_diffusers_embedding({token: word[None]}, out / "e4t_embedding",
                                   metadata={"timestep": t, "image": str(image), "note": note})
  return [merged, path], {"token": token, "timestep": t, "image": str(image), "file": str(path),
                          "note": note}


def _ip_adapter(workdir: Path, out: Path) -> list[Path]:
  """The run's ip_adapter.safetensors (already the official layout) and its image encoder."""
  from persona_jax.methods import ip_adapter
  source = _result(workdir, ip_adapter.RESULT_FILE)
  encoder = ip_adapter.file_metadata(source).get("image_encoder")
  if not encoder or not Path(encoder).is_dir():
    raise ModelFileError(f"{source}: its image encoder folder ({encoder}) is gone; copy "
                         f"{source.name} and pass the encoder to load_ip_adapter yourself")
  path = out / ip_adapter.RESULT_FILE
  shutil.copyfile(source, path)
  encoder_out = out / "image_encoder"
  shutil.copytree(encoder, encoder_out, dirs_exist_ok=True)
  return [path, encoder_out]
