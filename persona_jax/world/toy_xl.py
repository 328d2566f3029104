"""The toy SDXL base (`toy-xl`): SDXL's architecture at toy size, pre-trained by our own code on
the toy world including its identity scenes (`persona-jax make-toy-model --xl`).

What makes it SDXL: two text encoders (the first a CLIPTextModel read at its penultimate layer,
the second a CLIPTextModelWithProjection with gelu and "!" padding whose pooled, projected output
conditions the UNet), their hidden states concatenated into the cross-attention context, the
"text_time" added conditioning (the pooled text embedding and the 6 micro-conditioning time ids
through `add_embedding`), and a UNet level without attention. Stages, each resumable and skipped
once done:

  world   WORKDIR/world: N training scenes: 3 in 4 the SD 1.x base's scenes, 1 in 8 one identity,
          1 in 8 two identities side by side (world/identities.py; training identities only),
          masks = the objects' coverage
  init    WORKDIR/init: the shipped SD 1.x toy base (`start_from`) grown into SDXL's layout:
          - VAE: the same weights
          - UNet: the same weights; attn2's to_k/to_v get zero rows for the second encoder's
            features and `add_embedding.linear_2` starts at zero, so the added conditioning and
            the new encoder add nothing: given the SD 1.x context, it computes the SD 1.x UNet
          - text_encoder: the SD 1.x encoder plus one layer that starts as the identity. SDXL
            reads the penultimate hidden state without the final layer norm, where SD 1.x read
            the last one through it: no exact function-preserving start exists, so its 4 layers
            are distilled (`distill_text_encoder`) until their output matches the SD 1.x
            conditioning on the world's captions
          - text_encoder_2: fresh (32 wide, 4 layers, projection 32)
  unet    WORKDIR/unet: UNet and both text encoders trained together on the folder (v-prediction,
          min-SNR 5, object-weighted loss, caption dropout 0.1 with the empty caption's
          encoding, EMA 0.999, cosine lr), checkpoints every 250 steps; WORKDIR/unet/model is the
          EMA pipeline. The empty caption is encoded, not zeros, so the folder says
          force_zeros_for_empty_prompt false.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from persona_jax import tree
from persona_jax.world import identities, toy_model

log = logging.getLogger(__name__)

TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "projection_dim": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 0, "attention_dropout": 0.0, "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
TIME_EMBED_DIM = 16          # addition_time_embed_dim (SDXL: 256)


def xl_configs(sd1_raw: dict) -> dict:
  """Raw configs of toy-xl from the SD 1.x toy base's: its UNet, VAE and scheduler widened to
  SDXL's conditioning, its text encoder one layer deeper, a second text encoder."""
  te1 = dict(sd1_raw["text_encoder"], num_hidden_layers=sd1_raw["text_encoder"]["num_hidden_layers"] + 1)
  unet = dict(sd1_raw["unet"], cross_attention_dim=te1["hidden_size"] + TEXT_ENCODER_2["hidden_size"],
              addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
              projection_class_embeddings_input_dim=TEXT_ENCODER_2["projection_dim"] + 6 * TIME_EMBED_DIM)
  from persona_jax.convert.diffusers_folder import model_index
  return {"model_index": model_index(sd1_raw["scheduler"]["_class_name"], sdxl=True,
                                     force_zeros_for_empty_prompt=False),
          "unet": unet, "vae": sd1_raw["vae"], "text_encoder": te1,
          "text_encoder_2": dict(TEXT_ENCODER_2), "scheduler": sd1_raw["scheduler"]}


def grown_params(sd1_params: dict, configs: dict, seed: int = 0) -> dict:
  """toy-xl's starting params from the SD 1.x base's (module docstring, stage init)."""
  from persona_jax.models.components import init_params
  rng = jax.random.PRNGKey(seed)
  fresh_unet = tree.flatten(init_params("unet", configs["unet_config"], jax.random.fold_in(rng, 1)))
  old = tree.flatten(sd1_params["unet"])
  unet = {}
  for path, new in fresh_unet.items():
    if path.startswith("add_embedding/linear_2"):
      unet[path] = np.zeros(new.shape, np.float32)
    elif path.startswith("add_embedding"):
      unet[path] = np.asarray(new, np.float32)
    elif "attn2/to_k" in path or "attn2/to_v" in path:
      w = np.zeros(new.shape, np.float32)
      w[: old[path].shape[0]] = old[path]
      unet[path] = w
    else:
      unet[path] = np.asarray(old[path], np.float32)
  te1 = tree.flatten(sd1_params["text_encoder"])
  n = configs["text_encoder_config"].num_hidden_layers
  last = f"encoder/layers_{n - 2}/"
  for path in [p for p in te1 if p.startswith(last)]:
    grown = path.replace(last, f"encoder/layers_{n - 1}/")
    zero = "out_proj" in path or "fc2" in path              # the residual branch adds nothing
    te1[grown] = np.zeros_like(te1[path]) if zero else te1[path]
  te2 = init_params("text_encoder_2", configs["text_encoder_2_config"], jax.random.fold_in(rng, 2))
  return {"unet": tree.unflatten(unet), "vae": sd1_params["vae"], "text_encoder": tree.unflatten(te1),
          "text_encoder_2": jax.tree.map(lambda a: np.asarray(a, np.float32), te2)}


def distill_text_encoder(te1, te1_params, sd1_te, sd1_params, ids, steps: int = 1500,
                         batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
  """Trains `te1_params` so that te1's penultimate hidden state (what SDXL's UNet reads) matches
  the SD 1.x encoder's last hidden state through its final layer norm (what the SD 1.x UNet read),
  over all 77 positions of the captions `ids` [N, 77]. Returns (params, relative error before,
  after): the error is ||difference|| / ||target|| on the first 512 captions."""
  target_fn = jax.jit(lambda x: sd1_te.apply({"params": sd1_params}, x).last_hidden_state)

  def out(p, x):
    return te1.apply({"params": p}, x).hidden_states[-2]

  def rel_error(p):
    x = ids[:512]
    t = target_fn(x)
    return float(jnp.linalg.norm(out(p, x) - t) / jnp.linalg.norm(t))

  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
  state = (te1_params, tx.init(te1_params))

  @jax.jit
  def step(state, x):
    p, opt = state
    loss, grads = jax.value_and_grad(lambda q: jnp.mean(jnp.square(out(q, x) - target_fn(x))))(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  before = rel_error(te1_params)
  rng = np.random.default_rng(seed)
  for _ in tqdm(range(steps), desc="distill text encoder", unit="step"):
    state, _ = step(state, ids[rng.integers(len(ids), size=batch_size)])
  return state[0], before, rel_error(state[0])


def world_xl_scene(seed: int, k: int):
  """Training scene k of toy-xl's world: (caption, paint) as `toy_model.world_scene`'s.
  k % 8 < 6: the SD 1.x world's scene k; 6: one training identity; 7: two side by side."""
  kind = k % 8
  if kind < 6:
    return toy_model.world_scene(seed, k)
  scene = (identities.identity_scene if kind == 6 else identities.pair_scene)(seed, "train", k)
  return (identities.caption(scene, np.random.default_rng([seed, k, 7])),
          lambda: (identities.render(scene, toy_model.RESOLUTION),
                   identities.masks(scene, toy_model.RESOLUTION).sum(0)))


def build_xl_base(workdir, *, num_images: int = 40000, start_from=None, distill_steps: int = 1500,
                  progress: bool = True) -> Path:
  """The world and init stages (each skipped when done); returns WORKDIR/init. `start_from`: the
  SD 1.x toy base (default: the shipped one)."""
  import tempfile

  from persona_jax.convert.diffusers_folder import Pipeline, parse_configs
  from persona_jax.convert.files import write_json
  from persona_jax.default_model import shipped_base_dir
  from persona_jax.models.text_encoder import CLIPTextModel
  from persona_jax.pipeline import save_pipeline
  from persona_jax.tokenizer import load_tokenizer, tokenize, write_tokenizer
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  world = toy_model.write_world(workdir / "world", num_images, progress=progress, draw=world_xl_scene)
  init = workdir / "init"
  if (init / "model_index.json").is_file():
    return init
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    sd1 = toy_model.load_toy_pipeline(start_from or shipped_base_dir(), Path(tmp))
    sd1_params = jax.tree.map(lambda a: np.asarray(a, np.float32), sd1.params)
    raw = xl_configs(sd1.raw_configs)
    configs = parse_configs(raw)
    params = grown_params(sd1_params, configs)
    captions = [json.loads(line)["text"] for line in (world / "metadata.jsonl").read_text().splitlines()]
    ids = tokenize(load_tokenizer(sd1.tokenizer_dir), captions[:20000] + [""] * 64)
    te1, errors = CLIPTextModel(configs["text_encoder_config"]), {}
    params["text_encoder"], errors["before"], errors["after"] = distill_text_encoder(
        te1, params["text_encoder"], CLIPTextModel(sd1.text_encoder_config),
        sd1_params["text_encoder"], ids, steps=distill_steps)
    log.info("text encoder distilled: relative error of the UNet's context %.3f -> %.3f",
             errors["before"], errors["after"])
    tokenizer_2 = write_tokenizer(Path(tmp) / "tokenizer_2", "sd2")
    pipe = Pipeline(**configs, params=params, tokenizer_dir=sd1.tokenizer_dir, raw_configs=raw,
                    tokenizer_2_dir=tokenizer_2)
    staged = save_pipeline(pipe, Path(tmp) / "init")
    write_json(staged / "grown_from.json", {"start_from": str(start_from or "shipped SD 1.x toy base"),
                                            "distill_steps": distill_steps,
                                            "context_relative_error": errors})
    staged.rename(init)
  return init


@dataclasses.dataclass(frozen=True)
class XLTraining:
  steps: int = 4500
  batch_size: int = 64
  lr: float = 2e-4
  warmup_steps: int = 200
  ema_decay: float = 0.999
  min_snr_gamma: float = 5.0
  mask_loss_weight: float = 4.0      # the objects' latent pixels count 1 + this
  caption_dropout: float = 0.1
  checkpoint_every: int = 250
  seed: int = 0


def _folder_arrays(pipe, world: Path, cache: Path):
  """The world folder in memory: VAE moments of every image (cached in `cache`), loss weights at
  latent size, both tokenizers' ids, and the empty caption's ids."""
  from PIL import Image

  from persona_jax.tokenizer import load_tokenizer, tokenize
  rows = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]
  if not cache.is_file():
    encode = jax.jit(lambda x: pipe.vae.apply({"params": pipe.params["vae"]}, x, method="encode"))
    means, logvars, weights = [], [], []
    for i in tqdm(range(0, len(rows), 256), desc="encode world", unit="batch"):
      chunk = rows[i: i + 256]
      x = np.stack([np.asarray(Image.open(world / r["file_name"]).convert("RGB")) for r in chunk])
      m = encode(x.astype(np.float32) / 127.5 - 1)
      means.append(np.asarray(m.mean))
      logvars.append(np.asarray(m.logvar))
      cover = np.stack([np.asarray(Image.open(world / r["file_name"].replace(".png", ".mask.png")))
                        for r in chunk]).astype(np.float32) / 255
      f = cover.shape[1] // means[-1].shape[1]
      weights.append(cover.reshape(len(chunk), cover.shape[1] // f, f, -1, f).mean(axis=(2, 4))[..., None])
    tmp = cache.with_name(".latents.tmp.npz")
    np.savez(tmp, mean=np.concatenate(means), logvar=np.concatenate(logvars),
             cover=np.concatenate(weights))
    tmp.replace(cache)
  data = dict(np.load(cache))
  texts = [r["text"] for r in rows]
  tok_1, tok_2 = load_tokenizer(pipe.tokenizer_dir), pipe.tokenizer_2
  data["ids"], data["ids_2"] = tokenize(tok_1, texts), tokenize(tok_2, texts)
  data["empty"], data["empty_2"] = tokenize(tok_1, [""])[0], tokenize(tok_2, [""])[0]
  return data


def pretrain_xl(workdir, t: XLTraining = XLTraining(), *, num_images: int = 40000, start_from=None,
                distill_steps: int = 1500, until: int | None = None, progress: bool = True):
  """The whole recipe (module docstring), resumable; returns WORKDIR/unet/model. `until`: end
  this sitting after that step (checkpointed; returns None), the same call resumes."""
  import orbax.checkpoint as ocp

  from persona_jax.diffusion.conditioning import encode_sdxl_prompt
  from persona_jax.diffusion.losses import Objective
  from persona_jax.pipeline import load_pipeline
  workdir = Path(workdir)
  init = build_xl_base(workdir, num_images=num_images, start_from=start_from,
                       distill_steps=distill_steps, progress=progress)
  run = workdir / "unet"
  run.mkdir(exist_ok=True)
  if (run / "model" / "model_index.json").is_file():
    return run / "model"
  pipe = load_pipeline(init)
  models = pipe.models()
  scaling = pipe.vae_config.scaling_factor
  data = _folder_arrays(pipe, workdir / "world", run / "latents.npz")
  objective = Objective(pipe.scheduler_config, scaling, min_snr_gamma=t.min_snr_gamma)
  time_ids = jnp.asarray([[32, 32, 0, 0, 32, 32]], jnp.float32)
  trainable = {k: pipe.params[k] for k in ("unet", "text_encoder", "text_encoder_2")}
  schedule = optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps),
                                   optax.cosine_decay_schedule(t.lr, t.steps - t.warmup_steps)],
                                  [t.warmup_steps])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))
  state = {"params": trainable, "opt": tx.init(trainable),
           "ema": jax.tree.map(lambda a: jnp.array(a, copy=True), trainable),
           "step": jnp.zeros((), jnp.int32)}
  manager = ocp.CheckpointManager(run.absolute() / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    log.info("resuming toy-xl pre-training from step %d", start)

  def loss_fn(params, batch, rng):
    context, pooled = encode_sdxl_prompt(models, params, batch["ids"], batch["ids_2"])
    added = {"text_embeds": pooled, "time_ids": jnp.broadcast_to(time_ids, (pooled.shape[0], 6))}
    eps = jax.random.normal(jax.random.fold_in(rng, 1), batch["mean"].shape)
    latents = (batch["mean"] + jnp.exp(0.5 * batch["logvar"]) * eps) * scaling

    def predict(noisy, timesteps):
      out = models.unet.apply({"params": params["unet"]}, noisy, timesteps, context, added_cond=added)
      return out, None
    losses, metrics, _ = objective.per_example_loss(latents, predict, rng,
                                                    mask=1.0 + t.mask_loss_weight * batch["cover"])
    return jnp.mean(losses), metrics

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed), state["step"])
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: t.ema_decay * e + (1 - t.ema_decay) * p, state["ema"], params)
    return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, {"loss": loss}

  def batch_at(step: int) -> dict:
    rng = np.random.default_rng([t.seed, step])
    idx = rng.integers(len(data["ids"]), size=t.batch_size)
    drop = rng.random(t.batch_size) < t.caption_dropout
    return {"mean": data["mean"][idx], "logvar": data["logvar"][idx], "cover": data["cover"][idx],
            "ids": np.where(drop[:, None], data["empty"], data["ids"][idx]),
            "ids_2": np.where(drop[:, None], data["empty_2"], data["ids_2"][idx])}

  end = t.steps if until is None else min(until, t.steps)
  state = toy_model.run_steps(step_fn, state, batch_at, start=start, end=end, total=t.steps,
                              manager=manager, metrics_path=run / "metrics.jsonl",
                              desc="pre-train toy-xl", checkpoint_every=t.checkpoint_every,
                              lr=schedule, progress=progress)
  if end < t.steps:
    log.info("stopped after step %d of %d; run the same command to continue", end, t.steps)
    return None
  return write_model(pipe, state["ema"], run / "model")


def write_model(pipe, trained: dict, out: Path) -> Path:
  """`pipe` with the trained components (EMA weights) as a diffusers folder."""
  from persona_jax.pipeline import save_pipeline
  params = {**pipe.params, **jax.tree.map(np.asarray, trained)}
  return save_pipeline(dataclasses.replace(pipe, params=params), out, overwrite=True)


def snapshot(workdir, out, step: int | None = None) -> Path:
  """A look at the unet stage while it runs: the EMA weights of a checkpoint (the latest by
  default) as a diffusers folder in OUT."""
  import orbax.checkpoint as ocp

  from persona_jax.pipeline import load_pipeline
  workdir = Path(workdir)
  manager = ocp.CheckpointManager((workdir / "unet").absolute() / "checkpoints")
  step = step if step is not None else manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir / 'unet' / 'checkpoints'}: no checkpoint yet")
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return write_model(load_pipeline(workdir / "init"), state["ema"], Path(out))
