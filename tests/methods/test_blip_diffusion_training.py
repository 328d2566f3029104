"""BLIP-Diffusion training, both stages (methods/blip_diffusion_training.py), on the tiny random
folder of `make-random-model --preset blip_diffusion` (2-layer Q-Former 32 wide, 4 queries, 28 px
vision tower; its UNet one layer per block) with the toy world's examples (world/blip_diffusion_data.py): the method bar of
DESIGN 5 per stage (the trainable set a literal list, frozen params bit-identical, lr 0 moves
nothing, every trainable leaf moves, the loss falls on a fixed batch), stage 2's subject dropout
(a dropped row is the caption alone), fine-tuning's subject embedding (the mean of the frozen
Q-Former's outputs over the subject's images at init, read instead of the Q-Former), and each
result folder loading (fine-tuning's sampling without a subject image; slow: `train --config
blip_diffusion:tiny` then `sample --run`, both stages, through the command line).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.data.batch import IDS
from persona_jax.data.blip_diffusion import example_arrays
from persona_jax.methods.blip_diffusion_conditioning import CAPTION_IDS, DROPPED, SUBJECT
from persona_jax.methods.blip_diffusion_folder import make_random_folder
from persona_jax.methods.blip_diffusion_training import EMBEDDING_FILE, load
from persona_jax.methods.registry import load_model, spec
from persona_jax.methods.spec import SampleRequest
from persona_jax.models.blip2 import Blip2QFormerModel
from persona_jax.text_to_image import SampleOptions, text_to_image
from persona_jax.train import loop
from persona_jax.world import blip_diffusion_data as toy_data
from configs.blip_diffusion import TOY_PRETRAIN, TOY_SUBJECT
from tests.markers import slow
from tests.runs import _merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh

LAYERS = 2        # the random folder's Q-Former
QFORMER_LAYER = [f"{part}/{leaf}" for part in (
    "attention/attention/query", "attention/attention/key", "attention/attention/value",
    "attention/output/dense", "crossattention/attention/query", "crossattention/attention/key",
    "crossattention/attention/value", "crossattention/output/dense", "intermediate_query/dense",
    "output_query/dense") for leaf in ("kernel", "bias")] + [
    f"{part}/LayerNorm/{leaf}" for part in ("attention/output", "crossattention/output",
                                             "output_query") for leaf in ("scale", "bias")]
TEXT_FFN = ["intermediate/dense/kernel", "intermediate/dense/bias", "output/dense/kernel",
            "output/dense/bias", "output/LayerNorm/scale", "output/LayerNorm/bias"]
# Stage 2's Q-Former leaves: all but the vision tower (its final norm trains) and the last
# layer's text feed-forward (no gradient: only the queries are read).
PRETRAIN_QFORMER = [f"qformer/{p}" for p in (
    ["query_tokens", "embeddings/word_embeddings/embedding",
     "embeddings/position_embeddings/embedding", "embeddings/LayerNorm/scale",
     "embeddings/LayerNorm/bias", "visual_encoder/post_layernorm/scale",
     "visual_encoder/post_layernorm/bias"]
    + [f"proj_layer/{m}/{leaf}" for m in ("dense1", "dense2") for leaf in ("kernel", "bias")]
    + ["proj_layer/LayerNorm/scale", "proj_layer/LayerNorm/bias"]
    + [f"encoder/layer_{n}/{p}" for n in range(LAYERS) for p in QFORMER_LAYER]
    + [f"encoder/layer_{n}/{p}" for n in range(LAYERS - 1) for p in TEXT_FFN])]


def bd_config(folder, stage, **overrides):
  values = dict(
      model=str(folder),
      method=dict(name="blip_diffusion", stage=stage,
                  subject_class="ball" if stage == "finetune" else ""),
      data=dict(source=TOY_PRETRAIN if stage == "pretrain" else TOY_SUBJECT, num_images=4,
                resolution=32, random_flip=0.0),
      optim=dict(lr=1e-3, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


def with_one_layer_per_block(folder):
  """`folder` with a fresh random UNet of one layer per block (compiles faster; the training
  step's cost here is compilation)."""
  import json

  from persona_jax.convert import diffusers as convert
  from persona_jax.convert.files import write_safetensors
  from persona_jax.models.components import abstract_params
  from persona_jax.models.configs import UNetConfig
  from persona_jax.random_model import random_params
  path = folder / "unet" / "config.json"
  raw = dict(json.loads(path.read_text()), layers_per_block=1)
  path.write_text(json.dumps(raw))
  params = random_params(abstract_params("unet", UNetConfig.from_dict(raw)),
                         np.random.default_rng(0))
  write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                    convert.params_to_state_dict(params))
  return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return with_one_layer_per_block(
      make_random_folder(tmp_path_factory.mktemp("bd_train") / "blip", seed=3))


@pytest.fixture(scope="module")
def pipe(folder):
  return load_model(folder)


@pytest.fixture(scope="module")
def pretrain(folder):
  run = loop.build(bd_config(folder, "pretrain"), mesh=one_device_mesh())
  return run, fixed_batch_trajectory(run, steps=3)


@pytest.fixture(scope="module")
def finetune_run(folder):
  return loop.build(bd_config(folder, "finetune"), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def finetune(finetune_run):
  """The fine-tuning run and its trajectory (its compile: the slow tests only; the default ones
  use the built run: the pre-training bar covers the step, the UNet's half of it included)."""
  return finetune_run, fixed_batch_trajectory(finetune_run, steps=3)


def unet_paths(pipe):
  return {f"unet/{p}" for p in tree.flatten(pipe.params["unet"])}


def test_pretrain_trainable_set_is_literal(pretrain, pipe):
  run, _ = pretrain
  assert set(tree.paths(run.trainable)) == set(PRETRAIN_QFORMER) | unet_paths(pipe)
  assert set(run.frozen) == {"qformer", "text_encoder"}   # VAE moments precomputed
  frozen = set(tree.flatten(run.frozen["qformer"]))
  assert frozen == {p for p in tree.flatten(pipe.params["qformer"])
                    if f"qformer/{p}" not in PRETRAIN_QFORMER}
  assert all(p.startswith("visual_encoder/") or p.startswith(f"encoder/layer_{LAYERS - 1}/")
             for p in frozen)
  for name in ("qformer", "text_encoder"):          # the base's, as loaded
    have, base = tree.flatten(run.frozen[name]), tree.flatten(pipe.params[name])
    for path, value in have.items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(base[path]))


def test_pretrain_training_bar(pretrain):
  """On a fixed batch of one kept and one dropped subject (p 0.15, this seed)."""
  run, trajectory = pretrain
  assert sorted(trajectory["batch"][DROPPED].tolist()) == [0.0, 1.0]
  assert_training_bar(run, trajectory)


def test_a_dropped_subject_is_the_caption_alone(pretrain):
  """The batch carries the drop flag and the full-length caption; a dropped row's context is the
  caption's text encoding without query embeddings, a kept row's has them at ctx_begin_pos."""
  run, trajectory = pretrain
  batch = trajectory["batch"]
  cond = run.method.conditioning
  length = run.pipe.text_encoder_config.max_position_embeddings
  assert batch[CAPTION_IDS].shape == (2, length) and batch[DROPPED].shape == (2,)
  params = run.full_params(run.trainable)
  inputs = dict(jax.tree.map(jnp.asarray, batch), **{DROPPED: jnp.asarray([1.0, 0.0])})

  @jax.jit
  def contexts(params, inputs):
    kept = cond.encode(params, inputs[IDS][1:], cond.query_embeddings(params, inputs)[1:])
    return (cond.prepare(None, params, inputs)["context"],
            cond.encode(params, inputs[CAPTION_IDS][:1]), kept)
  context, plain, kept = (np.asarray(x) for x in contexts(params, inputs))
  np.testing.assert_allclose(context[0], plain[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(context[1], kept[0], rtol=1e-5, atol=1e-6)
  assert np.abs(plain[0] - kept[0]).max() > 1e-3


def test_pretrain_result_loads(pretrain, tmp_path):
  """WORKDIR/model is a BLIP-Diffusion folder with the trained Q-Former and UNet and the base's
  VAE and text encoder (it samples zero-shot as any such folder: the slow command-line test)."""
  run, trajectory = pretrain
  [out] = loop.write_outputs(run, trajectory["trained"], tmp_path, step=2)
  assert load(tmp_path).path == tmp_path / "model" and load(tmp_path).weights == {}
  trained = load_model(out)
  full = tree.flatten(run.full_params(trajectory["trained"]))
  for name in ("qformer", "unet", "vae", "text_encoder"):
    for path, value in tree.flatten(trained.params[name]).items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(full[f"{name}/{path}"]))


def test_finetune_trainable_set_is_literal(finetune_run, pipe):
  run = finetune_run
  assert set(tree.paths(run.trainable)) == unet_paths(pipe) | {f"{SUBJECT}/embedding"}
  assert set(run.frozen) == {"text_encoder"}      # the Q-Former does not run
  assert run.method.conditioning.subject_embedding and not run.method.conditioning.input_keys


def test_finetune_embedding_starts_at_the_mean_query_embedding(finetune_run, pipe):
  """The subject embedding at init = the mean over the subject's images of the frozen Q-Former +
  ProjLayer, computed here from the examples directly."""
  run = finetune_run
  subject = toy_data.held_out_subject("ball")
  size = pipe.qformer_config.vision_config.image_size
  examples = toy_data.subject_examples(subject, 4, 32, size, run.config.seed)
  proc = pipe.image_processing
  arrays = example_arrays(examples, clip_tokenizer=run.tokenizer,
                          qformer_tokenizer=pipe.qformer_tokenizer, mean=proc.image_mean,
                          std=proc.image_std, num_query_tokens=pipe.qformer_config.num_query_tokens)
  query = jax.jit(Blip2QFormerModel(pipe.qformer_config).apply)(
      {"params": pipe.params["qformer"]}, arrays["blip_pixels"], arrays["category_ids"],
      arrays["category_mask"]).query_embeds
  np.testing.assert_allclose(np.asarray(run.trainable[SUBJECT]["embedding"]),
                             np.asarray(query).mean(0, keepdims=True), rtol=1e-5, atol=1e-6)


@slow
def test_finetune_training_bar(finetune):
  run, trajectory = finetune
  assert_training_bar(run, trajectory)


def test_finetune_result_samples_without_an_image(finetune_run, tmp_path):
  """The result (here of the run's initial leaves: the slow bar trains them) stores the subject
  embedding and samples by it without an image."""
  run = finetune_run
  [out] = loop.write_outputs(run, run.trainable, tmp_path, step=2)
  result = load(tmp_path)
  np.testing.assert_array_equal(result.weights["embedding"],
                                np.asarray(run.trainable[SUBJECT]["embedding"]))
  assert result.meta["subject_class"] == "ball" and (tmp_path / "model" / EMBEDDING_FILE).is_file()
  trained = load_model(out)
  sampling = spec("blip_diffusion").sample(SampleRequest(result, trained, trained.params, (), {}))
  options = SampleOptions(steps=2, height=32, width=32)
  [img] = text_to_image(trained, "on grass", options=options, sampling=sampling)
  noise = np.random.default_rng(0).standard_normal(result.weights["embedding"].shape)
  other = dict(result.weights, embedding=(result.weights["embedding"] + noise).astype(np.float32))
  sampling = spec("blip_diffusion").sample(SampleRequest(
      type(result)(result.path, other, result.meta), trained, trained.params, (), {}))
  [moved] = text_to_image(trained, "on grass", options=options, sampling=sampling)
  assert img.shape == (32, 32, 3) and np.abs(img.astype(int) - moved).max() > 0


@slow
def test_tiny_configs_train_and_sample_from_the_command_line(tmp_path):
  """`train --config blip_diffusion:tiny` (2 steps, a sample grid at the end), `sample --run` with
  an image; then `:tiny_finetune` on its result and `sample --run` without one; `verify` on the
  pre-trained folder (diffusers' deprecated pipeline under the shim) passes."""
  from tests.runs import run_cli
  pre, ft = tmp_path / "pre", tmp_path / "ft"
  run_cli("train", "--config", "configs/blip_diffusion.py:tiny", "--workdir", str(pre),
          "--config.steps=2", "--config.checkpoint_every=2", "--config.sample_steps=2",
          '--config.sample_prompts=("a ball on grass",)')
  from PIL import Image
  image = tmp_path / "subject.png"
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
  run_cli("sample", "--run", str(pre), "--image", str(image), "--subject-class", "ball",
          "--prompt", "on grass", "--steps", "2", "--out", str(tmp_path / "s1"))
  run_cli("train", "--config", "configs/blip_diffusion.py:tiny_finetune", "--workdir", str(ft),
          f"--config.model={pre / 'model'}", "--config.steps=2", "--config.checkpoint_every=2")
  run_cli("sample", "--run", str(ft), "--prompt", "on grass", "--steps", "2",
          "--out", str(tmp_path / "s2"))
  assert (pre / "samples" / "step_000002.png").is_file()
  assert (tmp_path / "s1" / "grid.png").is_file() and (tmp_path / "s2" / "grid.png").is_file()
  # the pre-trained folder loads in diffusers' deprecated BlipDiffusionPipeline and matches it
  run_cli("verify", str(pre / "model"))


@pytest.mark.parametrize("options, message", [
    (dict(stage="stage2"), "method.stage: 'stage2': one of pretrain"),
    (dict(stage="finetune"), "method.subject_class: fine-tuning needs the subject's category"),
    (dict(subject_dropout=1.0), "method.subject_dropout 1.0: a probability in [0, 1)"),
    (dict(stage="finetune", subject_class="dog", train_text_encoder=True),
     "method.train_text_encoder: fine-tuning trains the UNet and the subject embedding only"),
])
def test_bad_options_are_one_line_errors(options, message, pipe):
  from persona_jax.errors import ConfigError
  from persona_jax.methods.registry import make_method
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    make_method("blip_diffusion", options, pipe.params, pipe.tokenizer_dir, pipe.unet_config)


def test_an_sd_base_is_refused(pipes):
  from persona_jax.errors import ConfigError
  from persona_jax.methods.registry import make_method
  sd = pipes["sd1"]
  with pytest.raises(ConfigError, match="blip_diffusion trains on a BLIP-Diffusion folder"):
    make_method("blip_diffusion", {}, sd.params, sd.tokenizer_dir, sd.unet_config)
