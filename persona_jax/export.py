"""`persona-jax export WORKDIR --format FORMAT --out DIR`: a training run's result in the format
another tool reads (formats.md 4). Which formats fit is the method's (its registry entry,
`MethodSpec.exports`; the writers live in the method modules):

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
  photomaker          official    OUT/photomaker.safetensors (the official flattened keys,
                                  id_encoder.* and lora_weights.*) and, when torch is installed,
                                  OUT/photomaker-v1.bin / -v2.bin in the released files' pickled
                                  layout: the official `load_photomaker_adapter` reads either
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
base model, the method config, the files and what the method adds (E4T: its embedding).
"""

from __future__ import annotations

from pathlib import Path

from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.registry import METHODS, read_run_config, spec
from persona_jax.methods.spec import ExportRequest

ALL_FORMATS = tuple(dict.fromkeys(f for s in METHODS.values() for f in s.exports))


def read_run(workdir: Path) -> dict:
  """WORKDIR/config.json (the resolved run config, with today's keys)."""
  from persona_jax.train.config import upgrade
  config = read_run_config(workdir)
  if config is None:
    raise ModelFileError(f"{workdir}: no config.json; export takes a `persona-jax train` workdir")
  return upgrade(config)


def export_options() -> dict:
  """Every method's export options by name (one flag each: `--timestep`, ...)."""
  out = {}
  for s in METHODS.values():
    for option in s.export_options:
      out.setdefault(option.name, option)
  return out


def export(workdir, fmt: str, out, options=None) -> list[Path]:
  """Writes the run's result in `fmt` into the folder `out` (created); returns the paths.
  `options`: {name: value} of the method's `export_options` (e.g. E4T's `timestep`)."""
  from persona_jax.convert.files import write_json
  from persona_jax.default_model import resolve_model
  from persona_jax.workdir_lock import check_not_running
  workdir, out, options = Path(workdir), Path(out), dict(options or {})
  check_not_running(workdir, "export")
  result_file.check_current(workdir)
  config = read_run(workdir)
  method = spec(config["method"]["name"])
  if fmt not in method.exports:
    fits = ", ".join(method.exports) or "nothing yet"
    raise ConfigError(f"--format {fmt}: a {method.name} run exports as {fits}"
                      + ("" if fmt in ALL_FORMATS else f" (formats: {', '.join(ALL_FORMATS)})"))
  own = {o.name for o in method.export_options}
  for name in sorted(set(options) - own):
    raise ConfigError(f"--{name.replace('_', '-')}: not an export option of a {method.name} run"
                      + (f" (its options: {', '.join(sorted(own))})" if own else ""))
  base = resolve_model(config["model"])
  if not (workdir / method.result.file).exists():
    raise ModelFileError(f"{workdir}: no {method.result.file}; the run has not finished (run the "
                         "same `train` command again to complete it)")
  result = method.load(workdir)
  out.mkdir(parents=True, exist_ok=True)
  written, extra = method.exports[fmt](ExportRequest(workdir, result, config, out, base, options))
  record = {"run": str(workdir.absolute()), "base_model": str(base), "method": config["method"],
            "format": fmt, "step": result_file.recorded_step(workdir),
            "files": [str(p) for p in written], **extra}
  write_json(out / "export.json", record)
  return written
