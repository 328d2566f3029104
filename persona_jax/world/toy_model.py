"""The toy-world base model, pre-trained from random initialization by our own code
(`persona-jax make-toy-model`). Stages, each resumable and skipped once done:

  world   WORKDIR/world: N rendered training scenes with one sampled caption each
          (metadata.jsonl), the folder the UNet stage trains on
  vae     WORKDIR/vae: an AutoencoderKL (32x32 -> 8x8x8) trained on fresh scenes every step with
          reconstruction MSE (the object's pixels weighted up) + a small KL; its scaling_factor
          is 1 / the measured latent std; vae/result.json holds the metric encoder's accuracy on
          its reconstructions (the ceiling of the base)
  init    WORKDIR/init: the pipeline to pre-train: the trained VAE, a freshly initialized UNet and
          CLIP text encoder (real 49408-token vocabulary), a zero-terminal-SNR v-prediction DDIM
          schedule with trailing spacing (SD's schedule keeps ~7% of the signal at its last
          step, which leaks exactly the colours this world tests)
The UNet and text encoder then train together through the ordinary `train` command
(configs/toy_pretrain.py: a full fine-tune of both with caption dropout), and last a CLIP image
encoder trains contrastively against that text encoder (MODEL/image_encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from persona_jax.convert.files import write_json
from persona_jax.errors import ConfigError
from persona_jax.world import scenes

log = logging.getLogger(__name__)

RESOLUTION = 32
LATENT_CHANNELS = 8
DIFFUSERS_VERSION = "0.42.1"


def toy_configs() -> dict:
  """Raw configs (diffusers/transformers JSON) of the toy pipeline: ~4.7M-param UNet on 8x8x8
  latents, a 64-wide 4-layer CLIP text encoder, a 3.8M-param 4x VAE with 8 latent channels (4
  lost the world's small shapes and stripes: the metric encoder recognized ~60% of the patterns
  in its reconstructions)."""
  unet = {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": RESOLUTION // 4, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      "block_out_channels": [64, 96, 128], "layers_per_block": 1, "norm_num_groups": 32,
      "cross_attention_dim": 64, "attention_head_dim": 4, "use_linear_projection": True,
      "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
  }
  vae = {
      "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
      "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
      "block_out_channels": [64, 128, 128], "layers_per_block": 1, "norm_num_groups": 32,
      "act_fn": "silu", "sample_size": RESOLUTION, "scaling_factor": 1.0, "force_upcast": True,
  }
  text_encoder = {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "projection_dim": 64,
      "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 77,
      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
      "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
      "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
  }
  scheduler = {
      "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
      "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
      "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
      "rescale_betas_zero_snr": True,
  }
  return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


# ---------------------------------------------------------------------------------------------
# world: the UNet stage's training folder

def world_scene(seed: int, k: int):
  """Training scene k of the SD 1.x base's world: (its sampled caption, paint) where paint() ->
  (uint8 image [32, 32, 3], the object's coverage float32 [32, 32])."""
  scene = scenes.sample_scene(seed, "train", k)
  return (scenes.caption(scene, np.random.default_rng([seed, k, 7])),
          lambda: (scenes.render(scene, RESOLUTION), scenes.coverage(scene, RESOLUTION)))


def write_world(folder: Path, num_images: int, seed: int = 0, progress: bool = True,
                draw=world_scene) -> Path:
  """Renders `num_images` training scenes (`draw(seed, k)`: caption, paint) into `folder`:
  NAME.png, the objects' coverage as the subject mask NAME.mask.png (the UNet stage's loss
  weights, `data.mask_loss_weight`) and metadata.jsonl. Resumable: files already written are
  kept and not painted again (scene k is the same whenever it is drawn); metadata.jsonl is
  written last, so a folder with it is complete (a folder written before masks existed gets
  them added)."""
  from PIL import Image
  folder = Path(folder)
  last = f"{num_images - 1:06d}"
  if (folder / "metadata.jsonl").is_file() and (folder / f"{last}.mask.png").is_file():
    return folder
  folder.mkdir(parents=True, exist_ok=True)

  def write_png(name, pixels):
    tmp = folder / f".{name}.tmp"
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(folder / name)

  rows = []
  for k in tqdm(range(num_images), desc="world images", unit="img", disable=not progress):
    name, mask_name = f"{k:06d}.png", f"{k:06d}.mask.png"
    text, paint = draw(seed, k)
    if not ((folder / name).is_file() and (folder / mask_name).is_file()):
      image, cover = paint()
      write_png(name, image)
      write_png(mask_name, np.round(cover * 255).astype(np.uint8))
    rows.append({"file_name": name, "text": text})
  if not (folder / "metadata.jsonl").is_file():
    tmp = folder / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(folder / "metadata.jsonl")
  return folder


# ---------------------------------------------------------------------------------------------
# vae

@dataclasses.dataclass(frozen=True)
class VAETraining:
  steps: int = 3000
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 100
  kl_weight: float = 1e-4          # on the per-element mean KL; MSE is a per-pixel mean
  object_weight: float = 4.0       # pixels the object covers count 1 + this in the MSE
  checkpoint_every: int = 250
  seed: int = 0


def vae_loss(vae, params, images, weights, rng, kl_weight: float):
  """(loss, metrics) of one batch: the weighted MSE of the reconstruction from a posterior sample
  (weights [B, H, W]: the object's pixels count more, the attributes this world tests live there)
  + KL. `mse` in the metrics is the plain per-pixel mean."""
  moments = vae.apply({"params": params}, images, method="encode")
  z = moments.sample(rng)
  recon = vae.apply({"params": params}, z, method="decode")
  err = jnp.mean(jnp.square(recon.astype(jnp.float32) - images), axis=-1)      # [B, H, W]
  weighted = jnp.sum(err * weights) / jnp.sum(weights)
  kl = 0.5 * jnp.mean(jnp.square(moments.mean) + jnp.exp(moments.logvar) - 1.0 - moments.logvar)
  return weighted + kl_weight * kl, {"mse": jnp.mean(err), "weighted_mse": weighted, "kl": kl}


def _vae_optimizer(t: VAETraining):
  schedule = optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps),
                                   optax.cosine_decay_schedule(t.lr, max(1, t.steps - t.warmup_steps), 0.1)],
                                  [t.warmup_steps])
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def world_images(seed: int, step: int, batch_size: int, object_weight: float = 0.0):
  """Batch `step` of fresh training scenes: (images in [-1, 1] float32 [B, 32, 32, 3], pixel
  weights 1 + object_weight * object coverage, float32 [B, 32, 32])."""
  images, _, scene_list = scenes.batch(seed, "train", step * batch_size, batch_size, RESOLUTION,
                                       captions=False)
  weights = 1.0 + object_weight * np.stack([scenes.coverage(sc, RESOLUTION) for sc in scene_list])
  return images.astype(np.float32) / 127.5 - 1.0, weights.astype(np.float32)


def train_vae(workdir: Path, config, t: VAETraining = VAETraining(), progress: bool = True):
  """Trains the VAE (resumably, checkpoints in workdir/checkpoints). Returns the params."""
  import orbax.checkpoint as ocp

  from persona_jax.models.vae import AutoencoderKL
  from persona_jax.models.components import init_params
  workdir = Path(workdir)
  vae = AutoencoderKL(config)
  tx = _vae_optimizer(t)
  params = init_params("vae", config, jax.random.PRNGKey(t.seed))
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    log.info("resuming the VAE from step %d", start)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, batch):
    images, weights = batch
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed + 1), state["step"])
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: vae_loss(vae, p, images, weights, rng, t.kl_weight), has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt": opt,
             "step": state["step"] + 1}, dict(metrics, loss=loss))

  state = run_steps(step_fn, state, lambda step: world_images(t.seed, step, t.batch_size, t.object_weight),
                    start=start, end=t.steps, total=t.steps, manager=manager,
                    metrics_path=workdir / "metrics.jsonl", desc="train vae",
                    checkpoint_every=t.checkpoint_every, progress=progress)
  return state["params"]


def run_steps(step_fn, state, batch_at, *, start: int, end: int, total: int, manager,
              metrics_path: Path, desc: str, checkpoint_every: int, lr=None,
              log_every: int = 25, progress: bool = True):
  """Steps start .. end-1 of a resumable pre-training stage: `state, metrics = step_fn(state,
  batch_at(step))`; every `log_every` steps (and at `end`) the window's mean metrics, `lr(step)`
  if given and sec_per_step are appended to `metrics_path`; an orbax checkpoint (`manager`)
  every `checkpoint_every` steps and at `end`. Returns the state."""
  import orbax.checkpoint as ocp
  log_file = open(metrics_path, "a", encoding="utf-8")
  bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress)
  window, last = [], time.perf_counter()
  try:
    for step in range(start, end):
      state, metrics = step_fn(state, batch_at(step))
      window.append(metrics)
      bar.update(1)
      done = step + 1
      if done % log_every == 0 or done == end:
        now = time.perf_counter()
        means = {k: float(np.mean([m[k] for m in jax.device_get(window)])) for k in window[0]}
        record = {"step": done, **means, **({"lr": float(lr(done))} if lr else {}),
                  "sec_per_step": (now - last) / len(window)}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()
                         if k in ("loss", "mse", "kl", "accuracy")})
        window, last = [], now
      if done % checkpoint_every == 0 or done == end:
        manager.save(done, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  finally:
    bar.close()
    log_file.close()
    manager.close()
  return state


def latent_std(vae, params, seed: int = 12345, n: int = 512) -> float:
  """The std of the posterior means over `n` held-out scenes (SD's scaling_factor is 1 / it)."""
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
  images, _, _ = scenes.batch(seed, "test", 0, n, RESOLUTION, captions=False)
  means = np.concatenate([np.asarray(encode(params, images[i: i + 64].astype(np.float32) / 127.5 - 1))
                          for i in range(0, n, 64)])
  return float(means.std())


def reconstruction_accuracy(vae, params, n: int = 400, seed: int = 1) -> dict[str, float]:
  """The VAE's ceiling on the base: the metric encoder's per-attribute accuracy on
  reconstructions (posterior mean, decoded) of `n` held-out scenes, and their MSE. A UNet on
  these latents can follow prompts no better than this."""
  from persona_jax.world import metric_encoder
  scene_list = metric_encoder.scene_batch(seed, "test", 0, n)
  images = np.stack([scenes.render(sc, RESOLUTION) for sc in scene_list]).astype(np.float32) / 127.5 - 1
  roundtrip = jax.jit(lambda p, x: vae.apply(
      {"params": p}, vae.apply({"params": p}, x, method="encode").mean, method="decode"))
  recon = np.concatenate([np.asarray(roundtrip(params, images[i: i + 100]), np.float32)
                          for i in range(0, n, 100)])
  config, metric_params = metric_encoder.load()
  _, predicted = metric_encoder.predict(config, metric_params,
                                        np.clip((recon + 1) * 127.5, 0, 255).round().astype(np.uint8))
  truth = metric_encoder.labels(scene_list)
  return {"mse": float(np.mean(np.square(recon - images))),
          **{k: float(np.mean(predicted[k] == truth[k])) for k in metric_encoder.HEADS}}


# ---------------------------------------------------------------------------------------------
# init: the pipeline the UNet stage starts from

def initial_pipeline(vae_params, scaling_factor: float, seed: int = 0):
  """The toy Pipeline: trained VAE (with its scaling factor), fresh UNet and text encoder."""
  from persona_jax.convert.diffusers_folder import Pipeline, model_index, parse_configs
  from persona_jax.models.components import init_params
  from persona_jax.tokenizer import shipped_tokenizer_dir
  raw = toy_configs()
  raw["vae"] = dict(raw["vae"], scaling_factor=scaling_factor)
  raw["model_index"] = model_index()
  configs = parse_configs(raw)
  rng = jax.random.PRNGKey(seed)
  params = {"vae": vae_params,
            "unet": init_params("unet", configs["unet_config"], jax.random.fold_in(rng, 1)),
            "text_encoder": init_params("text_encoder", configs["text_encoder_config"],
                                        jax.random.fold_in(rng, 2))}
  return Pipeline(**configs, params=params, tokenizer_dir=shipped_tokenizer_dir(), raw_configs=raw)


def build_base(workdir, *, num_images: int = 20000, vae: VAETraining = VAETraining(),
               start_from=None, grow_layers=None, progress: bool = True) -> Path:
  """Runs the world, vae and init stages (each skipped when done); returns WORKDIR/init.

  start_from: a toy pipeline folder (e.g. the shipped base, or an earlier sitting's snapshot) to
  continue pre-training from: its VAE, UNet and text encoder, in float32, become WORKDIR/init
  and the VAE stage is skipped. The UNet stage then starts a fresh optimizer and schedule.
  grow_layers: with start_from, the UNet's new layers per block (e.g. (2, 2, 1)): it is deepened
  without changing what it computes (models/unet_growth.py) and trains on from there.
  """
  from persona_jax.models.configs import VAEConfig
  from persona_jax.models.vae import AutoencoderKL
  from persona_jax.pipeline import save_pipeline
  if grow_layers is not None and start_from is None:
    raise ConfigError("--grow-layers deepens a trained UNet: give --start-from MODEL too")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_world(workdir / "world", num_images, progress=progress)
  init = workdir / "init"
  if (init / "model_index.json").is_file():
    return init
  if start_from is not None:
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
      pipe = load_toy_pipeline(start_from, Path(tmp))
      params = jax.tree.map(lambda a: np.asarray(a, np.float32), pipe.params)
      if grow_layers is not None:
        pipe = _deepened(pipe, params, grow_layers)
        params = pipe.params
      save_pipeline(dataclasses.replace(pipe, params=params), init, overwrite=True)
    log.info("continuing pre-training from %s%s", start_from,
             f" with {list(grow_layers)} layers per UNet block" if grow_layers else "")
    return init
  (workdir / "vae").mkdir(exist_ok=True)
  config = VAEConfig.from_dict(toy_configs()["vae"])
  params = train_vae(workdir / "vae", config, vae, progress=progress)
  std = latent_std(AutoencoderKL(config), params)
  ceiling = reconstruction_accuracy(AutoencoderKL(config), params)
  log.info("VAE latent std %.4f: scaling_factor %.4f; the metric encoder on its reconstructions "
           "of held-out scenes: %s", std, 1.0 / std,
           ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items()))
  write_json(workdir / "vae" / "result.json", {"latent_std": std, "scaling_factor": 1.0 / std,
                                              "steps": vae.steps, "reconstruction": ceiling})
  save_pipeline(initial_pipeline(params, 1.0 / std), init, overwrite=True)
  return init


def load_toy_pipeline(folder, scratch: Path):
  """A toy pipeline folder, a shipped one too (float16, no tokenizer files: copied into
  `scratch` with the shipped tokenizer added)."""
  import shutil

  from persona_jax.pipeline import load_pipeline
  from persona_jax.tokenizer import shipped_tokenizer_dir
  folder = Path(folder)
  if not (folder / "tokenizer").is_dir():
    folder = Path(shutil.copytree(folder, Path(scratch) / "model"))
    shutil.copytree(shipped_tokenizer_dir(), folder / "tokenizer")
  return load_pipeline(folder)


def _deepened(pipe, params: dict, layers):
  """`pipe` with `params` and its UNet deepened to `layers` per block (same function)."""
  from persona_jax.models.configs import UNetConfig
  from persona_jax.models.unet_growth import deepen
  raw, unet = deepen(pipe.raw_configs["unet"], params["unet"], layers)
  return dataclasses.replace(pipe, unet_config=UNetConfig.from_dict(raw),
                             raw_configs={**pipe.raw_configs, "unet": raw},
                             params={**params, "unet": unet})


def pretrain(workdir, *, num_images: int = 20000, vae: VAETraining = VAETraining(),
             unet_steps: int | None = None, batch_size: int | None = None,
             image_encoder=None, start_from=None, grow_layers=None, lr: float | None = None,
             progress: bool = True) -> dict:
  """The whole recipe: build_base, then the UNet + text encoder stage (configs/toy_pretrain.py)
  in WORKDIR/unet, whose result is WORKDIR/unet/model, then its image_encoder/. Every stage
  resumes or is skipped when done."""
  from persona_jax.train.config import load_config
  from persona_jax.train.config import run_config
  from persona_jax.train.loop import train
  workdir = Path(workdir)
  init = build_base(workdir, num_images=num_images, vae=vae, start_from=start_from,
                    grow_layers=grow_layers, progress=progress)
  c = load_config("toy_pretrain")
  c.model, c.data.instance_dir = str(init), str(workdir / "world")
  if unet_steps is not None:
    c.steps = unet_steps
  if batch_size is not None:
    c.batch_size = batch_size
  if lr is not None:
    c.optim.lr = lr
  result = train(run_config(c), workdir / "unet", progress=progress)
  model = workdir / "unet" / "model"
  if not (model / "image_encoder" / "config.json").is_file():
    result["outputs"].append(str(add_image_encoder(model, image_encoder)))
  return result


def snapshot(unet_workdir, out, step: int | None = None) -> Path:
  """A look at the UNet stage while it runs: the model at a checkpoint (the latest by default;
  the EMA weights, which are what the finished run writes) as a diffusers folder in OUT."""
  import orbax.checkpoint as ocp

  from persona_jax import tree
  from persona_jax.pipeline import load_pipeline, save_pipeline
  from persona_jax.train import checkpoint as ckpt
  unet_workdir = Path(unet_workdir)
  config = json.loads((unet_workdir / "config.json").read_text())
  manager = ckpt.make_manager(unet_workdir, keep=1000)
  step = step if step is not None else manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{unet_workdir / 'checkpoints'}: no checkpoint yet")
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  trained = state["ema"] if state.get("ema") is not None else state["trainable"]
  pipe = load_pipeline(config["model"])
  flat, new = tree.flatten(pipe.params), tree.flatten(jax.tree.map(np.asarray, trained))
  missing = sorted(set(new) - set(flat))
  if missing:
    raise ValueError(f"{unet_workdir}: checkpoint params not in the base model: {missing[:3]}")
  params = tree.unflatten({**flat, **new})
  save_pipeline(dataclasses.replace(pipe, params=params), out, overwrite=True)
  log.info("wrote the model at step %d of %s to %s", step, unet_workdir, out)
  return Path(out)


def ship(model_dir, dest=None) -> Path:
  """Writes a finished base into the package as the embedded default (`default_model.py`; `dest`
  another shipped base's folder, e.g. `shipped_xl_dir()`): float16 weights in the diffusers
  layout, `image_encoder/` included, without tokenizer files (the shipped tokenizer is added when
  the model is first copied to the user cache)."""
  import shutil
  import tempfile

  from persona_jax.convert.files import read_safetensors, write_safetensors
  from persona_jax.default_model import VERSION_FILE, shipped_base_dir
  from persona_jax.pipeline import load_pipeline, save_pipeline
  model_dir, dest = Path(model_dir), Path(dest) if dest is not None else shipped_base_dir()
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    staged = save_pipeline(load_pipeline(model_dir), Path(tmp) / "base", dtype=np.float16)
    for tokenizer in ("tokenizer", "tokenizer_2"):
      shutil.rmtree(staged / tokenizer, ignore_errors=True)
    if (model_dir / "image_encoder" / "config.json").is_file():
      shutil.copytree(model_dir / "image_encoder", staged / "image_encoder")
      for weights in (staged / "image_encoder").glob("*.safetensors"):
        write_safetensors(weights, {k: np.asarray(v, np.float16)
                                    for k, v in read_safetensors(weights).items()})
    if (model_dir / "image_encoder_training.json").is_file():
      shutil.copy2(model_dir / "image_encoder_training.json", staged)
    (staged / VERSION_FILE).write_text(weights_digest(staged) + "\n")
    if dest.exists():
      shutil.rmtree(dest)
    staged.rename(dest)
  size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
  log.info("shipped %s to %s (%.1f MB)", model_dir, dest, size / 1e6)
  return dest


def weights_digest(folder: Path) -> str:
  """12 hex digits of sha256 over a model folder's safetensors files (path and bytes)."""
  import hashlib
  h = hashlib.sha256()
  for f in sorted(Path(folder).rglob("*.safetensors")):
    h.update(f.relative_to(folder).as_posix().encode())
    h.update(f.read_bytes())
  return h.hexdigest()[:12]


def add_image_encoder(model_dir: Path, t=None) -> Path:
  """The image_encoder stage: a CLIP image encoder trained contrastively against the model's
  text encoder (world/toy_image_encoder.py), written into MODEL/image_encoder."""
  from persona_jax.pipeline import load_pipeline
  from persona_jax.world import toy_image_encoder as tie
  pipe = load_pipeline(model_dir)
  config, params, loss = tie.train_image_encoder(pipe, t or tie.ContrastiveTraining())
  accuracy = tie.retrieval_accuracy(pipe, config, params)
  log.info("image encoder: final loss %.4f, caption retrieval top-1 %.3f on held-out scenes",
           loss, accuracy)
  write_json(Path(model_dir) / "image_encoder_training.json",
             {"loss": loss, "retrieval_top1": accuracy})
  return tie.write_image_encoder(model_dir, config, params)
