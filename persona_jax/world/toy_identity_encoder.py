"""The toy world's identity encoder: the stand-in for ArcFace, used through `face.recognition`.

A small CNN embeds an aligned 32x32 crop of one identity (`world.identities`) into 512 raw
numbers, trained with ArcFace's additive angular margin loss (logits s * cos(theta + m) for the
true identity, s * cos(theta) for the others) over the 1000 training identities only. Its
alignment is insightface's: the 5 keypoints go onto `TEMPLATE`, the identity template
`identities.KEYPOINT_TEMPLATE` scaled to a 12-pixel radius about the crop's centre.

Training data is a pool rendered once: `views` scenes of every training identity (any size,
pose, position, background), aligned with keypoints jittered as a detector's would be; each
step augments its batch as generations degrade images (`metric_encoder.augment`). The pool and
the batches are functions of the seed, so a resumed run is the uninterrupted one.

Verification (`verification_accuracy`): pairs of scenes of the same identity and of two
different identities, the cosine of their embeddings against a threshold that
`choose_threshold` picks on training identities' pairs (new scenes), never on the held-out ones.
`python scripts/make_toy_identity_encoder.py` remakes the shipped assets/toy_identity_encoder/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persona_jax.face import align
from persona_jax.face import toy_network
from persona_jax.face.recognizer import Recognizer, cosine
from persona_jax.face.toy_network import INPUT_SIZE, EncoderConfig, IdentityEncoder
from persona_jax.world import identities

RADIUS_PX = 12.0
TEMPLATE = ((INPUT_SIZE - 1) / 2 + RADIUS_PX * identities.KEYPOINT_TEMPLATE).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """ArcFace training over the pool (margin and scale as ArcFace's, for 1000 classes)."""
  steps: int = 2000
  batch_size: int = 128
  lr: float = 2e-3
  weight_decay: float = 5e-4
  warmup_steps: int = 150
  margin: float = 0.3
  scale: float = 30.0
  views: int = 40                   # pool scenes per training identity
  jitter: float = 0.3               # keypoint noise (pixels of the 32x32 scene)
  seed: int = 0


def face_keypoints(scene, size: int = 32) -> np.ndarray:
  """float32 [n, 5, 2]: the scene's keypoints, rendered at `size`, in `face.align`'s pixel
  convention (insightface's: pixel centres at whole numbers)."""
  return identities.keypoints(scene, size) - 0.5


def aligned_views(who_list, views: int, seed: int, split: str, jitter: float = 0.0,
                  detector=None) -> np.ndarray:
  """uint8 [len(who_list), views, 32, 32, 3]: scenes 0..views-1 of each identity, aligned (with
  keypoint noise of `jitter` pixels, drawn from the seed). Aligned by the scenes' true keypoints,
  or with `detector` (a `face.detection.FaceDetector`-like, e.g. `toy_face_detector`) by those
  of its first detection in the rendered image; all zeros where it finds none."""
  out = np.zeros((len(who_list), views, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
  for i, who in enumerate(who_list):
    noise = np.random.default_rng([seed, 7, who.index]).normal(0, 1, (views, 5, 2)) * jitter
    for v in range(views):
      scene = identities.identity_scene(seed, split, v, who=who)
      image = identities.render(scene)
      if detector is None:
        points = face_keypoints(scene)[0]
      else:
        found = detector.detect(image)
        if not len(found):
          continue
        points = found.keypoints[0]
      out[i, v] = align.norm_crop(image, points + noise[v], INPUT_SIZE, TEMPLATE)
  return out


def training_pool(config: TrainConfig, num_identities: int = identities.NUM_TRAIN):
  """(crops uint8 [n * views, 32, 32, 3], labels int32 [n * views]): the training pool of
  identities 0..n-1."""
  crops = aligned_views([identities.identity(k) for k in range(num_identities)], config.views,
                        config.seed, "train", config.jitter)
  return crops.reshape(-1, *crops.shape[2:]), np.repeat(np.arange(num_identities, dtype=np.int32),
                                                        config.views)


def arcface_loss(embeddings, centres, labels, margin: float, scale: float):
  """ArcFace's loss of raw embeddings [B, D] against class centres [D, C] for int labels [B]:
  cross-entropy of s * cos(theta + m) at the label and s * cos(theta) elsewhere (insightface's
  fallback cos - m sin(m) where theta + m would pass pi). Returns (loss, accuracy)."""
  e = embeddings / (jnp.linalg.norm(embeddings, axis=-1, keepdims=True) + 1e-6)
  w = centres / (jnp.linalg.norm(centres, axis=0, keepdims=True) + 1e-6)
  cos = jnp.clip(e @ w, -1 + 1e-6, 1 - 1e-6)                              # [B, C]
  one_hot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
  true = jnp.sum(cos * one_hot, axis=-1)
  moved = true * np.cos(margin) - jnp.sqrt(1 - true ** 2) * np.sin(margin)
  moved = jnp.where(true > np.cos(np.pi - margin), moved, true - np.sin(np.pi - margin) * margin)
  logits = scale * (cos + one_hot * (moved - true)[:, None])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(cos, -1) == labels)


def init(config: EncoderConfig, num_classes: int, seed: int = 0):
  """{"encoder": encoder params, "centres": [embedding, num_classes]}."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  encoder = IdentityEncoder(config).init(k1, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
  centres = jax.random.normal(k2, (config.embedding, num_classes)) / np.sqrt(config.embedding)
  return {"encoder": encoder, "centres": centres}


def make_optimizer(config: TrainConfig):
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                                max(config.steps, config.warmup_steps + 1),
                                                config.lr * 0.01)
  return optax.chain(optax.clip_by_global_norm(5.0),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def train_step(params, opt, crops, labels, rng, *, model, tx, config: TrainConfig):
  """One ArcFace step on a batch of aligned crops (augmented here): (params, opt, metrics)."""
  from persona_jax.world.metric_encoder import augment
  x = augment(rng, crops.astype(jnp.float32))

  def loss_fn(p):
    return arcface_loss(model.apply({"params": p["encoder"]}, x), p["centres"], labels,
                        config.margin, config.scale)
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt, {"loss": loss, "accuracy": accuracy}


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """The pool rows of `step`: epochs are seeded permutations, walked in order."""
  per_epoch = n // batch_size
  epoch, k = divmod(step, per_epoch)
  return np.random.default_rng([seed, 11, epoch]).permutation(n)[k * batch_size:(k + 1) * batch_size]


def train(workdir, config: TrainConfig = TrainConfig(), encoder: EncoderConfig = EncoderConfig(),
          pool=None, log=print, log_every: int = 10, checkpoint_every: int = 250,
          progress: bool = True):
  """Trains an identity encoder; returns {"encoder": params, "centres": [D, C]}. The loss and
  accuracy go to WORKDIR/metrics.jsonl every `log_every` steps and the state to
  WORKDIR/checkpoints every `checkpoint_every` steps (`toy_model.run_steps`: a rerun resumes).
  `pool`: (crops, labels) instead of `training_pool(config)`."""
  import orbax.checkpoint as ocp

  from persona_jax.world.toy_model import run_steps
  t0 = time.perf_counter()
  if pool is None:
    pool = training_pool(config)
    log(f"rendered the pool: {len(pool[0])} aligned crops ({time.perf_counter() - t0:.0f} s)")
  crops, labels = jnp.asarray(pool[0]), jnp.asarray(pool[1])
  num_classes = int(np.max(pool[1])) + 1
  model, tx = IdentityEncoder(encoder), make_optimizer(config)
  params = init(encoder, num_classes, config.seed)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  base = jax.random.PRNGKey(config.seed)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, index):
    params, opt, metrics = train_step(state["params"], state["opt"], crops[index], labels[index],
                                      jax.random.fold_in(base, state["step"]), model=model, tx=tx,
                                      config=config)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    log(f"resuming from step {start} ({workdir / 'checkpoints'})")
  state = run_steps(step_fn, state,
                    lambda k: batch_indices(config.seed, k, config.batch_size, len(pool[1])),
                    start=start, end=config.steps, total=config.steps, manager=manager,
                    metrics_path=workdir / "metrics.jsonl", desc="train identity encoder",
                    checkpoint_every=checkpoint_every, log_every=log_every, progress=progress)
  return state["params"]


def recognizer(encoder_params, config: EncoderConfig = EncoderConfig(), threshold=None,
               info=None) -> Recognizer:
  """The toy `Recognizer` over encoder params, with this world's template."""
  return toy_network.recognizer(encoder_params, config, TEMPLATE, threshold, info)


def _pair_scores(rec: Recognizer, split: str, who: list, views: int, n_pairs: int, seed: int,
                 look_alike: bool = False, detector=None):
  """(cosines [n_pairs], same [n_pairs] bool): half same-identity pairs of different scenes,
  half pairs of two different identities (`look_alike`: of the same class and look, told apart
  by mark and proportions only), over `views` scenes of each identity in `who`, aligned by their
  true keypoints or `detector`'s (`aligned_views`; a scene where it finds nothing scores 0)."""
  crops = aligned_views(who, views, seed, split, detector=detector)   # [n, views, S, S, 3]
  emb = rec.embed(crops.reshape(-1, *crops.shape[2:])).reshape(len(who), views, -1)
  if detector is not None:
    emb = np.where(crops.any(axis=(2, 3, 4))[..., None], emb, 0.0)
  rng = np.random.default_rng([seed, 13])
  n_same = n_pairs // 2
  same = [(i, a, i, b) for i in range(len(who)) for a in range(views) for b in range(a + 1, views)]
  same = np.asarray(same)[rng.choice(len(same), n_same, replace=len(same) < n_same)]
  if look_alike:
    twins = np.asarray([(i, j) for i in range(len(who)) for j in range(i + 1, len(who))
                        if (who[i].cls, who[i].look) == (who[j].cls, who[j].look)])
    if not len(twins):
      raise ValueError(f"no two of the {len(who)} identities share class and look")
    i, j = twins[rng.integers(0, len(twins), n_pairs - n_same)].T
  else:
    i = rng.integers(0, len(who), n_pairs - n_same)
    j = (i + rng.integers(1, len(who), len(i))) % len(who)
  other = np.stack([i, rng.integers(0, views, len(i)), j, rng.integers(0, views, len(i))], 1)
  pairs = np.concatenate([same, other])
  scores = cosine(emb[pairs[:, 0], pairs[:, 1]], emb[pairs[:, 2], pairs[:, 3]])
  return scores, np.arange(len(pairs)) < n_same


def best_threshold(scores, same) -> tuple[float, float]:
  """(threshold, accuracy): the cosine threshold that classifies the pairs best ("same" when
  score > threshold), midway between neighbouring scores."""
  order = np.argsort(scores)
  s, y = np.asarray(scores)[order], np.asarray(same)[order]
  # Threshold below sorted score k: pairs k.. called same; right = different below + same above.
  right = np.concatenate([[0], np.cumsum(~y)]) + np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
  k = int(np.argmax(right))
  cut = s[0] - 1e-3 if k == 0 else s[-1] + 1e-3 if k == len(s) else 0.5 * (s[k - 1] + s[k])
  return float(cut), float(right[k] / len(s))


def choose_threshold(rec: Recognizer, n_pairs: int = 3000, views: int = 6, seed: int = 2,
                     num_identities: int = 300) -> float:
  """The best threshold on pairs of training identities (the first `num_identities`) in new
  scenes (seed unlike the pool's)."""
  who = [identities.identity(k) for k in range(num_identities)]
  return best_threshold(*_pair_scores(rec, "train", who, views, n_pairs, seed))[0]


def verification_accuracy(rec: Recognizer, n_pairs: int = 3000, views: int = 6, seed: int = 1,
                          threshold: float | None = None, split: str = "held_out",
                          num_identities: int | None = None, look_alike: bool = False,
                          detector=None) -> dict:
  """Verification on `split`'s identities (the first `num_identities`; default all): accuracy at
  `threshold` (default the recognizer's), the best threshold on these pairs and its accuracy
  (`look_alike`: different identities share class and look; `detector`: both sides aligned by
  its keypoints instead of the true ones, `_pair_scores`)."""
  lo = identities.NUM_TRAIN if split == "held_out" else 0
  n = num_identities or (identities.NUM_HELD_OUT if split == "held_out" else identities.NUM_TRAIN)
  scores, same = _pair_scores(rec, split, [identities.identity(lo + k) for k in range(n)], views,
                              n_pairs, seed, look_alike, detector)
  threshold = rec.threshold if threshold is None else threshold
  cut, best = best_threshold(scores, same)
  return {"pairs": int(len(scores)), "threshold": threshold,
          "accuracy": None if threshold is None else float(np.mean((scores > threshold) == same)),
          "best_accuracy": best, "best_threshold": cut,
          "same_mean": float(scores[same].mean()), "different_mean": float(scores[~same].mean())}


def save(folder, encoder_params, config: EncoderConfig = EncoderConfig(), threshold=None,
         facts=None) -> Path:
  """`toy_network.save` with this world's template."""
  return toy_network.save(folder, encoder_params, config, TEMPLATE, threshold, facts)


def make(out, *, steps: int = TrainConfig.steps, workdir=None, plot=None, log=print) -> dict:
  """Trains (resuming from WORKDIR), picks the threshold on training identities, measures
  held-out verification, and saves to OUT; with `plot`, the loss curve as a PNG there."""
  t0 = time.perf_counter()
  config = TrainConfig(steps=steps)
  if workdir is None:
    import tempfile
    workdir = tempfile.mkdtemp(prefix="toy_identity_encoder-")
  params = train(workdir, config, log=log)
  train_seconds = time.perf_counter() - t0
  rec = recognizer(params["encoder"])
  threshold = choose_threshold(rec)
  result = verification_accuracy(rec, threshold=threshold)
  look_alike = verification_accuracy(rec, threshold=threshold, look_alike=True)
  log(f"held-out verification: {json.dumps(result)}\nlook-alike pairs: {json.dumps(look_alike)}")
  facts = {"training": {**dataclasses.asdict(config), "identities": identities.NUM_TRAIN,
                        "loss": "arcface", "seconds": round(train_seconds),
                        "make_seconds": round(time.perf_counter() - t0)},
           "verification": {**result, "split": "held_out", "views": 6, "seed": 1,
                            "threshold_from": "training identities 0..299, scenes of seed 2"},
           "verification_look_alike": look_alike}
  save(out, params["encoder"], threshold=threshold, facts=facts)
  if plot:
    from persona_jax.plots import loss_curve
    loss_curve(workdir, plot, keys=("loss",), window=10, log_y=True)
  return facts
