"""Custom Diffusion on the tiny SDXL model: the method bar (K/V of every cross-attention, the
modifier token's rows in both text encoders), the diffusers export read back by diffusers' SDXL
pipeline with its own loaders (`persona-jax verify --custom-diffusion`), `sample --run`, and the
closed-form merge over SDXL's 2-encoder context."""

import json

import jax
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.diffusion.conditioning import TextConditioning, token_table
from persona_jax.methods import custom_diffusion as cd
from persona_jax.methods.custom_diffusion_merge import (default_reg_captions, merge_runs,
                                                      text_features)
from persona_jax.models.addons import DetachContextTokens
from persona_jax.tokenizer import tokenizers_with_tokens
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import _merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh

INIT = 42170                                  # the paper's rare token ("ktn")
PROMPT = "photo of a <new1> toy"


def cdxl_config(model_dir, **overrides):
  """One concept, 32px, batch 1 (zoom and regularization images are the SD 1.x file's: the same
  data code on SDXL)."""
  values = dict(
      model=str(model_dir),
      method=dict(name="custom_diffusion", modifier_tokens=("<new1>",), initializer_tokens=(INIT,)),
      data=dict(caption_source="prompt", prompt=PROMPT, resolution=32),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=1, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def run(sdxl_dir):
  return loop.build(cdxl_config(sdxl_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=3)


@pytest.fixture(scope="module")
def workdir(run, trajectory, tmp_path_factory):
  """A finished run folder: config.json and the trained result."""
  wd = tmp_path_factory.mktemp("cdxl_run")
  (wd / "config.json").write_text(json.dumps(run.config.to_dict(), default=str))
  loop.write_outputs(run, trajectory["trained"], wd)
  return wd


def kv_paths(params):
  return {p for p in tree.paths(params) if p.startswith("unet/") and "/attn2/to_" in p
          and p.rsplit("/", 2)[-2] in ("to_k", "to_v") and p.endswith("/kernel")}


def test_trainable_leaves_are_every_cross_attention_kv_and_both_token_rows(run, sdxl_pipe):
  kv = kv_paths(sdxl_pipe.params)
  assert len(kv) == 2 * 12                        # 12 transformer blocks in the tiny SDXL UNet
  assert set(tree.paths(run.trainable)) == {"tokens", "tokens_2"} | kv
  assert run.trainable["tokens"].shape == (1, 32) and run.trainable["tokens_2"].shape == (1, 48)
  assert tree.flatten(run.trainable)[min(kv)].shape == (80, 64)        # the 2-encoder context
  assert run.models.unet.config.addons == (DetachContextTokens(1),)


def test_crossattn_option_trains_all_of_attn2(sdxl_pipe):
  from persona_jax.methods.registry import make_method
  method = make_method("custom_diffusion", dict(freeze_model="crossattn", modifier_tokens=(),
                                                initializer_tokens=()),
                       sdxl_pipe.params, sdxl_pipe.tokenizer_dir)
  selected, _ = tree.split(sdxl_pipe.params, method.params.select)
  leaves = {p.split("/attn2/")[1] for p in tree.paths(selected)}
  assert leaves == {"to_q/kernel", "to_k/kernel", "to_v/kernel", "to_out_0/kernel", "to_out_0/bias"}
  assert len(tree.paths(selected)) == 5 * 12 and method.conditioning.cacheable


def test_neutral_start_reproduces_the_base(run, sdxl_pipe):
  """Step 0: every frozen leaf (the UNet's K/V included) is the base's; without the token in the
  prompt the text conditioning (context and pooled) is the base's exactly, and with it the base's
  with the initializer in its place, in both encoders. (The BOS detach leaves the UNet's forward
  unchanged: the SD 1.x file's test.)"""
  params = run.full_params(run.trainable)
  base = tree.flatten(sdxl_pipe.params)
  for path, value in tree.flatten(params).items():
    if path not in ("tokens", "tokens_2"):
      assert np.array_equal(np.asarray(value), np.asarray(base[path])), path
  for key, encoder in (("tokens", "text_encoder"), ("tokens_2", "text_encoder_2")):
    np.testing.assert_array_equal(run.trainable[key][0], token_table(sdxl_pipe.params, encoder)[INIT])
  with_token = run.prompt_inputs(["photo of a toy", "a cat", PROMPT])    # the token: last prompt
  vocab = token_table(sdxl_pipe.params).shape[0]
  assert all((v == vocab).sum() == 1 for v in with_token.values())      # one id in both tokenizers
  swapped = {k: np.where(v == vocab, INIT, v) for k, v in with_token.items()}
  time_ids = np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (3, 1))
  ours = jax.jit(lambda p, x: run.method.conditioning.prepare(run.models, p, x))(
      params, {**with_token, "time_ids": time_ids})
  theirs = jax.jit(lambda p, x: TextConditioning().prepare(sdxl_pipe.models(), p, x))(
      sdxl_pipe.params, {**swapped, "time_ids": time_ids})
  for key in ("context", "pooled"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)


def test_training_moves_only_the_named_leaves(run, trajectory):
  """lr 0 moves nothing, every trainable leaf moves (both token rows too), the loss falls, the
  frozen params stay bitwise."""
  assert_training_bar(run, trajectory)


def test_result_samples_like_the_run(run, trajectory, workdir, sdxl_pipe):
  result = cd.load_result(workdir)
  assert result.tokens_2.shape == (1, 48) and set(result.rows) == {"tokens", "tokens_2"}
  sampling = cd.sampling(result, sdxl_pipe)
  want = tree.flatten(run.full_params(trajectory["trained"]))
  flat = tree.flatten(sampling.params)
  assert set(flat) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(want[path]), err_msg=path)
  ids = [t(PROMPT, padding="max_length", max_length=77)["input_ids"]
         for t in (sampling.tokenizer, sampling.tokenizer_2)]
  np.testing.assert_array_equal(ids, [v[0] for v in run.prompt_inputs([PROMPT]).values()])


def test_export_loads_in_diffusers_and_verify_passes(workdir, sdxl_dir, tmp_path, capsys):
  """The diffusers export (processors .bin and the SDXL embedding per token) loaded by
  StableDiffusionXLPipeline's own loaders: `verify` exports the run and compares the text
  conditioning and UNet output with ours, and that the files moved diffusers' UNet."""
  from safetensors.numpy import load_file
  out = tmp_path / "out"
  assert main(["export", str(workdir), "--format", "diffusers", "--out", str(out)]) == 0
  result = cd.load_result(workdir)
  emb = load_file(out / "<new1>.safetensors")
  assert set(emb) == {"clip_l", "clip_g"}
  np.testing.assert_array_equal(emb["clip_l"], result.tokens)
  np.testing.assert_array_equal(emb["clip_g"], result.tokens_2)
  from persona_jax.convert.embedding_formats import read_embedding_file    # and ours reads it
  back = read_embedding_file(out / "<new1>.safetensors", sdxl=True)
  assert list(back) == ["<new1>"] and set(back["<new1>"]) == {"clip_l", "clip_g"}
  capsys.readouterr()
  assert main(["verify", str(sdxl_dir), "--custom-diffusion", str(workdir)]) == 0
  printed = capsys.readouterr().out
  assert "adapter: unet" in printed and "PASS" in printed, printed


@slow
def test_sample_run_and_the_merged_export_on_the_sdxl_base(workdir, sdxl_dir, tmp_path):
  """`sample --run` draws with the result; the merged export (a StableDiffusionXLPipeline folder
  plus tokens/) gives diffusers the UNet output the processors export gives it."""
  import torch
  from diffusers import StableDiffusionXLPipeline
  from safetensors.torch import load_file
  assert main(["sample", "--run", str(workdir), "--prompt", PROMPT, "--steps", "1", "--height",
               "32", "--width", "32", "--out", str(tmp_path / "s")]) == 0
  assert (tmp_path / "s" / "grid.png").is_file()
  outs = {}
  for fmt in ("diffusers", "merged"):
    out = tmp_path / fmt
    assert main(["export", str(workdir), "--format", fmt, "--out", str(out)]) == 0
    ref = StableDiffusionXLPipeline.from_pretrained(out if fmt == "merged" else sdxl_dir,
                                                    torch_dtype=torch.float32)
    if fmt == "diffusers":                 # the processors (the tokens are loaded below)
      cd.load_exports_in_diffusers(ref, out, [])
    emb = load_file((out / "tokens" if fmt == "merged" else out) / "<new1>.safetensors")
    ref.load_textual_inversion(emb["clip_l"], token="<new1>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(emb["clip_g"], token="<new1>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    with torch.no_grad():
      ctx, _, pooled, _ = ref.encode_prompt(PROMPT, do_classifier_free_guidance=False)
      x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
      outs[fmt] = ref.unet(x, torch.tensor([500]), ctx, added_cond_kwargs={
          "text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}).sample.numpy()
  np.testing.assert_allclose(outs["merged"], outs["diffusers"], rtol=1e-4, atol=1e-5)


def test_merge_satisfies_its_constraint_on_sdxl(workdir, sdxl_dir, sdxl_pipe, tmp_path):
  """Two runs (the trained one and a perturbed copy whose token name clashes): the merged K/V
  map each concept's SDXL context features (both encoders) as that concept's run did."""
  from persona_jax.convert.files import write_safetensors
  a = cd.load_result(workdir)
  rng = np.random.default_rng(1)
  b = {p: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for p, v in a.weights.items()}
  b.update({k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in a.rows.items()})
  run_b = tmp_path / "b"
  write_safetensors(run_b / cd.RESULT_FILE, b, {
      "format": cd.FORMAT, "base_model": str(sdxl_dir),
      "concepts": json.dumps([{"token": "<new1>", "prompt": "a <new1> dog"}])})
  captions = default_reg_captions()[:24]        # ~150 feature rows: enough for the tiny 80-wide context
  summary = merge_runs([workdir, run_b], tmp_path / "merged", reg_captions=captions)
  assert summary["layers"] == 2 * 12 and summary["max_constraint_error"] < 1e-6
  merged = cd.load_result(tmp_path / "merged")
  assert [c["token"] for c in merged.concepts] == ["<new1>", "<new2>"]           # B's renamed
  np.testing.assert_array_equal(merged.tokens_2[1], b["tokens_2"][0])
  toks = tokenizers_with_tokens(sdxl_pipe.tokenizer_dirs, ("<new1>", "<new2>"))
  feats = text_features(sdxl_pipe, toks, merged.rows, ["<new1> toy", "<new2> dog"], [1, 1])
  assert feats[0].shape[1] == 80                                       # 32 + 48 features
  base = tree.flatten(sdxl_pipe.params)
  for path in sorted(merged.weights):
    for f, source in zip(feats, (a.weights, b)):
      np.testing.assert_allclose(f @ merged.weights[path], f @ source[path], rtol=1e-4, atol=1e-5)
    assert not np.allclose(merged.weights[path], base[path])
