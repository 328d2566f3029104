"""Textual Inversion on the training core: the method test bar of DESIGN.md section 5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persona_jax import ConfigError, tree
from persona_jax.methods import textual_inversion as ti
from persona_jax.methods.base import method_loss
from persona_jax.tokenizer import tokenize
from persona_jax.train import loop
from persona_jax.train.state import init_state
from persona_jax.train.step import train_step
from tests.runs import one_device_mesh, ti_config


@pytest.fixture(scope="module")
def run(model_dirs):
  return loop.build(ti_config(model_dirs["sd1"]), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def batch(run):
  from persona_jax.data.pipeline import make_iterator
  return jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))


def jitted_step(run, tx=None):
  return jax.jit(functools.partial(train_step, method=run.method, models=run.models,
                                   objective=run.objective, tx=tx or run.tx))


@pytest.fixture(scope="module")
def step(run):
  return jitted_step(run)


@pytest.fixture(scope="module")
def eval_loss(run):
  """The loss with fixed noise and timesteps (a fixed rng), and its gradient."""
  def loss(trainable, batch):
    params = run.method.params.apply(run.frozen, trainable)
    return method_loss(run.method, run.models, run.objective, params, trainable, batch,
                       jax.random.PRNGKey(42))[0]
  return jax.jit(jax.value_and_grad(loss))


def test_trainable_leaves_are_exactly_the_new_rows(run):
  assert tree.paths(run.trainable) == ["tokens"]
  assert run.trainable["tokens"].shape == (2, 32)
  assert run.method.tokens.added == ("<my-toy>", "<my-toy>_1")
  assert set(run.frozen) == {"unet", "text_encoder"}         # VAE moments are cached


def test_new_ids_follow_the_vocabulary_and_prompts_expand(run):
  ids = run.tokenize(["a photo of <my-toy>"])[0]
  assert list(ids[:7]) == [49406, 320, 1125, 539, 49408, 49409, 49407]


def test_rows_start_at_the_initializer_and_reproduce_it(run):
  table = run.pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
  ball = tokenize(run.pipe.tokenizer, ["ball"])[0][1]
  np.testing.assert_array_equal(run.trainable["tokens"], np.stack([table[ball]] * 2))
  params = run.method.params.apply(run.frozen, run.trainable)
  with_placeholder = run.method.conditioning.encode(run.models, params, run.tokenize(["a photo of <my-toy>"]))
  with_initializer = run.method.conditioning.encode(run.models, params, tokenize(run.pipe.tokenizer, ["a photo of ball ball"]))
  np.testing.assert_array_equal(with_placeholder, with_initializer)


def test_prompt_without_placeholder_reproduces_the_base_exactly(run):
  ids = tokenize(run.pipe.tokenizer, ["a red ball on a blue background"])
  trained = dict(run.trainable, tokens=run.trainable["tokens"] + 1.0)
  params = run.method.params.apply(run.frozen, trained)
  ours = run.method.conditioning.encode(run.models, params, ids)
  base = run.models.text_encoder.apply({"params": run.pipe.params["text_encoder"]}, ids).last_hidden_state
  np.testing.assert_array_equal(ours, base)


def test_new_rows_get_a_nonzero_gradient(run, batch, eval_loss):
  _, grads = eval_loss(run.trainable, batch)
  g = np.asarray(grads["tokens"])
  assert np.all(np.abs(g).sum(axis=1) > 0), "every vector must receive gradient"


def test_training_moves_only_the_rows_and_the_loss_falls(run, batch, step, eval_loss):
  state = init_state(run.trainable, run.tx, seed=0)
  frozen_before = jax.tree.map(np.array, run.frozen)
  before, _ = eval_loss(state.trainable, batch)
  for _ in range(15):
    state, metrics = step(state, run.frozen, batch)
  after, _ = eval_loss(state.trainable, batch)
  assert float(after) < float(before)
  assert np.isfinite(float(metrics["loss"]))
  assert not np.allclose(state.trainable["tokens"], run.trainable["tokens"])
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))
  # Optimizer state exists only for the new rows.
  shapes = {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim}
  assert shapes == {(2, 32)}


def test_learning_rate_zero_moves_nothing(run, batch):
  tx = optax.adamw(0.0, weight_decay=0.0)
  state = init_state(run.trainable, tx, seed=0)
  step = jitted_step(run, tx)
  for _ in range(2):
    state, _ = step(state, run.frozen, batch)
  np.testing.assert_array_equal(state.trainable["tokens"], run.trainable["tokens"])


def test_step_does_not_retrace(run, batch, step):
  state = init_state(run.trainable, run.tx, seed=3)
  state, _ = step(state, run.frozen, batch)
  n = step._cache_size()
  state, _ = step(state, run.frozen, jax.tree.map(lambda x: x[::-1], batch))
  assert step._cache_size() == n


@pytest.mark.parametrize("options,match", [
    (dict(initializer="sunflower seeds"), "is 2 tokens"),
    (dict(placeholder="dog"), "'dog' is already a token"),
    (dict(num_vectors=0), "num_vectors"),
])
def test_bad_placeholder_or_initializer(run, options, match):
  config = ti.TextualInversionConfig(**{**dict(placeholder="<x>", initializer="ball"), **options})
  with pytest.raises(ConfigError, match=match):
    ti.make(config, run.pipe.params, run.pipe.tokenizer_dir)


def test_sampling_a_result_whose_placeholder_the_base_already_has_is_an_error(pipes):
  """`sample --run` on another `--model`: the placeholder must be new to that model's tokenizer
  (as `--embedding` checks), else the prompt would silently use the word's own row."""
  from pathlib import Path

  from persona_jax.methods.result_file import Result
  from persona_jax.methods.spec import SampleRequest
  pipe = pipes["sd1"]
  result = Result(Path("learned_embeds.safetensors"), {"ball": np.zeros((2, 32), np.float32)}, {})
  with pytest.raises(ConfigError, match="its placeholder: 'ball' is already a token"):
    ti.sample(SampleRequest(result, pipe, pipe.params))
  ok = Result(Path("learned_embeds.safetensors"), {"<new>": np.zeros((2, 32), np.float32)}, {})
  assert ti.sample(SampleRequest(ok, pipe, pipe.params)).expand_prompt("a <new>") == "a <new> <new>_1"
