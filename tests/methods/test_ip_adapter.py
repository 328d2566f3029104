"""IP-Adapter on the training core: the method test bar (trainable leaves a literal list, non-zero
gradients, frozen bit-identical, loss falls, lr 0 moves nothing), the base reproduced with the
branch off and the decoupled attention on its own, the condition drops, several images, and the
official file layout both ways against diffusers' `load_ip_adapter` (basic and plus). The sd1
preset with one layer per block and a tiny random CLIP image encoder (tests/methods/test_e4t.py)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.data.pipeline import make_iterator
from persona_jax.methods import ip_adapter as ipa
from persona_jax.methods import ip_adapter_conditioning as ipc
from persona_jax.methods import ip_adapter_verify as ipv
from persona_jax.data.batch import CLIP_PIXELS, IDS
from persona_jax.models.addons import DecoupledCrossAttention
from persona_jax.train import loop
from tests.methods.test_e4t import write_model
from tests.markers import slow
from tests.runs import (assert_training_bar, fixed_batch_trajectory, ip_config, one_device_mesh,
                        write_image_encoder)

TRANSFORMERS = ["down_blocks_0/attentions_0", "up_blocks_1/attentions_0",
                "up_blocks_1/attentions_1", "mid_block/attentions_0"]
IP_LAYERS = [f"unet/{t}/transformer_blocks_0/attn2/to_{m}_ip/kernel"
             for t in TRANSFORMERS for m in "kv"]
PROJECTION = ["ip_adapter/image_proj/proj/kernel", "ip_adapter/image_proj/proj/bias",
              "ip_adapter/image_proj/norm/scale", "ip_adapter/image_proj/norm/bias"]
# diffusers' attn_processors order: down, up, mid (ids 1, 3, 5, 7)
OFFICIAL_IDS = {1: TRANSFORMERS[0], 3: TRANSFORMERS[1], 5: TRANSFORMERS[2], 7: TRANSFORMERS[3]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("ip_model") / "model")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return write_image_encoder(tmp_path_factory.mktemp("ip_image_encoder"))


@pytest.fixture(scope="module")
def run(model_dir, encoder_dir):
  return loop.build(ip_config(model_dir, encoder_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=4)


def test_trainable_set_is_literal(run):
  assert set(tree.paths(run.trainable)) == set(PROJECTION + IP_LAYERS)
  assert set(run.frozen) == {"unet", "text_encoder", "image_encoder"}       # VAE moments cached
  assert run.method.unet == (DecoupledCrossAttention(),)
  flat, base = tree.flatten(run.trainable), tree.flatten(run.pipe.params)
  for path in IP_LAYERS:                       # to_k_ip / to_v_ip start as the layer's to_k / to_v
    np.testing.assert_array_equal(flat[path], base["unet/" + path[5:].replace("_ip/", "/")])
  assert flat[PROJECTION[0]].shape == (16, 4 * 32)          # projection_dim 16 -> 4 tokens of 32


def test_training_bar(run, trajectory):
  """Every trainable leaf moves, frozen params are bit-identical, the loss falls on a fixed
  batch, lr 0 moves nothing; each example is conditioned on its own image."""
  assert_training_bar(run, trajectory)
  batch = trajectory["batch"]
  assert batch[CLIP_PIXELS].shape == (2, 16, 16, 3)
  assert not np.array_equal(batch[CLIP_PIXELS][0], batch[CLIP_PIXELS][1])


@pytest.fixture(scope="module")
def probe(run):
  """One compiled program with the initial adapter (to_[kv]_ip = to_[kv]) on the first batch's
  latents shape: the base UNet; the adapter UNet at scale 0 and at per-example scales; with the
  text context as the image tokens (the branch on its own); the conditioning's tokens and
  context for each condition drop; one image vs the same image twice at sampling."""

  from persona_jax.models.unet import UNet2DConditionModel
  params = run.method.params.apply(run.frozen, run.trainable)
  cond = run.method.conditioning
  base_unet = UNet2DConditionModel(run.pipe.unet_config)
  ip_unet = run.models.unet
  batch = jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))
  noisy = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))
  t = jnp.asarray([10, 700])

  @jax.jit
  def go(params, batch):
    out = {}
    m = run.models
    state = cond.prepare(m, params, {IDS: batch[IDS], CLIP_PIXELS: batch[CLIP_PIXELS]})
    ctx, tokens = state["context"], state["tokens"]
    out["tokens"], out["ctx"] = tokens, ctx
    unet = lambda p, extra: ip_unet.apply({"params": p}, noisy, t, ctx, extra)
    out["scale0"] = unet(params["unet"], {"ip_tokens": tokens, "ip_scale": 0.0})
    out["scales"] = unet(params["unet"], {"ip_tokens": tokens, "ip_scale": jnp.asarray([0.0, 1.0])})
    # to_k_ip/to_v_ip = to_k/to_v and the text as image tokens: Attn + Attn = 2 Attn, i.e. the
    # base with every attn2 to_out_0 kernel doubled.
    out["self"] = unet(params["unet"], {"ip_tokens": ctx})
    doubled = tree.unflatten({p: (2 * v if p.endswith("attn2/to_out_0/kernel") else v)
                              for p, v in tree.flatten(run.pipe.params["unet"]).items()})
    out["doubled"] = base_unet.apply({"params": doubled}, noisy, t, ctx)
    drops = {}
    for d in range(4):
      s = cond.prepare(m, params, {IDS: batch[IDS], CLIP_PIXELS: batch[CLIP_PIXELS],
                                   ipc.DROP: jnp.asarray([d, 0], jnp.int32)})
      drops[d] = (s["context"][0], s["tokens"][0])
    out["drops"] = drops
    out["zeros"] = cond.project(params, jnp.zeros((1, cond.projection.image_dim)))[0]
    empty = jnp.asarray([cond.empty_ids], jnp.int32)
    out["empty"] = m.text_encoder.apply({"params": params["text_encoder"]}, empty).last_hidden_state[0]
    one = batch[CLIP_PIXELS][:1, None]                                  # [1, 1, S, S, 3]
    two = jnp.concatenate([one, one], axis=1)                           # [1, 2, S, S, 3]
    inputs = lambda px: {IDS: batch[IDS][:1], "negative_ids": batch[IDS][:1], CLIP_PIXELS: px}
    for name, px in (("one", one), ("two", two)):
      state = cond.prepare(m, params, dict(inputs(px), ip_scale=jnp.asarray([0.7])))
      c, _ = cond.at(m, params, state, None, None, 0)
      u = cond.negative(m, params, state)
      out[name] = ip_unet.apply({"params": params["unet"]}, noisy[:1], t[:1], **c)
      if name == "one":
        out["one_uncond"] = ip_unet.apply({"params": params["unet"]}, noisy[:1], t[:1], **u)
      out[name + "_tokens"] = c["streams"]["ip_tokens"]
      out[name + "_negative"] = u["streams"]["ip_tokens"]
      out[name + "_scales"] = (c["streams"]["ip_scale"], u["streams"]["ip_scale"])
    return out
  out = jax.device_get(go(params, batch))
  # The base in its own program (one program holding both may fuse them differently).
  out["base"] = jax.device_get(jax.jit(lambda p, c: base_unet.apply({"params": p}, noisy, t, c))(
      run.pipe.params["unet"], out["ctx"]))
  return out


def test_branch_off_reproduces_the_base_exactly(probe):
  np.testing.assert_array_equal(probe["scale0"], probe["base"])
  np.testing.assert_array_equal(probe["scales"][0], probe["base"][0])      # per-example scale
  assert np.abs(probe["scales"][1] - probe["base"][1]).max() > 1e-3


def test_decoupled_attention_on_its_own(probe):
  """Attn(Q, K, V) + 1 * Attn(Q, K_ip, V_ip) with K_ip, V_ip of the same tokens = 2 Attn."""
  np.testing.assert_allclose(probe["self"], probe["doubled"], rtol=1e-5, atol=1e-5)


def test_condition_drops_in_the_step(probe):
  """1: the image's tokens become the zeros'; 2: the caption the empty one; 3: both."""
  keep_ctx, keep_tokens = probe["drops"][0]
  assert probe["tokens"].shape == (2, 4, 32)
  np.testing.assert_allclose(probe["drops"][1][1], probe["zeros"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(probe["drops"][1][0], keep_ctx)
  np.testing.assert_array_equal(probe["drops"][2][1], keep_tokens)
  np.testing.assert_allclose(probe["drops"][2][0], probe["empty"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(probe["drops"][3][1], probe["zeros"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(probe["drops"][3][0], probe["empty"], rtol=0, atol=1e-5)
  assert not np.allclose(keep_tokens, probe["zeros"])
  assert not np.allclose(keep_ctx, probe["empty"])


def test_condition_drop_draws():
  """The data hook's one uniform draw per example: image only, text only, both at their rates;
  without the pipeline's generator nothing is dropped."""
  from persona_jax.data.clip_images import CLIPImageProcessorConfig
  hook = ipc.ConditionInputs(CLIPImageProcessorConfig.for_image_size(16), 0.05, 0.1, 0.15)
  image = np.zeros((20, 20, 3), np.uint8)
  rng = np.random.default_rng(0)
  drops = np.asarray([hook(image, rng=rng)[ipc.DROP] for _ in range(3000)])
  np.testing.assert_allclose([np.mean(drops == d) for d in range(4)], [0.7, 0.05, 0.1, 0.15],
                             atol=0.02)
  out = hook(image)
  assert out[ipc.DROP] == 0 and out[CLIP_PIXELS].shape == (16, 16, 3)


def test_two_identical_images_give_the_one_image_result(probe):
  """Several images: their tokens concatenated (diffusers' multi-image handling)."""
  assert probe["one_tokens"].shape == (1, 4, 32) and probe["two_tokens"].shape == (1, 8, 32)
  np.testing.assert_allclose(probe["two"], probe["one"], rtol=0, atol=1e-5)
  # The negative half: the zeros' tokens, once per image, at the same traced scale.
  np.testing.assert_array_equal(probe["two_negative"],
                                np.concatenate([probe["one_negative"]] * 2, axis=1))
  np.testing.assert_allclose(probe["one_negative"][0], probe["zeros"], rtol=0, atol=1e-5)
  for s in probe["one_scales"]:
    np.testing.assert_allclose(s, [0.7])
  assert np.abs(probe["one"] - probe["one_uncond"]).max() > 1e-4


PLUS_PROJECTION = (
    [f"ip_adapter/image_proj/{leaf}" for leaf in (
        "latents", "proj_in/kernel", "proj_in/bias", "proj_out/kernel", "proj_out/bias",
        "norm_out/scale", "norm_out/bias")]
    + [f"ip_adapter/image_proj/layers_0_attn/{leaf}" for leaf in (
        "norm1/scale", "norm1/bias", "norm2/scale", "norm2/bias", "to_q/kernel", "to_kv/kernel",
        "to_out/kernel")]
    + [f"ip_adapter/image_proj/layers_0_ff/{leaf}" for leaf in (
        "norm/scale", "norm/bias", "fc1/kernel", "fc2/kernel")])


def method_for(run, **options):
  """The method of `run`'s base with other options, and its initial trainable leaves."""
  from persona_jax.methods.registry import make_method
  method = make_method("ip_adapter", dict(run.config.method_options, **options), run.pipe.params,
                       run.pipe.tokenizer_dir, run.pipe.unet_config)
  return method, method.params.init(jax.random.PRNGKey(0), run.pipe.params)


@pytest.fixture(scope="module")
def plus_run(model_dir, encoder_dir):
  """The Plus variant: a one-layer resampler over the penultimate layer's 5 tokens."""
  return loop.build(ip_config(model_dir, encoder_dir, method=dict(kind="plus", depth=1)),
                    mesh=one_device_mesh())


def test_plus_trainable_set_is_literal(run):
  """Nothing of the base trains (no select rules): the trainable leaves are the added ones."""
  method, trainable = method_for(run, kind="plus", depth=1)
  assert method.params.select == ()
  assert set(tree.paths(trainable)) == set(PLUS_PROJECTION + IP_LAYERS)
  flat = tree.flatten(trainable)
  assert flat["ip_adapter/image_proj/latents"].shape == (1, 16, 32)        # 16 queries
  assert flat["ip_adapter/image_proj/proj_in/kernel"].shape == (16, 32)    # hidden_size 16 -> 32
  assert flat["ip_adapter/image_proj/layers_0_attn/to_q/kernel"].shape == (32, 64)   # 1 head of 64


@slow
def test_plus_training_bar(plus_run):
  """The bar for the Plus variant (its own train-step compilation: slow only)."""
  trajectory = fixed_batch_trajectory(plus_run, steps=4)
  assert_training_bar(plus_run, trajectory)


def test_training_starts_from_an_official_file(run, exported):
  """method.pretrained: the file's leaves are the initial trainable state."""
  file, trained = exported
  _, start = method_for(run, pretrained=str(file))
  assert set(tree.flatten(start)) == set(tree.flatten(trained))
  for path, value in tree.flatten(trained).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(start)[path]), value, err_msg=path)


# ---------------------------------------------------------------------------------------------
# The official layout, both ways, against diffusers' load_ip_adapter.


def official_keys(n_layers=4):
  return {f"ip_adapter.{2 * i + 1}.to_{m}_ip.weight" for i in range(n_layers) for m in "kv"}


def check_against_diffusers(run, model_dir, encoder_dir, file, kind):
  results = ipv.compare_ip_adapter(run.pipe, model_dir, file, encoder_dir, scale=0.6)
  assert [r.name for r in results][:3] == [f"ip_adapter({kind}).image_features",
                                           f"ip_adapter({kind}).image_proj tokens",
                                           f"ip_adapter({kind}).unet (scale 0.6)"]
  for r in results[:3]:
    assert r.ok(1e-4), r
  assert results[3].max_rel > 1e-3                       # diffusers really used the file


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """(result file, trained leaves): a stand-in for a trained state (every leaf moved)."""
  rng = np.random.default_rng(1)
  trained = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                         jax.device_get(run.trainable))
  (file,) = loop.write_outputs(run, trained, tmp_path_factory.mktemp("ip_run"))
  return file, trained


def test_our_file_loads_in_diffusers(run, model_dir, encoder_dir, exported):
  """Training's result is the official layout: diffusers' load_ip_adapter reads it and gives
  our features, tokens and UNet output; reading it back gives the trained leaves."""
  from tests.torch_reference import require_torch
  require_torch()
  file, trained = exported
  state = ipa.read_official(file)
  assert set(state) == official_keys() | {"image_proj.proj.weight", "image_proj.proj.bias",
                                          "image_proj.norm.weight", "image_proj.norm.bias"}
  for i, block in OFFICIAL_IDS.items():
    np.testing.assert_array_equal(
        state[f"ip_adapter.{i}.to_k_ip.weight"],
        tree.flatten(trained)[f"unet/{block}/transformer_blocks_0/attn2/to_k_ip/kernel"].T)
  _, back = ipa.from_official(state, run.pipe.params["unet"], 32, "test")
  for path, value in tree.flatten(trained).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), value, err_msg=path)
  check_against_diffusers(run, model_dir, encoder_dir, file, "basic")


def write_torch_official(path, kind, seed=0):
  """A random IP-Adapter in the official key layout, written with torch + safetensors as a
  diffusers user would (basic: 4 tokens; plus: a 4-layer resampler (the only depth diffusers
  reads), 1 head of 64, 4 queries)."""
  import torch
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(seed)
  r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)
  d, e, h = 32, 16, 16                        # cross-attention, projection_dim, hidden_size
  if kind == "basic":
    state = {"image_proj.proj.weight": r(4 * d, e), "image_proj.proj.bias": r(4 * d),
             "image_proj.norm.weight": 1 + r(d), "image_proj.norm.bias": r(d)}
  else:
    state = {"image_proj.latents": r(1, 4, d), "image_proj.proj_in.weight": r(d, h),
             "image_proj.proj_in.bias": r(d), "image_proj.proj_out.weight": r(d, d),
             "image_proj.proj_out.bias": r(d), "image_proj.norm_out.weight": 1 + r(d),
             "image_proj.norm_out.bias": r(d)}
    for n in range(4):
      p = f"image_proj.layers.{n}."
      state.update({p + "0.norm1.weight": 1 + r(d), p + "0.norm1.bias": r(d),
                    p + "0.norm2.weight": 1 + r(d), p + "0.norm2.bias": r(d),
                    p + "0.to_q.weight": r(64, d), p + "0.to_kv.weight": r(128, d),
                    p + "0.to_out.weight": r(d, 64), p + "1.0.weight": 1 + r(d),
                    p + "1.0.bias": r(d), p + "1.1.weight": r(4 * d, d), p + "1.3.weight": r(d, 4 * d)})
  widths = {1: 32, 3: 32, 5: 32, 7: 64}       # block_out_channels (32, 64): down 0, up 1, up 1, mid
  for i, width in widths.items():
    state[f"ip_adapter.{i}.to_k_ip.weight"] = r(width, d)
    state[f"ip_adapter.{i}.to_v_ip.weight"] = r(width, d)
  save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  return path


@pytest.mark.parametrize("kind", ["basic", "plus"])
def test_official_file_written_by_torch_loads_and_matches_diffusers(run, model_dir, encoder_dir,
                                                                    tmp_path, kind, capsys):
  """A torch-written official file: persona_jax reads its projection (basic or plus) and
  `persona-jax verify MODEL --ip-adapter FILE --image-encoder DIR` matches diffusers."""
  from tests.torch_reference import require_torch
  require_torch()
  file = write_torch_official(tmp_path / f"ip-adapter-{kind}_sd15.safetensors", kind)
  config, _ = ipa.from_official(ipa.read_official(file), run.pipe.params["unet"], 32, "test")
  assert config.kind == kind
  if kind == "plus":
    assert (config.num_tokens, config.depth, config.heads, config.image_dim, config.ff_mult) == (4, 4, 1, 16, 4)
  if kind == "basic":           # the command, with 3 DDIM steps against diffusers' pipeline
    assert main(["verify", str(model_dir), "--ip-adapter", str(file), "--image-encoder",
                 str(encoder_dir)]) == 0
  else:                         # the same check without the steps (one sampler compilation)
    import dataclasses
    import functools

    from persona_jax.verify import verify
    hook = dataclasses.replace(ipa.SPEC.verify,
                               run=functools.partial(ipa.verify_file, sampling_steps=0))
    assert verify(model_dir, image_encoder=encoder_dir, adapter=(hook, file))
  out = capsys.readouterr().out
  assert f"ip_adapter({kind}).unet (scale 0.6)" in out and "image_encoder.image_embeds" in out
  assert (f"ip_adapter({kind}).ddim 3 steps, cfg 7.5: latents" in out) == (kind == "basic")
  assert out.strip().endswith("PASS")


def test_sample_command_with_two_images(exported, tmp_path, capsys):
  """`sample --ip-adapter FILE --image A --image B`: the base model and image encoder come from
  the result's metadata; the scale is a traced input."""
  file, _ = exported
  images = sorted(loop.data.example_subject_dir().glob("*.png"))[:2]
  grids = []
  for given in (["--ip-adapter", str(file)], ["--run", str(Path(file).parent)]):
    out = tmp_path / f"samples{len(grids)}"
    assert main(["sample", *given, "--image", str(images[0]), "--image", str(images[1]),
                 "--ip-scale", "0.5", "--prompt", "a ball", "--steps", "2", "--out", str(out)]) == 0
    grids.append(np.asarray(Image.open(out / "grid.png")))
  np.testing.assert_array_equal(*grids)
  assert main(["sample", "--ip-adapter", str(file), "--prompt", "a ball", "--out", str(out)]) != 0
  assert "--ip-adapter needs --image PATH" in capsys.readouterr().err


def test_pickled_file_needs_opt_in(exported, tmp_path):
  """The official .bin ({"image_proj": {...}, "ip_adapter": {...}}, a torch pickle) is read only
  with allow_pickle, and then gives the safetensors file's state."""
  from persona_jax.errors import PickleRefusedError
  from tests.torch_reference import require_torch
  torch = require_torch()
  state = ipa.read_official(exported[0])
  nested = {group: {k[len(group) + 1:]: torch.from_numpy(v) for k, v in state.items()
                    if k.startswith(group + ".")} for group in ("image_proj", "ip_adapter")}
  path = tmp_path / "ip-adapter_sd15.bin"
  torch.save(nested, str(path))
  with pytest.raises(PickleRefusedError, match="refusing to load a pickle file"):
    ipa.read_official(path)
  back = ipa.read_official(path, allow_pickle=True)
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_export_command_writes_the_file_and_its_image_encoder(run, exported, tmp_path):
  """`export WORKDIR --format diffusers`: the official file and OUT/image_encoder/, which
  diffusers' load_ip_adapter(..., image_encoder_folder="image_encoder") loads too."""
  import shutil

  from persona_jax.train.loop import _write_config
  from tests.torch_reference import require_torch
  require_torch()
  file, _ = exported
  workdir = tmp_path / "run"
  workdir.mkdir()
  _write_config(workdir, run.config)
  shutil.copyfile(file, workdir / ipa.RESULT_FILE)
  out = tmp_path / "exported"
  assert main(["export", str(workdir), "--format", "diffusers", "--out", str(out)]) == 0
  assert (out / ipa.RESULT_FILE).read_bytes() == Path(file).read_bytes()
  import torch
  from diffusers import StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained(run.model_dir, safety_checker=None,
                                                 local_files_only=True, dtype=torch.float32)
  pipe.load_ip_adapter(str(out), subfolder="", weight_name=ipa.RESULT_FILE,
                       image_encoder_folder="image_encoder")
  assert pipe.image_encoder is not None and pipe.image_encoder.config.projection_dim == 16


def test_config_trains_at_the_papers_global_batch():
  """Ye et al. 2023 (sec. 4.1.2) train on 8 GPUs at tencent-ailab's tutorial_train.py default
  --train_batch_size 8 per GPU: a global batch of 64, AdamW lr 1e-4, weight decay 0.01. Our
  batch_size counts rows over all devices, so the config says 64; its docstring agrees."""
  from persona_jax.train.config import load_config, run_config
  config = run_config(load_config("ip_adapter"))
  assert (config.batch_size, config.optim.lr, config.optim.weight_decay) == (64, 1e-4, 1e-2)
  import importlib.resources
  doc = (importlib.resources.files("persona_jax.configs") / "ip_adapter.py").read_text()
  assert "a global batch of 64" in doc.replace("\n   ", "")
  assert run_config(load_config("ip_adapter:tiny")).batch_size == 4
