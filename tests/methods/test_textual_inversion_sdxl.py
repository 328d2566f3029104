"""Textual Inversion on an SDXL base (the tiny `sdxl` random model): one token with a row in each
text encoder (`tokens` [N, 32], `tokens_2` [N, 48]); the method bar of DESIGN section 5; the
result is the SDXL embedding ({"clip_l", "clip_g"}) that diffusers' StableDiffusionXLPipeline
loads into both encoders (load_textual_inversion) and that `--embedding` samples as the run does
(slow: `verify --embedding` on SDXL, the UNet's output included)."""

import functools

import jax
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.diffusion.conditioning import encode_sdxl_prompt, token_table
from persona_jax.methods import textual_inversion as ti
from persona_jax.tokenizer import tokenize_prompts
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import fixed_batch_trajectory, one_device_mesh, ti_config

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def run(sdxl_dir):
  return loop.build(ti_config(sdxl_dir, optim=dict(warmup_steps=1)), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=3)


@pytest.fixture(scope="module")
def encode(run):
  """SDXL's text conditioning (context [B, L, 80], pooled [B, 24]) of {"ids", "ids_2"}, jitted;
  `token_rows`: the method's rows enter as input embeddings."""
  @functools.partial(jax.jit, static_argnames="token_rows")
  def go(params, inputs, token_rows=True):
    return encode_sdxl_prompt(run.models, params, inputs["ids"], inputs["ids_2"],
                              token_rows=token_rows)
  return go


def test_trainable_leaves_are_the_rows_of_both_encoders(run):
  assert tree.paths(run.trainable) == ["tokens", "tokens_2"]
  assert run.trainable["tokens"].shape == (2, 32) and run.trainable["tokens_2"].shape == (2, 48)
  assert run.method.tokens.added == ("<my-toy>", "<my-toy>_1")
  ids = [t.convert_tokens_to_ids(["<my-toy>", "<my-toy>_1"]) for t in run.tokenizers]
  assert ids == [[49408, 49409]] * 2
  assert set(run.frozen) == {"unet", *TEXT_ENCODERS}         # VAE moments are cached


def test_rows_start_at_the_initializer_in_both_tables(run, encode):
  """Each table's row of 'ball', twice; the placeholder then encodes as 'ball ball' does."""
  ball = run.tokenizers[0].convert_tokens_to_ids("ball</w>")
  assert run.tokenizers[1].convert_tokens_to_ids("ball</w>") == ball
  for key, encoder in (("tokens", "text_encoder"), ("tokens_2", "text_encoder_2")):
    np.testing.assert_array_equal(run.trainable[key],
                                  np.stack([token_table(run.pipe.params, encoder)[ball]] * 2))
  params = run.method.params.apply(run.frozen, run.trainable)
  with_placeholder = encode(params, run.prompt_inputs(["a photo of <my-toy>"]))
  with_initializer = encode(params, run.prompt_inputs(["a photo of ball ball"]))
  for a, b in zip(with_placeholder, with_initializer):
    np.testing.assert_array_equal(a, b)


def test_prompt_without_placeholder_reproduces_the_base_exactly(run, encode):
  moved = jax.tree.map(lambda x: x + 1.0, run.trainable)
  params = run.method.params.apply(run.frozen, moved)
  inputs = run.prompt_inputs(["a red ball on a blue background"])
  ours = encode(params, inputs)
  base = encode(run.pipe.params, inputs, token_rows=False)
  for a, b in zip(ours, base):
    np.testing.assert_array_equal(a, b)


def test_method_bar(run, trajectory):
  """lr 0 (the warm-up step) moves nothing; then both tables' rows move, the loss falls, the
  frozen UNet and text encoders stay bit-identical."""
  for key in ("tokens", "tokens_2"):
    np.testing.assert_array_equal(trajectory["after_lr0"][key], run.trainable[key])
    moved = np.abs(trajectory["trained"][key] - run.trainable[key]).sum(axis=1)
    assert np.all(moved > 0), f"every vector of {key} must move"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def result_dir(run, trajectory, tmp_path_factory):
  from persona_jax.methods.base import ResultContext
  workdir = tmp_path_factory.mktemp("ti_xl")
  context = ResultContext(workdir, run.pipe, run.model_dir, run.config, run.full_params)
  run.method.save(trajectory["trained"], context)
  return workdir


def test_result_is_the_sdxl_embedding_and_samples_as_trained(run, trajectory, result_dir, encode):
  """learned_embeds.safetensors = {"clip_l": tokens, "clip_g": tokens_2}; the run's sampling and
  `--embedding FILE` give the trained conditioning."""
  from safetensors import safe_open

  from persona_jax.convert import embedding_formats as ef
  from persona_jax.methods.spec import SampleRequest
  path = result_dir / ti.RESULT_FILE
  with safe_open(str(path), "np") as f:
    assert sorted(f.keys()) == ["clip_g", "clip_l"]
    meta = f.metadata()
    assert meta["tokens"] == '["<my-toy>", "<my-toy>_1"]'
    assert meta["base_model"] == str(run.model_dir)
    np.testing.assert_array_equal(f.get_tensor("clip_l"), trajectory["trained"]["tokens"])
    np.testing.assert_array_equal(f.get_tensor("clip_g"), trajectory["trained"]["tokens_2"])
  prompt = ["a photo of <my-toy> on a table"]
  want = encode(run.full_params(trajectory["trained"]), run.prompt_inputs(prompt))
  sampling = ti.sample(SampleRequest(ti.load(result_dir), run.pipe, run.pipe.params))
  inputs = tokenize_prompts((sampling.tokenizer, sampling.tokenizer_2),
                            [sampling.expand_prompt(p) for p in prompt])
  for a, b in zip(encode(sampling.params, inputs), want):
    np.testing.assert_array_equal(a, b)
  read = ef.read_embedding_spec(str(path), sdxl=True, width=ef.text_widths(run.pipe.params))
  added = ef.with_embeddings(run.pipe, read)
  inputs = tokenize_prompts((added.tokenizer, added.tokenizer_2),
                            [added.expand_prompt(p) for p in prompt])
  plain = jax.jit(functools.partial(encode_sdxl_prompt, added.pipe.models()))
  for a, b in zip(plain(added.pipe.params, inputs["ids"], inputs["ids_2"]), want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_exports_load_in_diffusers_sdxl_pipeline(run, trajectory, result_dir, sdxl_dir, encode,
                                                 tmp_path):
  """diffusers and a1111 exports are the SDXL file; StableDiffusionXLPipeline takes it into both
  encoders with its own loader (load_textual_inversion(rows, token=, text_encoder(_2)=,
  tokenizer(_2)=)) and its encode_prompt of "<my-toy>" (which it expands) gives our trained
  conditioning: both encoders' states and the pooled projection. The UNet after it: `verify
  --embedding` (slow test below)."""
  from tests.torch_reference import require_torch
  torch = require_torch()
  from diffusers import StableDiffusionXLPipeline

  from persona_jax.convert import embedding_formats as ef
  from persona_jax.methods.spec import ExportRequest
  result = ti.load(result_dir)
  request = ExportRequest(result_dir, result, {}, tmp_path / "d", run.model_dir)
  (diffusers_file,), _ = ti.SPEC.exports["diffusers"](request)
  (a1111_file,), _ = ti.SPEC.exports["a1111"](ExportRequest(
      result_dir, result, {}, tmp_path / "a", run.model_dir))
  assert diffusers_file.name == "learned_embeds.safetensors"
  assert a1111_file.name == "my-toy.safetensors"
  for path, token in ((diffusers_file, "<my-toy>"), (a1111_file, "my-toy")):
    (name, rows), = ef.read_embedding_file(path, sdxl=True).items()
    assert name == token
    np.testing.assert_array_equal(rows["clip_g"], result.weights["<my-toy>"]["clip_g"])
  ref = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
  (token, rows), = ef.read_embedding_file(diffusers_file, sdxl=True).items()
  ti.load_into_diffusers(ref, token, rows, run.pipe.params)
  assert ref.tokenizer_2.convert_tokens_to_ids(["<my-toy>", "<my-toy>_1"]) == [49408, 49409]
  prompt = "a photo of <my-toy> on a table"
  with torch.no_grad():
    context, _, pooled, _ = ref.encode_prompt(prompt, do_classifier_free_guidance=False)
  ours = encode(run.full_params(trajectory["trained"]), run.prompt_inputs([prompt]))
  np.testing.assert_allclose(ours[0], context.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[1], pooled.numpy(), rtol=1e-4, atol=1e-5)


@slow
def test_verify_embedding_on_sdxl(run, result_dir, sdxl_dir):
  """`verify --embedding` on SDXL: the file into both of StableDiffusionXLPipeline's encoders and
  ours: the text conditioning and the UNet's output (added conditioning) agree, and the embedding
  moved diffusers' UNet."""
  pytest.importorskip("diffusers")
  comparisons = ti.verify_embedding(run.pipe, sdxl_dir, str(result_dir / ti.RESULT_FILE))
  names = [c.name for c in comparisons]
  assert names == ["adapter: text conditioning", "adapter: unet",
                   "adapter moved diffusers' unet by"]
  assert all(c.ok(1e-4) for c in comparisons[:2]), comparisons
  assert comparisons[2].max_rel > 0
