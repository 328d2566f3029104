"""Pivotal tuning on an SDXL base (the tiny `sdxl` random model), as diffusers'
train_dreambooth_lora_sdxl_advanced.py: the new tokens' rows in both text encoders (`tokens`,
`tokens_2`) and a UNet LoRA; the pivot stops both row tables; the exports (the LoRA file and the
{"clip_l", "clip_g"} embedding) load in StableDiffusionXLPipeline as the script's README loads
them and reproduce our outputs. Slow: the training trajectory (loss falls, lr 0, frozen
bitwise) and the exports, whose pieces Textual Inversion's and LoRA's SDXL tests check by
default (the same step, the same two files)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.diffusion.conditioning import encode_sdxl_prompt, token_table
from persona_jax.methods import pivotal
from persona_jax.methods.registry import make_method
from persona_jax.tokenizer import tokenize_prompts, tokenizers_with_tokens
from persona_jax.train import loop
from persona_jax.train.config import load_config, run_config
from tests.markers import slow
from tests.runs import fixed_batch_trajectory, one_device_mesh

ATTENTION = {f"attn{i}/to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out_0")}


def recipe(sdxl_dir):
  """configs/pivotal.py's tiny recipe (its lr groups and pivot) on the tiny SDXL model: 2 rows
  per encoder for <s0> from "ball", rank 2 on the UNet's attention, 4 steps, the rows stopping
  after 2."""
  c = load_config("pivotal:tiny")
  c.model = str(sdxl_dir)
  c.method.rank = 2
  c.steps, c.batch_size, c.log_every, c.sample_prompts = 4, 1, 1, ()
  c.optim.warmup_steps = 1
  return run_config(c)


@pytest.fixture(scope="module")
def built(sdxl_dir, sdxl_pipe):
  """The method on the SDXL base, its initial trainable tree and tokenizers (no data pipeline)."""
  method = make_method("pivotal", recipe(sdxl_dir).method_options, sdxl_pipe.params,
                       sdxl_pipe.tokenizer_dir, sdxl_pipe.unet_config)
  trainable = method.params.init(jax.random.PRNGKey(0), sdxl_pipe.params)
  tokenizers = tokenizers_with_tokens(sdxl_pipe.tokenizer_dirs, method.tokens.added)
  return method, trainable, tokenizers


@pytest.fixture(scope="module")
def run(sdxl_dir):
  return loop.build(recipe(sdxl_dir), mesh=one_device_mesh())


def test_trainable_set_is_both_row_tables_and_the_unet_lora(built):
  method, trainable, tokenizers = built
  paths = set(tree.paths(trainable))
  assert trainable["tokens"].shape == (2, 32) and trainable["tokens_2"].shape == (2, 48)
  factors = {p.rsplit("/", 1)[0] for p in paths - {"tokens", "tokens_2"}}
  assert {p.rsplit("/", 1)[1] for p in paths - {"tokens", "tokens_2"}} == {"a", "b"}
  assert all(p.startswith("lora/unet/") for p in factors)
  assert {f.split("/transformer_blocks_")[1].split("/", 1)[1] for f in factors} == ATTENTION
  assert method.tokens.added == ("<s0>", "<s0>_1")
  assert [t.convert_tokens_to_ids(["<s0>", "<s0>_1"]) for t in tokenizers] == [[49408, 49409]] * 2


def test_neutral_init_reproduces_the_base_and_the_rows_are_the_initializer(built, sdxl_pipe):
  """Step 0: the UNet is the base's; a prompt without <s0> conditions as the base's (context and
  pooled), whatever the rows; <s0> is "ball ball" in both encoders."""
  method, trainable, tokenizers = built
  base = sdxl_pipe.params
  params = method.params.apply(base, trainable)
  for a, b in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(base["unet"])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  ball = tokenizers[0].convert_tokens_to_ids("ball</w>")
  for key, encoder in (("tokens", "text_encoder"), ("tokens_2", "text_encoder_2")):
    np.testing.assert_array_equal(trainable[key], np.stack([token_table(base, encoder)[ball]] * 2))

  @functools.partial(jax.jit, static_argnames="token_rows")
  def encode_ids(p, ids, token_rows):
    return encode_sdxl_prompt(sdxl_pipe.models(), p, ids["ids"], ids["ids_2"],
                              token_rows=token_rows)

  def encode(p, prompt, token_rows=True):
    return encode_ids(p, tokenize_prompts(tokenizers, [method.tokens.expand(prompt)]), token_rows)
  moved = dict(trainable, tokens=trainable["tokens"] + 1, tokens_2=trainable["tokens_2"] + 1)
  for a, b in zip(encode(method.params.apply(base, moved), "a photo of a toy"),
                  encode(base, "a photo of a toy", token_rows=False)):
    np.testing.assert_array_equal(a, b)
  assert method.tokens.expand("a photo of <s0>") == "a photo of <s0> <s0>_1"
  for a, b in zip(encode(params, "a photo of <s0>"), encode(params, "a photo of ball ball")):
    np.testing.assert_array_equal(a, b)


def test_the_pivot_stops_both_row_tables_and_the_lora_goes_on(built, sdxl_dir):
  """The recipe's lr group ("tokens(_2)?", lr, 0.5) over its 4 steps (its optimizer on the rows
  and one LoRA factor): step 0 is the warm-up's lr 0; both encoders' rows get an update in step
  1 and none after; the LoRA factor in every step."""
  from persona_jax.train.optim import make_optimizer
  config = recipe(sdxl_dir)
  flat = tree.flatten(built[1])
  lora = next(p for p in flat if p.startswith("lora/"))
  params = tree.unflatten({p: flat[p] for p in ("tokens", "tokens_2", lora)})
  tx, _ = make_optimizer(config.optim, params, total_steps=config.steps, batch_size=1)
  update, state = jax.jit(tx.update), tx.init(params)
  moved = []
  for _ in range(4):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    nonzero = {p: float(jnp.abs(v).max()) > 0 for p, v in tree.flatten(updates).items()}
    moved.append([nonzero["tokens"], nonzero["tokens_2"], nonzero[lora]])
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  assert moved == [[False, False, False], [True, True, True]] + [[False, False, True]] * 2


@pytest.fixture(scope="module")
def finished(run, tmp_path_factory):
  """A trained-looking state (rows and LoRA up-factors moved) written as a run folder."""
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
      np.float32), jax.device_get(run.trainable))
  wd = tmp_path_factory.mktemp("runs") / "my_pivotal_xl"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(run.config.to_dict()))
  written = loop.write_outputs(run, trained, wd)
  assert sorted(written) == [str(wd / "learned_embeds.safetensors"), str(wd / "lora.safetensors")]
  return wd


@slow
def test_diffusers_export_loads_as_the_sdxl_script_readme_does(finished, sdxl_dir, sdxl_pipe,
                                                               tmp_path, capsys):
  """`export --format diffusers`: pytorch_lora_weights.safetensors and learned_embeds.safetensors
  = {"clip_l", "clip_g"}; StableDiffusionXLPipeline loads them with load_lora_weights and
  load_textual_inversion(state_dict["clip_l"|"clip_g"], token=[...], text_encoder(_2)=,
  tokenizer(_2)=); its SDXL conditioning and UNet output on "<s0>" equal ours."""
  from tests.torch_reference import require_torch
  require_torch()
  from safetensors.torch import load_file

  from persona_jax.methods.spec import SampleRequest
  from persona_jax.verify import DEFAULT_TOLERANCE, compare_adapter
  out = tmp_path / "out"
  assert main(["export", str(finished), "--format", "diffusers", "--out", str(out)]) == 0
  files = capsys.readouterr().out.split()
  assert files == [str(out / "pytorch_lora_weights.safetensors"),
                   str(out / "learned_embeds.safetensors")]
  assert sorted(load_file(files[1])) == ["clip_g", "clip_l"]

  def load_both(ref, pipe, tmp):
    ref.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    state_dict = load_file(files[1])
    ref.load_textual_inversion(state_dict["clip_l"], token=["<s0>", "<s0>_1"],
                               text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state_dict["clip_g"], token=["<s0>", "<s0>_1"],
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    sampling = pivotal.sample(SampleRequest(pivotal.load(finished), pipe, pipe.params))
    return pipe, sampling, "<s0>"
  comparisons = compare_adapter(sdxl_pipe, sdxl_dir, load_both)
  for c in comparisons[:2]:
    assert c.ok(DEFAULT_TOLERANCE), c
  assert comparisons[2].max_abs > 1e-3          # the LoRA and the rows moved diffusers' output


@slow
def test_kohya_export_loads_in_diffusers(finished, sdxl_dir, sdxl_pipe, tmp_path, capsys):
  """`export --format kohya`: <run>.safetensors (lora_unet_...) and the A1111 SDXL embedding
  s0.safetensors (clip_l, clip_g; the webui's trigger word is the file name, diffusers takes
  token=)."""
  from tests.torch_reference import require_torch
  require_torch()
  from safetensors.torch import load_file

  from persona_jax.methods.spec import SampleRequest
  from persona_jax.verify import DEFAULT_TOLERANCE, compare_adapter
  out = tmp_path / "out"
  assert main(["export", str(finished), "--format", "kohya", "--out", str(out)]) == 0
  files = capsys.readouterr().out.split()
  assert files == [str(out / "my_pivotal_xl.safetensors"), str(out / "s0.safetensors")]

  def load_both(ref, pipe, tmp):
    ref.load_lora_weights(str(out), weight_name="my_pivotal_xl.safetensors")
    state_dict = load_file(files[1])
    for key, encoder, tokenizer in (("clip_l", ref.text_encoder, ref.tokenizer),
                                    ("clip_g", ref.text_encoder_2, ref.tokenizer_2)):
      ref.load_textual_inversion(state_dict[key], token="<s0>", text_encoder=encoder,
                                 tokenizer=tokenizer)
    sampling = pivotal.sample(SampleRequest(pivotal.load(finished), pipe, pipe.params))
    return pipe, sampling, "<s0>"
  comparisons = compare_adapter(sdxl_pipe, sdxl_dir, load_both)
  for c in comparisons[:2]:
    assert c.ok(DEFAULT_TOLERANCE), c


@slow
def test_method_bar(run):
  """lr 0 (the warm-up step) moves nothing; then every leaf moves; the loss falls; the frozen
  UNet and text encoders stay bit-identical."""
  trajectory = fixed_batch_trajectory(run, steps=3)
  for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  init, last = tree.flatten(run.trainable), tree.flatten(trajectory["trained"])
  still = [p for p in init if np.array_equal(init[p], last[p])]
  assert not still, f"{len(still)} leaves never got a gradient, e.g. {still[:3]}"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


@slow
def test_sample_run_is_the_embedding_and_the_lora_files(finished, sdxl_dir, tmp_path, capsys):
  """`sample --run` samples a pivotal SDXL run as `--embedding` + `--lora` of its two files do."""
  from PIL import Image
  common = ["--model", str(sdxl_dir), "--prompt", "a photo of <s0>", "--steps", "2",
            "--height", "32", "--width", "32"]
  grids = []
  for i, given in enumerate((["--run", str(finished)],
                             ["--embedding", str(finished / "learned_embeds.safetensors"),
                              "--lora", str(finished / "lora.safetensors")])):
    assert main(["sample", *common, *given, "--out", str(tmp_path / f"s{i}")]) == 0
    grids.append(np.asarray(Image.open(tmp_path / f"s{i}" / "grid.png")))
  capsys.readouterr()
  np.testing.assert_array_equal(grids[0], grids[1])
