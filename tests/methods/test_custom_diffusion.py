"""Custom Diffusion on the training core: the method test bar (two concepts trained jointly, zoom
augmentation, regularization images), the BOS detach, the result file and the closed-form merge."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import ConfigError, tree
from persona_jax.cli import main
from persona_jax.methods import custom_diffusion as cd
from persona_jax.methods.custom_diffusion_merge import constrained_merge, text_features
from persona_jax.models.addons import DetachContextTokens
from persona_jax.models.attention import Attention
from persona_jax.train import loop
from tests.runs import fixed_batch_trajectory, _merge, one_device_mesh, write_class_images

TRANSFORMERS = ["down_blocks_0/attentions_0", "down_blocks_0/attentions_1",
                "up_blocks_1/attentions_0", "up_blocks_1/attentions_1", "up_blocks_1/attentions_2",
                "mid_block/attentions_0"]


def cd_config(model_dir, root, **overrides):
  """Two concepts (the example subject and 3 random images), zoom, 2 class images each."""
  values = dict(
      model=str(model_dir),
      method=dict(name="custom_diffusion", modifier_tokens=("<new1>", "<new2>"),
                  initializer_tokens=(42170, "pll")),
      data=dict(caption_source="prompt", resolution=32, zoom_augment=True, num_class_images=2,
                class_generate=False, concepts=(
                    dict(prompt="photo of a <new1> toy", class_prompt="photo of a toy",
                         class_dir=str(write_class_images(root / "c1", 2, seed=1))),
                    dict(instance_dir=str(write_class_images(root / "i2", 3, size=48, seed=3)),
                         prompt="photo of a <new2> cat", class_prompt="photo of a cat",
                         class_dir=str(write_class_images(root / "c2", 2, seed=2))))),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1,
                 scale_lr_class_rows=True),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def run(model_dirs, tmp_path_factory):
  return loop.build(cd_config(model_dirs["sd1"], tmp_path_factory.mktemp("cd")),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run)


def test_trainable_set_is_literal(run):
  expected = {"tokens"} | {f"unet/{t}/transformer_blocks_0/attn2/to_{kv}/kernel"
                           for t in TRANSFORMERS for kv in "kv"}
  assert set(tree.paths(run.trainable)) == expected
  assert run.trainable["tokens"].shape == (2, 32)
  assert run.models.unet.config.addons == (DetachContextTokens(1),)
  assert set(run.frozen) == {"unet", "text_encoder", "vae"}     # zoomed pixels are encoded per step


def test_crossattn_option_and_lr_scaled_by_all_rows(model_dirs, tmp_path):
  config = cd_config(model_dirs["sd1"], tmp_path,
                     method=dict(name="custom_diffusion", freeze_model="crossattn",
                                 modifier_tokens=(), initializer_tokens=()),
                     optim=dict(lr=1e-5, scale_lr=True, scale_lr_class_rows=True, warmup_steps=0))
  built = loop.build(config, mesh=one_device_mesh())
  leaves = {p.split("/attn2/")[1] for p in tree.paths(built.trainable)}
  assert leaves == {"to_q/kernel", "to_k/kernel", "to_v/kernel", "to_out_0/kernel", "to_out_0/bias"}
  assert len(tree.paths(built.trainable)) == 5 * len(TRANSFORMERS)
  assert built.method.conditioning.cacheable                    # no modifier token: contexts cached
  # 2 instance + 2 regularization rows: lr 1e-5 x 4 (diffusers' --scale_lr with prior doubles it).
  np.testing.assert_allclose(float(built.schedule(0)), 4e-5, rtol=1e-6)


def test_step_zero_reproduces_the_base(run):
  params = run.method.params.apply(run.frozen, run.trainable)
  base = tree.flatten(run.pipe.params)
  flat = tree.flatten(params)
  assert set(flat) - {"tokens"} == {p for p in base if p.split("/")[0] in run.frozen}
  for path, value in flat.items():
    if path != "tokens":
      assert np.array_equal(np.asarray(value), np.asarray(base[path])), path
  # The modifier tokens start as their initializers' rows: the conditioning equals the base's
  # with the initializer ids in their place.
  ids = run.tokenize(["photo of a <new1> toy", "photo of a <new2> cat"])
  base_ids = ids.copy()
  vocab = run.frozen["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape[0]
  pll = run.tokenizer("pll", add_special_tokens=False)["input_ids"][0]
  base_ids[base_ids == vocab] = 42170
  base_ids[base_ids == vocab + 1] = pll
  assert (ids >= vocab).sum() == 2
  ours = run.method.conditioning.encode(run.models, params | {"tokens": run.trainable["tokens"]}, ids)
  base = run.models.text_encoder.apply({"params": run.frozen["text_encoder"]}, base_ids).last_hidden_state
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))


def test_learning_rate_zero_moves_nothing(run, trajectory):
  for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_gradients_reach_every_layer_and_only_the_batch_tokens(run, trajectory):
  init, trained = tree.flatten(run.trainable), tree.flatten(trajectory["trained"])
  still = [p for p in init if p != "tokens" and np.array_equal(trained[p], init[p])]
  assert not still, f"{still[:3]} never got a gradient"
  vocab = run.frozen["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape[0]
  present = {int(i) - vocab for i in np.unique(trajectory["batch"]["ids"]) if i >= vocab}
  assert present                                 # the instance rows carry modifier tokens
  for row in range(2):                           # weight decay is 0: a row moves iff it is used
    moved = not np.array_equal(trained["tokens"][row], init["tokens"][row])
    assert moved == (row in present), (row, present)
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


def test_batch_has_zoom_masks_and_regularization_rows(trajectory):
  b = trajectory["batch"]
  np.testing.assert_array_equal(b["prior"], [0, 0, 1, 1])
  assert b["mask"].shape == (4, 16, 16, 1)                       # latent resolution (VAE factor 2)
  assert np.all(b["mask"][2:] == 1)                              # regularization rows: unmasked


def test_bos_key_and_value_are_detached():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8))
  context = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))

  def grads(n):
    layer = Attention(2, 4, detach_context_tokens=n, kernel="einsum")
    params = layer.init(jax.random.PRNGKey(2), x, context)
    out = layer.apply(params, x, context)
    g_ctx, g_params = jax.grad(lambda c, p: jnp.sum(layer.apply(p, x, c) ** 2), (0, 1))(context, params)
    return out, g_ctx, g_params
  out0, g0, p0 = grads(0)
  out1, g1, p1 = grads(1)
  np.testing.assert_array_equal(out0, out1)                                  # forward unchanged
  assert np.all(g1[:, 0] == 0) and np.any(g0[:, 0] != 0)
  np.testing.assert_allclose(g1[:, 1:], g0[:, 1:], rtol=1e-6)
  # The K/V weight gradient loses exactly position 0's contribution.
  assert not np.allclose(p1["params"]["to_k"]["kernel"], p0["params"]["to_k"]["kernel"])


def test_masked_loss_is_the_mean_over_the_mask():
  from persona_jax.diffusion.losses import Objective
  from persona_jax.diffusion.schedules import SchedulerConfig
  objective = Objective(SchedulerConfig(), 1.0)
  latents = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  mask = np.zeros((2, 4, 4, 1), np.float32)
  mask[0, 1:3, 1:3] = 1
  mask[1] = 1
  pred = jax.random.normal(jax.random.PRNGKey(1), latents.shape)
  loss, _, _ = objective.per_example_loss(latents, lambda noisy, t: (pred, None),
                                          jax.random.PRNGKey(2), mask)
  _, t = objective.draw(jax.random.PRNGKey(2), latents.shape)
  noise, _ = objective.draw(jax.random.PRNGKey(2), latents.shape)
  err = (np.asarray(pred) - np.asarray(noise)) ** 2                         # epsilon target
  np.testing.assert_allclose(loss[0], err[0, 1:3, 1:3].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss[1], err[1].mean(), rtol=1e-5)


def test_constrained_merge_solves_the_constrained_problem():
  rng = np.random.default_rng(0)
  w0, c, c_reg = rng.standard_normal((5, 8)), rng.standard_normal((3, 8)), rng.standard_normal((40, 8))
  v = rng.standard_normal((5, 3))
  w = constrained_merge(w0, c, v, c_reg)
  # Direct solution: per output row, minimize (w - w0)^T A (w - w0) s.t. C w = v_row, through the
  # KKT system [[2A, C^T], [C, 0]] [w; lambda] = [2A w0; v_row].
  a = c_reg.T @ c_reg
  kkt = np.block([[2 * a, c.T], [c, np.zeros((3, 3))]])
  direct = np.stack([np.linalg.solve(kkt, np.concatenate([2 * a @ w0[i], v[i]]))[:8] for i in range(5)])
  np.testing.assert_allclose(w, direct, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(w @ c.T, v, atol=1e-9)


def test_result_file_and_merge_command(run, trajectory, model_dirs, tmp_path):
  run_a, run_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
  assert loop.write_outputs(run, trajectory["trained"], run_a) == [str(run_a / cd.RESULT_FILE)]
  result = cd.load_result(run_a)
  assert [c["token"] for c in result.concepts] == ["<new1>", "<new2>"]
  assert result.concepts[1]["prompt"] == "photo of a <new2> cat"
  trained = tree.flatten(trajectory["trained"])
  np.testing.assert_array_equal(result.tokens, trained["tokens"])
  # A second "run": other weights, one concept whose token name clashes with run A's.
  from safetensors import safe_open

  from persona_jax.convert.files import write_safetensors
  rng = np.random.default_rng(1)
  b = {p: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
       for p, v in result.weights.items()}
  b["tokens"] = result.tokens[:1] + 0.3 * rng.standard_normal(result.tokens[:1].shape).astype(np.float32)
  write_safetensors(run_b / cd.RESULT_FILE, b, {
      "format": cd.FORMAT, "base_model": str(model_dirs["sd1"]),
      "concepts": json.dumps([{"token": "<new1>", "prompt": "a <new1> dog"}])})
  assert main(["merge", str(run_a), str(run_b), "--out", str(out)]) == 0
  with safe_open(out / cd.RESULT_FILE, "np") as f:
    concepts = json.loads(f.metadata()["concepts"])
  assert [c["token"] for c in concepts] == ["<new1>", "<new2>", "<new3>"]     # B's renamed
  merged = cd.load_result(out)
  # Every merged matrix maps each concept's target features exactly as that concept's run did.
  from persona_jax.pipeline import load_pipeline
  from persona_jax.tokenizer import tokenizers_with_tokens
  pipe = load_pipeline(model_dirs["sd1"])
  toks = tokenizers_with_tokens(pipe.tokenizer_dirs, ("<new1>", "<new2>", "<new3>"))
  feats = text_features(pipe, toks, merged.rows, ["<new1> toy", "<new2> cat", "<new3> dog"], [1] * 3)
  path = "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  for f, source in zip(feats, (result.weights, result.weights, b)):
    np.testing.assert_allclose(f @ merged.weights[path], f @ source[path], rtol=1e-4, atol=1e-5)
  base = tree.flatten(pipe.params)[path]
  assert not np.allclose(merged.weights[path], base)
  summary = json.loads((out / "merge.json").read_text())
  assert summary["layers"] == 2 * len(TRANSFORMERS) and summary["max_constraint_error"] < 1e-6
  # The merged folder samples through the command line with its three tokens.
  assert main(["sample", "--model", str(model_dirs["sd1"]), "--custom-diffusion", str(out),
               "--prompt", "photo of a <new3> dog", "--steps", "1", "--height", "16",
               "--width", "16", "--out", str(tmp_path / "samples")]) == 0
  assert (tmp_path / "samples" / "grid.png").is_file()


def test_sampling_a_result_equals_sampling_the_run(run, trajectory, tmp_path):
  loop.write_outputs(run, trajectory["trained"], tmp_path)
  params, tokenizer, conditioning = cd.with_result(cd.load_result(tmp_path), run.pipe)
  expected = run.full_params(trajectory["trained"])
  flat, want = tree.flatten(params), tree.flatten(expected)
  assert set(flat) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(want[path]), err_msg=path)
  prompts = ["photo of a <new2> cat in the snow", ""]
  ids = tokenizer(prompts, padding="max_length", max_length=77)["input_ids"]
  np.testing.assert_array_equal(ids, run.tokenize(prompts))
  inputs = {"ids": np.asarray(ids), "negative_ids": np.asarray(ids)}
  ours = conditioning.prepare(run.models, params, inputs)["context"]
  theirs = run.method.conditioning.prepare(run.models, expected, inputs)["context"]
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_merge_refuses_a_single_run_and_other_files(run, trajectory, tmp_path):
  assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  assert main(["merge", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "m")]) == 2


@pytest.mark.parametrize("method, match", [
    (dict(initializer_tokens=(42170,)), "method.initializer_tokens: 1 word"),
    (dict(modifier_tokens=("<a>", "<a>"), initializer_tokens=(1, 2)), "repeats a token"),
    (dict(freeze_model="all"), "method.freeze_model: 'all' is not one of"),
    (dict(initializer_tokens=("ktn", "pll")), "'ktn' is 2 tokens"),
])
def test_bad_options_are_named(model_dirs, tmp_path, method, match):
  method = {"name": "custom_diffusion", "modifier_tokens": ("<new1>", "<new2>"), **method}
  with pytest.raises(ConfigError, match=match):
    loop.build(cd_config(model_dirs["sd1"], tmp_path, method=method), mesh=one_device_mesh())


def test_a_result_for_another_base_is_a_one_line_error(pipes):
  """Leaves a result puts in place of the base's must exist at their shape (result_file.check_fits,
  shared by Custom Diffusion, E4T and FastComposer)."""
  from pathlib import Path

  from persona_jax.errors import ModelFileError
  path = "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  empty = np.zeros((0, 32), np.float32)
  wrong = cd.Result(Path("r.safetensors"), {path: np.zeros((3, 3), np.float32)}, empty, [], "b0")
  with pytest.raises(ModelFileError, match=rf"r.safetensors: {path} \[3, 3\] does not fit this "
                                           r"model \(\[\d+, \d+\]\); it was trained on b0"):
    cd.with_result(wrong, pipes["sd1"])
  missing = cd.Result(Path("r.safetensors"), {"unet/nowhere/kernel": np.zeros((3, 3))}, empty,
                      [], "b0")
  with pytest.raises(ModelFileError, match=r"\(missing\); it was trained on b0"):
    cd.with_result(missing, pipes["sd1"])
