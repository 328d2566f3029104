"""The official FastComposer release (mit-han-lab/fastcomposer, `pytorch_model.bin`) as our result.

  persona-jax import-fastcomposer path/to/pytorch_model.bin --model /path/to/stable-diffusion-v1-5 \\
      --image-encoder /path/to/clip-vit-large-patch14 --out runs/fastcomposer_official --allow-pickle
  persona-jax sample --fastcomposer runs/fastcomposer_official --image einstein.png \\
      --prompt "a man <|image|> reading a book" --out out/

The file is the state dict of the reference's `FastComposerModel`: `unet.*` (diffusers names),
`image_encoder.vision_model.*` and `image_encoder.visual_projection.*` (transformers' CLIP),
`postfuse_module.{mlp1,mlp2}.{layernorm,fc1,fc2}.*` and `postfuse_module.layer_norm.*`, plus the
frozen `text_encoder.*` and `vae.*` (not read: the base model's). The result holds the UNet, the
whole image encoder and the fuse MLP (variant full, the reference's defaults: 4 subjects, the
first 10 steps text-only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from persona_jax import tree
from persona_jax.errors import ModelFileError
from persona_jax.methods import fastcomposer as fc
from persona_jax.methods.spec import Command

POSTFUSE = "postfuse_module."
FROZEN_PREFIXES = ("text_encoder.", "vae.")


def postfuse_to_params(state: dict, source: str) -> dict:
  """{"mlp1.fc1.weight": [out, in], ...} -> flat {fastcomposer/fuse/...: array}."""
  out = {}
  for key, w in state.items():
    parts = key.split(".")
    if len(parts) == 3 and parts[0] in ("mlp1", "mlp2") and parts[1] in ("layernorm", "fc1", "fc2"):
      module, layer, leaf = parts
    elif len(parts) == 2 and parts[0] == "layer_norm":
      module, layer, leaf = None, parts[0], parts[1]
    else:
      raise ModelFileError(f"{source}: unexpected tensor '{POSTFUSE}{key}'")
    norm = layer in ("layernorm", "layer_norm")
    name = {"weight": "scale" if norm else "kernel", "bias": "bias"}.get(leaf)
    if name is None:
      raise ModelFileError(f"{source}: unexpected tensor '{POSTFUSE}{key}'")
    value = np.asarray(w, np.float32)
    path = "/".join(p for p in (f"{fc.FASTCOMPOSER}/fuse", module, layer, name) if p)
    out[path] = value.T if name == "kernel" else value
  return out


def import_official(checkpoint, model_dir, image_encoder_dir, out_dir, *,
                    allow_pickle: bool = False) -> Path:
  """Writes OUT/fastcomposer.safetensors from the official release's file (see the module
  docstring); `model_dir` is the base model's diffusers folder (SD 1.5; only its UNet config is
  read), `image_encoder_dir` the CLIP image encoder folder the release was trained from
  (openai/clip-vit-large-patch14). Returns the result's path."""
  from persona_jax.convert import diffusers as convert
  from persona_jax.convert.files import read_weights, write_safetensors
  from persona_jax.image_encoder import abstract_params as image_abstract
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.configs import UNetConfig, read_json
  from persona_jax.models.components import abstract_params
  checkpoint = Path(checkpoint)
  if not checkpoint.is_file():
    raise ModelFileError(f"{checkpoint}: FastComposer checkpoint not found")
  state, source = read_weights(checkpoint.parent, checkpoint.name.split(".")[0], None, allow_pickle)
  groups = {"unet.": {}, "image_encoder.": {}, POSTFUSE: {}}
  for key, w in state.items():
    prefix = next((p for p in groups if key.startswith(p)), None)
    if prefix is not None:
      groups[prefix][key[len(prefix):]] = w
    elif not key.startswith(FROZEN_PREFIXES):
      raise ModelFileError(f"{source}: unexpected tensor '{key}' (not a FastComposerModel state "
                           "dict: unet., image_encoder., postfuse_module., text_encoder., vae.)")
  if not groups[POSTFUSE]:
    raise ModelFileError(f"{source}: no {POSTFUSE}* tensors; not a FastComposer checkpoint")
  unet_config = UNetConfig.from_dict(read_json(Path(model_dir) / "unet" / "config.json"),
                                     str(Path(model_dir) / "unet" / "config.json"))
  unet = convert.state_dict_to_params(groups["unet."], abstract_params("unet", unet_config),
                                      source=f"{source} (unet.)", dtype=np.float32)
  clip_config, _ = load_image_encoder(image_encoder_dir)
  if not clip_config.with_projection:
    raise ModelFileError(f"{image_encoder_dir}: FastComposer reads visual_projection; pass a "
                         "CLIPVisionModelWithProjection folder")
  image = convert.state_dict_to_params(groups["image_encoder."], image_abstract(clip_config),
                                       source=f"{source} (image_encoder.)", dtype=np.float32,
                                       adapt=convert.image_encoder_adapt,
                                       ignore=convert.text_encoder_ignore)
  fuse = postfuse_to_params(groups[POSTFUSE], source)
  text_width = int(read_json(Path(model_dir) / "text_encoder" / "config.json")["hidden_size"])
  want = text_width + clip_config.projection_dim
  got = fuse.get(f"{fc.FASTCOMPOSER}/fuse/mlp1/fc1/kernel", np.zeros((0, 0))).shape[0]
  if got != want:
    raise ModelFileError(f"{source}: postfuse_module.mlp1.fc1 reads {got} features; this text "
                         f"encoder ({text_width}) and image encoder ({clip_config.projection_dim}) "
                         f"give {want}")
  flat = {**tree.flatten({"unet": unet, "image_encoder": image}), **fuse}
  options = dataclasses.asdict(fc.FastComposerConfig(image_encoder=str(Path(image_encoder_dir).absolute())))
  path = Path(out_dir) / fc.RESULT_FILE
  write_safetensors(path, {p: np.asarray(v, np.float32) for p, v in flat.items()}, {
      "format": fc.FORMAT, "base_model": str(Path(model_dir).absolute()),
      "image_encoder": str(Path(image_encoder_dir).absolute()), "resolution": "512",
      "source": str(checkpoint), "method": json.dumps(options)})
  return path


def add_arguments(p) -> None:
  """The flags of `persona-jax import-fastcomposer`."""
  p.add_argument("checkpoint", type=Path, help="the release's pytorch_model.bin (or .safetensors)")
  p.add_argument("--model", required=True,
                 help="the base model it was trained from (a Stable Diffusion 1.5 diffusers folder)")
  p.add_argument("--image-encoder", required=True, type=Path, metavar="DIR",
                 help="the CLIP image encoder it was trained from: a CLIPVisionModelWithProjection "
                      "folder of openai/clip-vit-large-patch14")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.add_argument("--allow-pickle", action="store_true", help="read a .bin file (trusted only)")


def run(args) -> int:
  from persona_jax.default_model import resolve_model
  print(import_official(args.checkpoint, resolve_model(args.model), args.image_encoder, args.out,
                        allow_pickle=args.allow_pickle))
  return 0


COMMAND = Command("import-fastcomposer", "the official FastComposer release (pytorch_model.bin) as "
                  "a result `sample --fastcomposer OUT` reads", add_arguments, run)
