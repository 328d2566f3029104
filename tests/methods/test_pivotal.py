"""Pivotal tuning (Textual Inversion rows + UNet LoRA): the method test bar, the pivot, and its
two exports (kohya LoRA + A1111 embedding; diffusers/PEFT LoRA + diffusers embedding) loaded by
diffusers' own loaders and compared with our outputs."""

import json

import jax
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.methods import pivotal
from persona_jax.train import loop
from tests.runs import _merge, fixed_batch_trajectory, one_device_mesh
from tests.torch_reference import require_torch

STEPS = 8                       # the trajectory's steps after the lr-0 warm-up step
ATTENTION = {f"attn{i}/to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out_0")}


@pytest.fixture(scope="module")
def run(model_dirs):
  """Pivotal tuning on the sd1 random model: 2 rows for <s0> from "ball", rank 2 on the UNet's
  attention; the rows at their own lr until half of the 10 steps."""
  values = dict(
      model=str(model_dirs["sd1"]),
      method=dict(name="pivotal", placeholder="<s0>", initializer="ball", num_vectors=2, rank=2),
      data=dict(caption_source="prompt", prompt="a photo of <s0>", resolution=32),
      optim=dict(lr=1e-2, lr_groups=(("tokens", 5e-2, 0.5),), clip_grad_norm=0.0,
                 weight_decay=0.0, warmup_steps=1),
      steps=STEPS + 2, batch_size=2, log_every=1, checkpoint_every=10, sample_prompts=())
  return loop.build(_merge(values, {}), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  """The lr-0 step, then STEPS steps on the first batch, keeping the trainable tree after each."""
  return fixed_batch_trajectory(run, STEPS, keep_states=True)


def test_trainable_set_is_literal(run):
  paths = set(tree.paths(run.trainable))
  assert "tokens" in paths and run.trainable["tokens"].shape == (2, 32)
  factors = {p.rsplit("/", 1)[0] for p in paths - {"tokens"}}
  assert {p.rsplit("/", 1)[1] for p in paths - {"tokens"}} == {"a", "b"}
  assert all(p.startswith("lora/unet/") for p in factors)
  assert {f.split("/transformer_blocks_0/")[1] for f in factors} == ATTENTION
  assert len(factors) == 6 * 8                            # 6 transformers in the sd1 random model
  assert set(run.frozen) == {"unet", "text_encoder"}      # rows train: text runs in the step
  assert run.method.tokens.added == ("<s0>", "<s0>_1")


def test_neutral_init_reproduces_the_base_and_the_rows_act_alone(run):
  """Step 0: every UNet weight is the base's; a prompt without <s0> conditions as the base's;
  with it, the rows are the initializer's, so the context is the base's for "ball ball"."""
  from persona_jax.data.batch import IDS
  from persona_jax.tokenizer import tokenize
  params = run.method.params.apply(run.frozen, run.trainable)
  for a, b in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(run.frozen["unet"])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  cond, models = run.method.conditioning, run.models
  expand = run.method.tokens.expand

  def context(tokenizer, prompt, p):
    return np.asarray(cond.prepare(models, p, {IDS: tokenize(tokenizer, [prompt])})["context"])

  def base(prompt):
    return np.asarray(models.text_encoder.apply({"params": run.frozen["text_encoder"]},
                                                tokenize(run.pipe.tokenizer, [prompt])).last_hidden_state)
  np.testing.assert_array_equal(context(run.tokenizer, "a photo of a toy", params),
                                base("a photo of a toy"))
  assert expand("a photo of <s0>") == "a photo of <s0> <s0>_1"
  np.testing.assert_allclose(context(run.tokenizer, expand("a photo of <s0>"), params),
                             base("a photo of ball ball"), atol=1e-6)


def test_learning_rate_zero_moves_nothing_then_every_leaf_trains(run, trajectory):
  for a, b in zip(jax.tree.leaves(trajectory["states"][0]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  init, last = tree.flatten(run.trainable), tree.flatten(trajectory["states"][-1])
  still = [p for p in init if np.array_equal(init[p], last[p])]
  assert not still, f"{len(still)} leaves never got a gradient, e.g. {still[:3]}"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


def test_the_rows_pivot_half_way_and_the_lora_goes_on(run, trajectory):
  """lr_groups (("tokens", lr, 0.5),) over 10 steps: the rows move in optimizer steps 1-4 (step
  0 is the warm-up's lr 0) and stay from step 5 on; the LoRA factors move at every step."""
  rows = [np.asarray(s["tokens"]) for s in trajectory["states"]]
  moved = [not np.array_equal(rows[k], rows[k + 1]) for k in range(STEPS)]
  assert moved == [True] * 4 + [False] * (STEPS - 4)
  b = [np.asarray(s["lora"]["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]
                  ["to_k"]["b"]) for s in trajectory["states"]]
  assert all(not np.array_equal(b[k], b[k + 1]) for k in range(STEPS))


@pytest.fixture(scope="module")
def finished(run, trajectory, tmp_path_factory):
  """The trained state written as a run folder (its config.json and result files)."""
  wd = tmp_path_factory.mktemp("runs") / "my_pivotal"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(run.config.to_dict()))
  written = loop.write_outputs(run, trajectory["states"][-1], wd)
  assert sorted(written) == [str(wd / "learned_embeds.safetensors"), str(wd / "lora.safetensors")]
  return wd


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exports_load_in_diffusers_and_reproduce_our_outputs(finished, model_dirs, pipes,
                                                            tmp_path, capsys, fmt):
  """kohya: <run>.safetensors (lora_unet_...) and the A1111 embedding s0.safetensors
  (emb_params); diffusers: pytorch_lora_weights.safetensors and learned_embeds.safetensors.
  diffusers' load_lora_weights and load_textual_inversion read them; its text encoder's and
  UNet's outputs on "a photo of <s0> <s0>_1 ..." equal ours from the run folder."""
  require_torch()
  from persona_jax.methods.spec import SampleRequest
  from persona_jax.verify import DEFAULT_TOLERANCE, compare_adapter
  out = tmp_path / "out"
  assert main(["export", str(finished), "--format", fmt, "--out", str(out)]) == 0
  files = capsys.readouterr().out.split()
  names = (["my_pivotal.safetensors", "s0.safetensors"] if fmt == "kohya" else
           ["pytorch_lora_weights.safetensors", "learned_embeds.safetensors"])
  assert files == [str(out / n) for n in names]

  def load_both(ref, pipe, tmp):
    ref.load_lora_weights(str(out), weight_name=names[0])
    if fmt == "kohya":
      ref.load_textual_inversion(str(out / names[1]), token="<s0>")
    else:
      ref.load_textual_inversion(str(out))
    assert "<s0>_1" in ref.tokenizer.get_vocab()
    sampling = pivotal.sample(SampleRequest(pivotal.load(finished), pipe, pipe.params))
    return pipe, sampling, "<s0>"
  comparisons = compare_adapter(pipes["sd1"], model_dirs["sd1"], load_both)
  for c in comparisons[:2]:
    assert c.ok(DEFAULT_TOLERANCE), c
  assert comparisons[2].max_abs > 1e-3          # the LoRA and the rows moved diffusers' output


def test_sample_run_is_the_embedding_and_the_lora_files(finished, model_dirs, tmp_path, capsys):
  """`sample --run` samples a pivotal run as `--embedding` + `--lora` of its two files do."""
  from PIL import Image
  common = ["--model", str(model_dirs["sd1"]), "--prompt", "a photo of <s0>", "--steps", "2",
            "--height", "32", "--width", "32"]
  grids = []
  for i, given in enumerate((["--run", str(finished)],
                             ["--embedding", str(finished / "learned_embeds.safetensors"),
                              "--lora", str(finished / "lora.safetensors")])):
    assert main(["sample", *common, *given, "--out", str(tmp_path / f"s{i}")]) == 0
    grids.append(np.asarray(Image.open(tmp_path / f"s{i}" / "grid.png")))
  capsys.readouterr()
  np.testing.assert_array_equal(grids[0], grids[1])


def test_bad_tokens_name_the_field(pipes):
  """The Textual Inversion piece's checks, under pivotal's own option names."""
  from persona_jax import ConfigError
  pipe = pipes["sd1"]
  with pytest.raises(ConfigError, match="method.placeholder"):
    pivotal.make(pivotal.PivotalConfig(placeholder="ball"), pipe.params, pipe.tokenizer_dir,
                 pipe.unet_config)
  with pytest.raises(ConfigError, match="method.initializer"):
    pivotal.make(pivotal.PivotalConfig(initializer="two words"), pipe.params, pipe.tokenizer_dir,
                 pipe.unet_config)
