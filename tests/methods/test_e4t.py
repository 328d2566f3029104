"""E4T on the training core: the method test bar of DESIGN.md section 5 for both phases (domain
pre-training on the example subject's 4 images, tuning on one image from that state), the
encoder branch on its own, the per-step conditioning at sampling, the result, `sample --e4t` and
the diffusers export. A tiny random CLIP image encoder (4 layers of width 16, 16x16 images)
stands in for the toy world's."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from persona_jax import ConfigError, tree
from persona_jax.cli import main
from persona_jax.data.pipeline import make_iterator
from persona_jax.methods import e4t
from persona_jax.data.batch import CLIP_PIXELS
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import (_merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh,
                        write_image_encoder)

TRANSFORMERS = ["down_blocks_0/attentions_0", "up_blocks_1/attentions_0",
                "up_blocks_1/attentions_1", "mid_block/attentions_0"]
OFFSETS = [f"e4t/offsets/unet/{t}/transformer_blocks_0/attn{i}/to_{m}/{f}"
           for t in TRANSFORMERS for i in (1, 2) for m in "qkv" for f in "ab"]
ENCODER = [f"e4t/encoder/{layer}/{leaf}"
           for layer in ("unet_embed_0", "unet_embed_2", "feature_linear", "first_linears_0",
                         "first_linears_1", "final_linear")
           for leaf in ("kernel", "bias")]


def write_model(folder):
  """The sd1 preset with one layer per block (half the UNet: E4T's tests are compile-bound)."""
  import tempfile
  from pathlib import Path

  from persona_jax import random_model as rm
  from persona_jax.convert.diffusers_folder import Pipeline, parse_configs
  from persona_jax.models.components import abstract_params
  from persona_jax.pipeline import save_pipeline
  from persona_jax.tokenizer import write_tokenizer
  raw = rm.preset_configs("sd1")
  raw["unet"]["layers_per_block"] = 1
  configs = parse_configs(raw)
  rng = np.random.default_rng(0)
  params = {name: rm.random_params(abstract_params(name, configs[f"{name}_config"]), rng)
            for name in ("unet", "text_encoder", "vae")}
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = write_tokenizer(Path(tmp) / "tokenizer", "sd1")
    return save_pipeline(Pipeline(**configs, params=params, tokenizer_dir=tokenizer,
                                  raw_configs=raw), folder)


def e4t_config(model_dir, encoder_dir, **overrides):
  """Pre-training on the example subject, 32px, batch 2, one warm-up step (lr 0 at step 0)."""
  values = dict(
      model=str(model_dir),
      method=dict(name="e4t", phase="pretrain", class_word="ball", image_encoder=str(encoder_dir)),
      data=dict(caption_source="templates", prompt="*s", templates="object", resolution=32),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("e4t_model") / "model")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return write_image_encoder(tmp_path_factory.mktemp("image_encoder"))


@pytest.fixture(scope="module")
def pre(model_dir, encoder_dir):
  return loop.build(e4t_config(model_dir, encoder_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def pre_trajectory(pre):
  return fixed_batch_trajectory(pre, steps=4)


@pytest.fixture(scope="module")
def pre_state(pre, pre_trajectory, tmp_path_factory):
  """An e4t_pretrain workdir's result: the pre-training trajectory's trained state."""
  workdir = tmp_path_factory.mktemp("e4t_pre")
  loop.write_outputs(pre, pre_trajectory["trained"], workdir)
  return workdir


@pytest.fixture(scope="module")
def tune(model_dir, encoder_dir, pre_state):
  config = e4t_config(model_dir, encoder_dir,
                      method=dict(phase="tune", pretrained=str(pre_state), embedding_reg=1e-4),
                      data=dict(num_images=1, center_crop=False, random_zoom=1.25),
                      optim=dict(lr=0.05))       # plain SGD in `tune_trajectory`
  return loop.build(config, mesh=one_device_mesh())


@pytest.fixture(scope="module")
def tune_trajectory(tune):
  """With plain SGD: AdamW over every UNet leaf doubles the step's compile time, and the
  optimizer is not what is tested here (DreamBooth's tests train the whole UNet with it)."""
  import dataclasses

  import optax
  return fixed_batch_trajectory(dataclasses.replace(tune, tx=optax.sgd(tune.schedule)))


@pytest.fixture(scope="module")
def tuned(tune):
  """A stand-in for a tuned state (every leaf moved), without compiling the tuning step."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(np.float32),
                      jax.device_get(tune.trainable))


def test_trainable_sets_are_literal(pre, tune):
  assert set(tree.paths(pre.trainable)) == set(ENCODER + OFFSETS)
  unet = {f"unet/{p}" for p in tree.paths(pre.pipe.params["unet"])}
  assert set(tree.paths(tune.trainable)) == set(ENCODER + OFFSETS) | unet
  assert set(pre.frozen) == {"unet", "text_encoder", "image_encoder"}     # VAE moments cached
  assert set(tune.frozen) == {"text_encoder", "image_encoder", "vae"}     # random crops: encoded
  assert pre.method.tokens.added == ("*s",)


@pytest.fixture(scope="module")
def probe(pre):
  """One compiled program on the first pre-training batch with the initial params (three UNet
  feature passes): the conditioning with the branch off (s = 0) and the base's; the word for
  rows (image 0, z 0, t 10), (image 1, z 1, t 10), (image 0, z 0, t 900), (image 0, z 0, t 10);
  the conditioning as the sampler uses it for one prompt and image at two latents."""
  import dataclasses
  cond = pre.method.conditioning
  off = dataclasses.replace(cond, scale=0.0)
  params = pre.method.params.apply(pre.frozen, pre.trainable)
  batch = jax.tree.map(jnp.asarray, next(make_iterator(pre.dataset)))
  noisy = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))

  @jax.jit
  def run(params, batch):
    m = pre.models
    out = {}
    kwargs, terms = off.at(m, params, off.prepare(m, params, batch), noisy,
                           jnp.asarray([10, 700]), None)
    out["off"] = kwargs["encoder_hidden_states"]
    out["off_reg"] = terms["embedding_reg"]
    ids = jnp.where(batch["ids"] == cond.placeholder_id, cond.class_id, batch["ids"])
    out["base"] = m.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    rows = jnp.asarray([0, 1, 0, 0])
    four = {k: v[rows] for k, v in batch.items()}
    out["word"], out["offset"] = cond.word(m, params, cond.prepare(m, params, four), noisy[rows],
                                           jnp.asarray([10, 10, 900, 10]))
    first = {k: v[jnp.asarray([0, 0])] for k, v in batch.items()}
    inputs = {"ids": first["ids"], "negative_ids": first["ids"], CLIP_PIXELS: first[CLIP_PIXELS]}
    state = cond.prepare(m, params, inputs)
    c, _ = cond.at(m, params, state, jnp.stack([noisy[0], 0.5 * noisy[0]]),
                   jnp.asarray([900, 900]), 0)
    u = cond.negative(m, params, state)
    out["steps"], out["unconds"] = c["encoder_hidden_states"], u["encoder_hidden_states"]
    return out
  return dict(jax.device_get(run(params, batch)), params=params, batch=jax.device_get(batch))


def test_neutral_init_and_branch_off_reproduce_the_base(pre, probe):
  """Offsets at zero: every UNet weight is the base's bit for bit; scale 0: the prompt's
  conditioning equals the base's with the class word in the placeholder's place."""
  base = tree.flatten(pre.pipe.params["unet"])
  for path, value in tree.flatten(probe["params"]["unet"]).items():
    assert np.array_equal(np.asarray(value), np.asarray(base[path])), path
  cond = pre.method.conditioning
  assert (probe["batch"]["ids"] == cond.placeholder_id).sum() == 2
  np.testing.assert_array_equal(probe["off"], probe["base"])


def test_embedding_regularizer_is_mkshings(pre, probe):
  """mkshing/e4t-diffusion pretrain_e4t.py (and tuning_e4t.py), re-created in torch:
  domain_embed = class_embed.expand(bsz, -1) + domain_embed_scale * E;
  loss_reg = reg_lambda * domain_embed.pow(2).sum(). The step's term with the branch off (2
  rows, w = e(class)) and `embedding_penalty` on 4 predicted words both equal it."""
  import torch

  from persona_jax.methods import e4t as e4t_method
  cond = pre.method.conditioning
  table = np.asarray(pre.pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
  class_embed = torch.from_numpy(table[cond.class_id][None].copy())

  def reference(e, scale):
    domain_embed = class_embed.expand(e.shape[0], -1) + scale * torch.from_numpy(e)
    return float(cond.embedding_reg * domain_embed.pow(2).sum())
  assert cond.embedding_reg == 0.01 and cond.embedding_reg_target == "word"
  np.testing.assert_allclose(float(probe["off_reg"]), reference(np.zeros((2, 32), np.float32), 0.0),
                             rtol=1e-5)
  e = np.asarray(probe["offset"]) / cond.scale
  got = e4t_method.embedding_penalty(jnp.asarray(probe["word"]), jnp.asarray(probe["offset"]), 0.01)
  np.testing.assert_allclose(float(got), reference(e, cond.scale), rtol=1e-5)
  offset = e4t_method.embedding_penalty(probe["word"], jnp.asarray(probe["offset"]), 0.01, "offset")
  np.testing.assert_allclose(float(offset), 0.01 * np.mean(np.sum(np.square(probe["offset"]), -1)),
                             rtol=1e-5)


def test_encoder_branch_on_its_own(pre, probe):
  """w = e(class) + s E; E depends on the image and latent (per example) and on the timestep."""
  cond = pre.method.conditioning
  assert probe["batch"][CLIP_PIXELS].shape == (2, 16, 16, 3)
  table = pre.pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
  w, offset = probe["word"], probe["offset"]
  assert w.shape == (4, 32) and cond.scale == 0.1
  np.testing.assert_allclose(w - offset, np.stack([table[cond.class_id]] * 4), rtol=1e-6)
  np.testing.assert_allclose(offset[3], offset[0], rtol=1e-6)          # same inputs, same E
  assert not np.allclose(offset[1], offset[0])                         # another example
  assert not np.allclose(offset[2], offset[0])                         # another timestep
  assert np.abs(offset).max() > 0


def test_sampling_recomputes_the_conditioning_at_every_step(probe):
  """The prompt's conditioning follows the current latents; the negative prompt's does not."""
  assert not np.allclose(probe["steps"][0], probe["steps"][1])
  np.testing.assert_array_equal(probe["unconds"][0], probe["unconds"][1])


def test_offsets_transform_is_w_times_one_plus_dw(pre):
  kernel = "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  key = "e4t/offsets/unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k"
  flat = tree.flatten(pre.trainable)
  b = np.random.default_rng(0).standard_normal(flat[f"{key}/b"].shape).astype(np.float32)
  trained = tree.unflatten(dict(flat, **{f"{key}/b": b}))
  w = tree.flatten(pre.method.params.apply(pre.frozen, trained))[kernel]
  base = tree.flatten(pre.pipe.params)[kernel]
  np.testing.assert_allclose(w, base * (1 + flat[f"{key}/a"] @ b), rtol=1e-6)
  assert e4t.offset_penalty(e4t.offset_targets(pre.pipe.params), 1.0, None, trained, None,
                           None)["offset_reg"] > 0


@pytest.mark.parametrize("phase", ["pre", pytest.param("tune", marks=slow)])
def test_training_bar(phase, request):
  """Every trainable leaf moves (non-zero gradients), frozen params are bit-identical, the loss
  falls on a fixed batch, and lr 0 moves nothing. Tuning's leaves are pre-training's plus the
  whole UNet (no E4T-specific path: DreamBooth's tests cover it), so its run is slow-only."""
  run = request.getfixturevalue(phase)
  trajectory = request.getfixturevalue(f"{phase}_trajectory")
  assert_training_bar(run, trajectory)
  batch = trajectory["batch"]
  if phase == "tune":                    # one image, augmented into a batch
    assert not np.array_equal(batch["pixels"][0], batch["pixels"][1])
  else:                                  # each example's own image
    assert not np.array_equal(batch[CLIP_PIXELS][0], batch[CLIP_PIXELS][1])


def test_tuning_batch_is_one_image_augmented(tune):
  batch = next(make_iterator(tune.dataset))
  assert batch["pixels"].shape == (2, 32, 32, 3) and batch[CLIP_PIXELS].shape == (2, 16, 16, 3)
  assert not np.array_equal(batch["pixels"][0], batch["pixels"][1])       # zoomed crops, flips
  assert not np.array_equal(batch[CLIP_PIXELS][0], batch[CLIP_PIXELS][1])  # E sees the same view


def test_tuning_starts_from_the_pretrained_state(pre_trajectory, tune):
  trained = tree.flatten(pre_trajectory["trained"])
  for path, value in tree.flatten(tune.trainable).items():
    if path.startswith("e4t/"):
      np.testing.assert_array_equal(np.asarray(value), trained[path], err_msg=path)


def test_tuning_needs_a_pretrained_state(monkeypatch, tmp_path):
  with pytest.raises(ConfigError, match="method.pretrained: E4T tuning starts"):
    e4t.pretrained_path(e4t.E4TConfig(phase="tune"))
  monkeypatch.setattr(e4t, "shipped_state", lambda: tmp_path / "absent" / e4t.RESULT_FILE)
  with pytest.raises(ConfigError, match="or create it with `python scripts/make_e4t_state.py`"):
    e4t.pretrained_path(e4t.E4TConfig(phase="tune", pretrained="shipped"))
  assert e4t.pretrained_path(e4t.E4TConfig()) is None                  # pre-training: fresh


def test_image_encoder_defaults_to_the_model_folder(tmp_path):
  from persona_jax.image_encoder import image_encoder_dir
  (tmp_path / "tokenizer").mkdir()
  with pytest.raises(ConfigError, match="set the CLIP image encoder folder"):
    image_encoder_dir("", tmp_path / "tokenizer")
  (tmp_path / "model_index.json").write_text("{}")
  with pytest.raises(ConfigError, match="has no image_encoder/"):
    image_encoder_dir("", tmp_path / "tokenizer")
  (tmp_path / "image_encoder").mkdir()
  (tmp_path / "image_encoder" / "config.json").write_text("{}")
  assert image_encoder_dir("", tmp_path / "tokenizer") == tmp_path / "image_encoder"
  assert image_encoder_dir("/x", None) == e4t.Path("/x")


def test_result_samples_through_the_command_line(tune, tuned, tmp_path):
  """The result file gives the run's params back and samples with `sample --e4t`."""
  loop.write_outputs(tune, tuned, tmp_path)
  image = sorted(loop.data.example_subject_dir().glob("*.png"))[0]
  result = e4t.load_result(tmp_path)
  ready = e4t.prepare(result, tune.pipe)
  want = tree.flatten(tune.full_params(tuned))
  got = tree.flatten(ready.params)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
  grids = []
  for flag in ("--e4t", "--run"):               # the method's flag, and --run (any method)
    out = tmp_path / f"samples{flag}"
    assert main(["sample", flag, str(tmp_path), "--image", str(image), "--prompt",
                 "a painting of *s", "--steps", "2", "--out", str(out)]) == 0
    grids.append(np.asarray(Image.open(out / "grid.png")))
  np.testing.assert_array_equal(*grids)


def test_export_merges_the_offsets_and_writes_the_embedding(tune, tuned, tmp_path):
  import json

  from persona_jax.convert.embedding_formats import read_embedding_file
  from persona_jax.pipeline import load_pipeline
  from persona_jax.train.loop import _write_config
  workdir = tmp_path / "run"
  workdir.mkdir()
  _write_config(workdir, tune.config)
  loop.write_outputs(tune, tuned, workdir)
  out = tmp_path / "exported"
  assert main(["export", str(workdir), "--format", "diffusers", "--out", str(out)]) == 0
  exported = load_pipeline(out)
  want = tree.flatten(tune.full_params(tuned))
  for path, value in tree.flatten(exported.params).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=path)
  rows = read_embedding_file(out / "e4t_embedding" / "learned_embeds.safetensors")
  assert rows["*s"].shape == (1, 32)
  record = json.loads((out / "export.json").read_text())
  assert record["e4t_embedding"]["timestep"] == e4t.EXPORT_TIMESTEP


def test_the_shipped_state_fits_the_shipped_base_and_starts_tiny_tuning():
  """e4t_tune:tiny's default start: made on this very base (its cache name carries the base's
  weights digest), for the class word the config uses, and every leaf loads."""
  from pathlib import Path

  from persona_jax.train.config import load_config
  from persona_jax.default_model import default_model_name, resolve_model
  from persona_jax.pipeline import load_pipeline
  shipped = e4t.load_result(e4t.shipped_state())
  # The cache name is the base's weights digest, then a digest of all its files (configs too):
  # the state needs the same weights.
  weights = Path(shipped.meta["base_model"]).name.split("-")[:4]
  assert weights == default_model_name().split("-")[:4], \
      "the base was re-shipped: remake the state with scripts/make_e4t_state.py"
  tiny = load_config("e4t_tune:tiny").method
  assert tiny.pretrained == e4t.SHIPPED and shipped.meta["class_word"] == tiny.class_word
  # Made with today's method options (scripts/make_e4t_state.py runs e4t_pretrain:tiny): an
  # option added or changed since (a regularizer's form, ...) means a stale state.
  import json
  pretrain = {k: v for k, v in load_config("e4t_pretrain:tiny").method.to_dict().items() if k != "name"}
  assert json.loads(shipped.meta["method"]) == json.loads(json.dumps(pretrain)), \
      "the method's options changed: remake the state with scripts/make_e4t_state.py"
  pipe = load_pipeline(resolve_model("default"))
  config = e4t.E4TConfig(**{k: v for k, v in tiny.to_dict().items() if k != "name"})
  method = e4t.make(config, pipe.params, pipe.tokenizer_dir, pipe.unet_config)
  start = tree.flatten(method.params.init(jax.random.PRNGKey(0), pipe.params))
  assert set(start) == {p for p in shipped.weights if p.startswith("e4t/")}
  for path, value in start.items():
    np.testing.assert_array_equal(np.asarray(value), shipped.weights[path])
  assert float(np.abs(shipped.weights[next(p for p in start if p.endswith("/b"))]).max()) > 0
