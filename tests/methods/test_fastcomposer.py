"""FastComposer on the training core: both variants' literal trainable sets and the method test bar
(non-zero gradients everywhere, frozen bit-identical, loss falls, lr 0 moves nothing), the branch
off (no subjects: the base's text path and output bit for bit) and on its own (only the marked
nouns change), the marker convention, delayed conditioning, the localization loss against a
hand-written reference, the middle-min(5, n) block rule, the data folder and `sample
--fastcomposer`. The model and image encoder are E4T's test stand-ins (toy-world scenes as data)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persona_jax import ConfigError, tree
from persona_jax.errors import ModelFileError
from persona_jax.cli import main
from persona_jax.data import fastcomposer as fc_data
from persona_jax.data.images import DataError
from persona_jax.data.pipeline import make_iterator
from persona_jax.methods import fastcomposer as fc
from persona_jax.data.batch import IDS
from persona_jax.methods.spec import SampleRequest
from persona_jax.models.addons import AttentionMaps
from persona_jax.models.postfuse import PostfuseModule
from persona_jax.world.fastcomposer_data import toy_examples
from persona_jax.models.configs import UNetConfig
from persona_jax.train import loop
from tests.methods.test_e4t import write_model
from tests.runs import (_merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh,
                        write_image_encoder)

FUSE = [f"fastcomposer/fuse/{m}/{layer}/{leaf}"
        for m in ("mlp1", "mlp2") for layer, leaves in (("layernorm", ("scale", "bias")),
                                                         ("fc1", ("kernel", "bias")),
                                                         ("fc2", ("kernel", "bias")))
        for leaf in leaves] + ["fastcomposer/fuse/layer_norm/scale", "fastcomposer/fuse/layer_norm/bias"]
IMAGE_LAYERS = [f"image_encoder/vision_model/encoder/layers_{i}/{p}/{leaf}"
                for i in (2, 3)
                for p, leaves in (("layer_norm1", ("scale", "bias")), ("layer_norm2", ("scale", "bias")),
                                  ("mlp/fc1", ("kernel", "bias")), ("mlp/fc2", ("kernel", "bias")),
                                  ("self_attn/q_proj", ("kernel", "bias")),
                                  ("self_attn/k_proj", ("kernel", "bias")),
                                  ("self_attn/v_proj", ("kernel", "bias")),
                                  ("self_attn/out_proj", ("kernel", "bias")))
                for leaf in leaves]
TRANSFORMERS = ["down_blocks_0/attentions_0", "mid_block/attentions_0", "up_blocks_1/attentions_0",
                "up_blocks_1/attentions_1"]
LORA = [f"lora/unet/{t}/{layer}/{f}" for t in TRANSFORMERS
        for layer in ["proj_in", "proj_out", "transformer_blocks_0/ff/net_0/proj",
                      "transformer_blocks_0/ff/net_2"]
        + [f"transformer_blocks_0/attn{i}/to_{m}" for i in (1, 2) for m in ("q", "k", "v", "out_0")]
        for f in "ab"]


def fc_config(model_dir, encoder_dir, **overrides):
  """32px toy-world scenes, batch 2, every subject shown, one warm-up step (lr 0 at step 0)."""
  values = dict(
      model=str(model_dir),
      method=dict(name="fastcomposer", variant="full", image_encoder=str(encoder_dir),
                  max_subjects=2, uncondition_prob=0.0, object_appear_prob=1.0,
                  localization_weight=1.0),
      data=dict(source=fc.TOY_SOURCE, resolution=32, num_images=4, random_flip=0.0),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("fc_model") / "model")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return write_image_encoder(tmp_path_factory.mktemp("fc_image_encoder"))


@pytest.fixture(scope="module")
def full(model_dir, encoder_dir):
  return loop.build(fc_config(model_dir, encoder_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def light(model_dir, encoder_dir):
  return loop.build(fc_config(model_dir, encoder_dir, method=dict(variant="light", lora_rank=2)),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def full_trajectory(full):
  """Plain SGD: AdamW over every UNet leaf doubles the compile time and is not what is tested."""
  return fixed_batch_trajectory(dataclasses.replace(full, tx=optax.sgd(full.schedule)), steps=3)


@pytest.fixture(scope="module")
def light_trajectory(light):
  return fixed_batch_trajectory(light, steps=3)


def test_trainable_sets_are_literal(full, light):
  unet = {f"unet/{p}" for p in tree.paths(full.pipe.params["unet"])}
  assert set(tree.paths(full.trainable)) == set(FUSE + IMAGE_LAYERS) | unet
  assert set(tree.paths(light.trainable)) == set(FUSE + LORA)
  assert set(full.frozen) == {"text_encoder", "image_encoder", "vae"}
  assert set(light.frozen) == {"unet", "text_encoder", "image_encoder", "vae"}
  assert full.method.tokens.added == (fc.IMAGE_TOKEN,)
  assert full.method.unet == (AttentionMaps(("IN01", "MID", "OUT02", "OUT03")),)


@pytest.mark.parametrize("variant", ["full", "light"])
def test_training_bar(variant, request):
  """Every trainable leaf moves (non-zero gradients), frozen params are bit-identical, the loss
  falls on a fixed batch, and lr 0 (the warm-up step) moves nothing."""
  run = request.getfixturevalue(variant)
  trajectory = request.getfixturevalue(f"{variant}_trajectory")
  assert_training_bar(run, trajectory)
  batch = trajectory["batch"]
  assert (batch[IDS] == full_marker(run)).sum() >= 2          # one or two subjects per scene


def full_marker(run):
  return run.method.conditioning.marker_id


def test_localization_loss_is_in_the_step(full):
  """The step's loss carries the localization term (shapes only: its value is tested against
  the reference below, its gradients by the training bar)."""
  from persona_jax.methods.base import method_loss
  batch = jax.tree.map(jnp.asarray, next(make_iterator(full.dataset)))
  params = full.method.params.apply(full.frozen, full.trainable)
  _, metrics = jax.eval_shape(
      lambda p, b: method_loss(full.method, full.models, full.objective, p, full.trainable, b,
                               jax.random.PRNGKey(0)), params, batch)
  assert metrics["localization_loss"].shape == () and "denoising_loss" in metrics


def test_split_markers():
  m, pad = 100, 7
  ids = np.asarray([[1, 10, 11, m, 12, 13, m, 2, pad, pad],
                    [1, 10, 2, pad, pad, pad, pad, pad, pad, pad]])
  plain, index, valid = jax.device_get(fc.split_markers(ids, m, pad, 3))
  np.testing.assert_array_equal(plain[0], [1, 10, 11, 12, 13, 2, pad, pad, pad, pad])
  np.testing.assert_array_equal(plain[1], ids[1])
  np.testing.assert_array_equal(index, [[2, 4, 0], [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 0], [0, 0, 0]])


@pytest.fixture(scope="module")
def probe(full, light):
  """The conditioning of one batch: a prompt with markers and the same prompt without, each with
  two sets of subject images; and the sampler's delayed conditioning at steps 0, 1 and 2."""
  cond = full.method.conditioning
  tok = full.tokenizer
  from persona_jax.tokenizer import tokenize
  marked = tokenize(tok, ["a photo of a ball <|image|> on grass"] * 2)
  bare = tokenize(tok, ["a photo of a ball on grass"] * 2)
  two = tokenize(tok, ["a ball <|image|> and a box <|image|> on grass"] * 2)
  two_bare = tokenize(tok, ["a ball and a box on grass"] * 2)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 2, 16, 16, 3)).astype(np.float32)
  pixels[1] = pixels[1] * 2 + 1
  params = full.method.params.apply(full.frozen, full.trainable)

  @jax.jit
  def run(params):
    m = full.models
    out = {}
    for name, ids in (("marked", marked), ("bare", bare)):
      state = cond.prepare(m, params, {IDS: ids, fc.SUBJECT_PIXELS: pixels})
      out[name] = state
    out["text"] = m.text_encoder.apply({"params": params["text_encoder"]}, bare).last_hidden_state
    out["two"] = cond.prepare(m, params, {IDS: two, fc.SUBJECT_PIXELS: pixels})["fused"]
    out["two_text"] = m.text_encoder.apply({"params": params["text_encoder"]},
                                           two_bare).last_hidden_state
    inputs = {"ids": marked, "negative_ids": bare, fc.SUBJECT_PIXELS: pixels,
              fc.START: jnp.asarray([2, 2])}
    state = cond.prepare(m, params, inputs)
    out["steps"] = [(cond.at(m, params, state, None, None, jnp.asarray(s))[0],
                     cond.negative(m, params, state)) for s in (0, 1, 2)]
    return out
  return jax.device_get(run(params)), np.asarray(bare)


def test_branch_off_is_the_text_path(probe):
  """No marker: the fused context is the text encoder's output bit for bit (whatever the
  images); with markers, the plain context is the prompt without them."""
  out, _ = probe
  np.testing.assert_array_equal(out["bare"]["fused"], out["text"])
  np.testing.assert_array_equal(out["bare"]["plain"], out["text"])
  np.testing.assert_array_equal(out["marked"]["plain"], out["text"])


def test_branch_on_changes_only_the_marked_noun(probe, full):
  out, bare = probe
  ball = 5                                  # BOS a photo of a ball
  diff = np.abs(out["marked"]["fused"] - out["text"]).max(axis=-1)          # [B, L]
  assert (diff[:, ball] > 0).all()
  diff[:, ball] = 0
  assert diff.max() == 0
  fused = out["marked"]["fused"][:, ball]
  assert not np.allclose(fused[0], fused[1])                                # another image


def test_two_subjects_change_their_two_nouns(probe):
  out, _ = probe
  ball, box = 2, 5                          # BOS a ball and a box
  diff = np.abs(out["two"] - out["two_text"]).max(axis=-1)
  assert (diff[:, ball] > 0).all() and (diff[:, box] > 0).all()
  diff[:, [ball, box]] = 0
  assert diff.max() == 0
  assert not np.allclose(out["two"][0, ball], out["two"][0, box])


def test_delayed_subject_conditioning(probe):
  """Steps before start_merge_step use the plain prompt, later ones the fused; the negative
  prompt is the same throughout."""
  out, _ = probe
  (c0, u0), (c1, _), (c2, u2) = out["steps"]
  np.testing.assert_array_equal(c0["encoder_hidden_states"], out["marked"]["plain"])
  np.testing.assert_array_equal(c1["encoder_hidden_states"], out["marked"]["plain"])
  np.testing.assert_array_equal(c2["encoder_hidden_states"], out["marked"]["fused"])
  np.testing.assert_array_equal(u0["encoder_hidden_states"], u2["encoder_hidden_states"])


def reference_localization(maps, masks, index, valid, eps=1e-5):
  """The reference's loop, written out (masks already at each map's size)."""
  layer_losses = []
  for a in maps:
    b = a.shape[0]
    total = 0.0
    for i in range(b):
      acc, count = 0.0, 0.0
      for k in range(index.shape[1]):
        prob = a[i, :, :, index[i, k]]
        m = masks[i, k]
        bg = (prob * (1 - m)).sum() / ((1 - m).sum() + eps)
        fg = (prob * m).sum() / (m.sum() + eps)
        acc += valid[i, k] * (bg - fg)
        count += valid[i, k]
      total += acc / (count + eps)
    layer_losses.append(total / b)
  return sum(layer_losses) / len(layer_losses)


def test_localization_loss_matches_a_hand_written_reference():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 2, 4, 4, 6))
  maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)           # two layers
  masks = (rng.random((2, 3, 4, 4)) > 0.5).astype(np.float32)
  index = np.asarray([[2, 4, 0], [1, 0, 0]], np.int32)
  valid = np.asarray([[1, 1, 0], [1, 0, 0]], np.float32)
  got = fc.localization_loss({"a": jnp.asarray(maps[0]), "b": jnp.asarray(maps[1])},
                             jnp.asarray(masks), jnp.asarray(index), jnp.asarray(valid))
  np.testing.assert_allclose(float(got), reference_localization(maps, masks, index, valid),
                             rtol=1e-5)
  # A map concentrated on the mask gives a negative loss.
  m = np.zeros((1, 4, 4, 6), np.float32)
  m[0, :, :, 2] = masks[0, 0] / masks[0, 0].sum()
  one = fc.localization_loss({"a": jnp.asarray(m)}, jnp.asarray(masks[:1, :1]),
                             jnp.asarray([[2]]), jnp.asarray([[1.0]]))
  assert float(one) < 0
  # Masks of another size are resized (antialiased bilinear) to each map's size.
  big = np.repeat(np.repeat(masks, 2, axis=2), 2, axis=3)
  small = np.asarray(fc.resize_masks(jnp.asarray(big), (4, 4)))
  np.testing.assert_allclose(np.asarray(fc.resize_masks(jnp.ones((1, 1, 8, 8)), (4, 4))), 1.0,
                             rtol=1e-6)
  got_big = fc.localization_loss({"a": jnp.asarray(maps[0])}, jnp.asarray(big),
                                 jnp.asarray(index), jnp.asarray(valid))
  np.testing.assert_allclose(float(got_big), reference_localization(maps[:1], small, index, valid),
                             rtol=1e-5)


def unet_config(down, up, layers=2):
  return UNetConfig(down_block_types=tuple(down), up_block_types=tuple(up),
                    block_out_channels=(32,) * len(down), layers_per_block=layers)


def test_middle_blocks_rule():
  """The middle min(5, n) of the n cross-attention blocks (reference: `(n - k) // 2` on)."""
  sd15 = unet_config(["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
  assert fc.localization_blocks(sd15) == ("down_blocks_1", "down_blocks_2", "mid_block",
                                          "up_blocks_1", "up_blocks_2")
  assert fc.localization_map_names(sd15) == ("IN04", "IN05", "IN07", "IN08", "MID",
                                             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08")
  small = unet_config(["CrossAttnDownBlock2D", "DownBlock2D"], ["UpBlock2D", "CrossAttnUpBlock2D"], 1)
  assert fc.localization_blocks(small) == ("down_blocks_0", "mid_block", "up_blocks_1")
  assert fc.localization_blocks(small, 1) == ("mid_block",)
  six = unet_config(["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                    ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2)           # 5 blocks: all
  assert fc.localization_blocks(six) == ("down_blocks_0", "down_blocks_1", "mid_block",
                                         "up_blocks_1", "up_blocks_2")
  assert fc.localization_blocks(six, 3) == ("down_blocks_1", "mid_block", "up_blocks_1")


def test_maps_come_from_the_middle_blocks_of_a_small_unet(full):
  """On the test UNet (3 cross-attention blocks, all chosen; with 1, only the mid block) the
  UNet reports exactly those blocks' attn2 maps (shapes only: nothing is compiled)."""
  from persona_jax.models.attention_maps import ATTENTION_MAPS
  from persona_jax.models.unet import UNet2DConditionModel
  config = full.pipe.unet_config
  got = {}
  for layers in (5, 1):
    c = dataclasses.replace(config, addons=(AttentionMaps(fc.localization_map_names(config, layers)),))
    _, state = jax.eval_shape(
        lambda p: UNet2DConditionModel(c).apply({"params": p}, jnp.zeros((1, 8, 8, 4)),
                                                jnp.asarray([10]), jnp.zeros((1, 77, 32)),
                                                mutable=[ATTENTION_MAPS]),
        full.pipe.params["unet"])
    got[layers] = sorted(p.split("/transformer_blocks")[0]
                         for p in tree.flatten(dict(state[ATTENTION_MAPS])))
  assert got[5] == sorted(TRANSFORMERS)
  assert got[1] == ["mid_block/attentions_0"]


def write_folder(folder, n=2, two_subjects=False):
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, ex in enumerate(toy_examples(n, 32)):
    Image.fromarray(ex.image).save(folder / f"{i}.png")
    Image.fromarray((ex.masks[0] * 255).astype(np.uint8)).save(folder / f"{i}.mask.png")
    lines.append({"file_name": f"{i}.png", "text": ex.caption})
  import json
  (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  return folder


def test_data_folder_and_its_errors(tmp_path):
  import json
  folder = write_folder(tmp_path / "data")
  examples = fc_data.read_folder(folder, 32)
  toy = toy_examples(2, 32)
  assert [e.caption for e in examples] == [e.caption for e in toy]
  assert examples[0].caption.count(fc.IMAGE_TOKEN) == 1 and examples[0].masks.shape == (1, 32, 32)
  np.testing.assert_allclose(examples[0].masks, toy[0].masks, atol=1 / 255 + 1e-6)
  meta = folder / "metadata.jsonl"
  meta.write_text(json.dumps({"file_name": "0.png", "text": "a <|image|> and b <|image|>"}))
  with pytest.raises(DataError, match="one mask file per marker in 'masks'"):
    fc_data.read_folder(folder, 32)
  meta.write_text(json.dumps({"file_name": "0.png", "text": "a <|image|> and b <|image|>",
                              "masks": ["0.mask.png", "absent.png"]}))
  with pytest.raises(DataError, match="mask 'absent.png' is not in"):
    fc_data.read_folder(folder, 32)
  meta.write_text(json.dumps({"file_name": "0.png", "text": "a <|image|>", "masks": []}))
  with pytest.raises(DataError, match="'masks' must list 1 file"):
    fc_data.read_folder(folder, 32)
  (folder / "metadata.jsonl").unlink()
  with pytest.raises(DataError, match="no metadata.jsonl"):
    fc_data.read_folder(folder, 32)


def test_batch_keys(full):
  batch = next(make_iterator(full.dataset))
  assert batch[fc.SUBJECT_PIXELS].shape == (2, 2, 16, 16, 3)
  assert batch[fc.SUBJECT_MASKS].shape == (2, 2, 16, 16) and batch["subject_union"].shape == (2, 16, 16, 1)
  assert "mask" not in batch                    # the loss is masked in the step, one draw per batch
  markers = (batch[IDS] == full.method.conditioning.marker_id).sum(axis=1)    # [B]
  for row, n in enumerate(markers):       # the slots of the subjects hold masks and pixels
    assert n in (1, 2)
    assert (batch[fc.SUBJECT_MASKS][row].max(axis=(1, 2)) > 0).tolist() == [True, n == 2]
    assert (np.abs(batch[fc.SUBJECT_PIXELS][row]).max(axis=(1, 2, 3)) > 0).tolist() == [True, n == 2]


def test_toy_pairs():
  ex = toy_examples(2, 32, pairs=True)
  assert ex[0].caption.count(fc.IMAGE_TOKEN) == 1 and ex[0].masks.shape == (1, 32, 32)
  assert ex[1].caption.count(fc.IMAGE_TOKEN) == 2 and ex[1].masks.shape == (2, 32, 32)
  assert ex[1].masks[0].max() > 0 and ex[1].masks[1].max() > 0
  assert (ex[1].masks[0] * (ex[1].masks[1] >= 0.5)).max() == 0       # the right one is in front


def test_sampling_without_subjects_is_the_base_and_with_them_differs(full, tmp_path):
  """No subject images: the method samples the plain text path, the base's output bit for bit
  (untrained full variant: the UNet is the base's); with one, the image changes."""
  from persona_jax.text_to_image import SampleOptions, text_to_image
  loop.write_outputs(full, full.trainable, tmp_path)
  result = fc.load_result(tmp_path)
  options = SampleOptions(steps=3, guidance=5.0, seed=0, height=32, width=32)
  base = text_to_image(full.pipe, "a photo of a ball on grass", options=options, progress=False)
  s = fc.sample(SampleRequest(result, full.pipe, full.pipe.params, ()))
  off = text_to_image(full.pipe, "a photo of a ball <|image|> on grass", options=options,
                      progress=False, sampling=s)
  np.testing.assert_array_equal(off, base)
  image = tmp_path / "subject.png"
  from PIL import Image
  Image.fromarray(toy_examples(1, 32)[0].image).save(image)
  from persona_jax.data.images import load_image
  images = []
  for flag in ("--fastcomposer", "--run"):      # the method's flag, and --run (any method)
    out = tmp_path / f"samples{flag}"
    assert main(["sample", flag, str(tmp_path), "--image", str(image), "--prompt",
                 "a photo of a ball <|image|> on grass", "--steps", "3", "--guidance", "5",
                 "--start-merge-step", "1", "--out", str(out)]) == 0
    images.append(load_image(out / "0000_0000.png"))
  assert not np.array_equal(images[0], base[0])
  np.testing.assert_array_equal(*images)


def test_sampling_prompts():
  assert fc.prompt_markers(0)("a ball <|image|> and a box <|image|>") == "a ball and a box"
  assert fc.prompt_markers(1)("a ball <|image|>") == "a ball <|image|>"
  with pytest.raises(ConfigError, match="has 1 <|image|> marker"):
    fc.prompt_markers(2)("a ball <|image|>")


def test_augment_drops_and_masks():
  """uncondition_prob 1: the empty caption, no subjects; object_appear_prob 0: the markers go,
  the nouns stay; the loss mask is the kept subjects' union (zeros without subjects)."""
  from persona_jax.data.clip_images import CLIPImageProcessorConfig
  seen = []

  def tokenize(captions):
    seen.extend(captions)
    return np.zeros((len(captions), 77), np.int32)
  examples = toy_examples(2, 32, pairs=True)

  def draw(**probs):
    seen.clear()
    values = dict(random_flip=0.0, uncondition_prob=0.0, object_appear_prob=1.0)
    augment = fc_data.Augment(examples, tokenize, CLIPImageProcessorConfig.for_image_size(16), 2,
                              **{**values, **probs}, latent_factor=2)
    return augment.random_map(1, np.random.default_rng(0)), seen[0]
  out, caption = draw()
  assert caption == examples[1].caption
  union = np.maximum(*(examples[1].masks >= 0.5)).astype(np.float32)
  np.testing.assert_array_equal(out["subject_union"][..., 0], fc_data.bilinear_downsample(union[None], 2)[0])
  assert 0 < out["subject_union"].mean() < 1
  assert (out[fc.SUBJECT_MASKS].max(axis=(1, 2)) > 0).tolist() == [True, True]
  out, caption = draw(uncondition_prob=1.0)
  assert caption == "" and out[fc.SUBJECT_MASKS].max() == 0 and np.abs(out[fc.SUBJECT_PIXELS]).max() == 0
  assert out["subject_union"].max() == 0
  out, caption = draw(object_appear_prob=0.0)
  assert caption == examples[1].caption.replace(" " + fc.IMAGE_TOKEN, "")
  assert out[fc.SUBJECT_MASKS].max() == 0 and out["subject_union"].max() == 0


def test_masked_denoising_loss_is_the_references():
  """mit-han-lab/fastcomposer model.py, re-created in torch: one `torch.rand(1) < mask_loss_prob`
  per batch; then mask = F.interpolate(union of the binary subject masks, latent size,
  bilinear), F.mse_loss(pred * mask, target * mask) over the whole latent. Ours: the data's
  subject_union, `masked_loss_weights` and the Objective's mean give the same loss, and a batch
  is masked all together or not at all."""
  import torch
  import torch.nn.functional as F

  from persona_jax.diffusion.losses import Objective
  from persona_jax.diffusion.schedules import SchedulerConfig
  rng = np.random.default_rng(0)
  b, k, r, f = 3, 2, 32, 8
  masks = np.zeros((b, k, r, r), np.float32)
  masks[0, 0, 4:20, 6:27] = 1                  # two subjects, overlapping
  masks[0, 1, 15:30, 2:11] = 1
  masks[1, 0, 9:14, 9:23] = 0.8                # one (a soft mask, binarized at 0.5)
  #                                               row 2: no kept subject (uncondition)
  latents = rng.normal(size=(b, r // f, r // f, 4)).astype(np.float32)
  pred = rng.normal(size=latents.shape).astype(np.float32)
  union = np.stack([fc_data.bilinear_downsample((m >= 0.5).max(axis=0, initial=0)[None]
                                                .astype(np.float32), f)[0] for m in masks])
  batch = {"subject_union": jnp.asarray(union[..., None])}

  objective = Objective(SchedulerConfig(prediction_type="sample"), 1.0)   # target: the latents

  def ours(weights):
    per, _, _ = objective.per_example_loss(jnp.asarray(latents), lambda x, t: (jnp.asarray(pred), {}),
                                           jax.random.PRNGKey(0), None, weights)
    return float(objective.reduce(per)[0])

  def reference(masked):
    p, t = torch.from_numpy(pred).permute(0, 3, 1, 2), torch.from_numpy(latents).permute(0, 3, 1, 2)
    if masked:
      m = (torch.from_numpy(masks >= 0.5).float().sum(dim=1) > 0).float()
      m = F.interpolate(m.unsqueeze(1), size=p.shape[-2:], mode="bilinear", align_corners=False)
      p, t = p * m, t * m
    return float(F.mse_loss(p.float(), t.float(), reduction="mean"))
  for masked, prob in ((True, 1.0), (False, 0.0)):
    weights = fc.masked_loss_weights(batch, jax.random.PRNGKey(1), prob=prob)
    np.testing.assert_allclose(ours(weights), reference(masked), rtol=1e-5)
  assert reference(True) < 0.5 * reference(False)        # masked examples are not re-normalized
  draws = [np.asarray(fc.masked_loss_weights(batch, jax.random.PRNGKey(i), prob=0.5))
           for i in range(40)]
  masked = [bool((d == union[..., None]).all()) for d in draws]
  assert all(m or (d == 1).all() for m, d in zip(masked, draws)) and 8 < sum(masked) < 32


def test_subject_crop_is_the_references():
  """Background noise, the mask's bounding box, padded to a square with black."""
  image = np.full((8, 8, 3), 200, np.uint8)
  mask = np.zeros((8, 8), np.float32)
  mask[2:4, 1:7] = 1                        # 2 x 6 box
  mask[3, 1] = 0                            # one background pixel inside the box
  crop = fc_data.subject_crop(image, mask, np.random.default_rng(0))
  assert crop.shape == (6, 6, 3)
  np.testing.assert_array_equal(crop[:2], 0)                   # black padding above
  np.testing.assert_array_equal(crop[4:], 0)                   # and below
  assert (crop[2:4] == 200).all(axis=-1).sum() == 11
  assert not (crop[3, 0] == 200).all()                         # noise in the background
  np.testing.assert_array_equal(fc_data.pad_to_square(np.ones((2, 4, 3), np.uint8))[:, :, 0],
                                [[0] * 4, [1] * 4, [1] * 4, [0] * 4])


def torch_layer_norm(x, w, b, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def torch_postfuse(sd, text, image):
  """The reference's FastComposerPostfuseModule.fuse_fn on its own state dict (Linear: x W^T + b)."""
  def mlp(name, x, residual):
    h = torch_layer_norm(x, sd[f"{name}.layernorm.weight"], sd[f"{name}.layernorm.bias"])
    h = h @ sd[f"{name}.fc1.weight"].T + sd[f"{name}.fc1.bias"]
    h = np.asarray(jax.nn.gelu(h, approximate=False))
    h = h @ sd[f"{name}.fc2.weight"].T + sd[f"{name}.fc2.bias"]
    return h + x if residual else h
  h = mlp("mlp1", np.concatenate([text, image], -1), False) + text
  h = mlp("mlp2", h, True)
  return torch_layer_norm(h, sd["layer_norm.weight"], sd["layer_norm.bias"])


def test_official_checkpoint_imports(full, model_dir, encoder_dir, tmp_path):
  """A FastComposerModel state dict in the official layout (unet., image_encoder., postfuse_module.,
  text_encoder. and vae. ignored) becomes our result: the same UNet and image encoder, and a fuse
  MLP computing the reference's fuse_fn."""
  from persona_jax.convert.diffusers import params_to_state_dict
  from persona_jax.convert.files import write_safetensors
  from persona_jax.methods.fastcomposer_official import import_official
  rng = np.random.default_rng(0)
  noisy = lambda tree_: jax.tree.map(
      lambda x: np.asarray(x) + 0.01 * rng.standard_normal(np.shape(x)).astype(np.float32), tree_)
  unet, image = noisy(full.pipe.params["unet"]), noisy(full.components["image_encoder"])
  postfuse = {}
  for name, dims in (("mlp1", (48, 32)), ("mlp2", (32, 32))):     # text 32 + image 16
    postfuse[f"{name}.layernorm.weight"] = 1 + 0.1 * rng.standard_normal(dims[0])
    postfuse[f"{name}.layernorm.bias"] = 0.1 * rng.standard_normal(dims[0])
    postfuse[f"{name}.fc1.weight"] = 0.2 * rng.standard_normal((32, dims[0]))
    postfuse[f"{name}.fc1.bias"] = 0.1 * rng.standard_normal(32)
    postfuse[f"{name}.fc2.weight"] = 0.2 * rng.standard_normal((32, 32))
    postfuse[f"{name}.fc2.bias"] = 0.1 * rng.standard_normal(32)
  postfuse["layer_norm.weight"] = 1 + 0.1 * rng.standard_normal(32)
  postfuse["layer_norm.bias"] = 0.1 * rng.standard_normal(32)
  postfuse = {k: v.astype(np.float32) for k, v in postfuse.items()}
  state = {**params_to_state_dict(unet, prefix="unet."),
           **params_to_state_dict(image, prefix="image_encoder."),
           **{f"postfuse_module.{k}": v for k, v in postfuse.items()},
           "text_encoder.final_layer_norm.weight": np.ones(32, np.float32)}
  write_safetensors(tmp_path / "pytorch_model.safetensors", state)
  out = tmp_path / "imported"
  assert main(["import-fastcomposer", str(tmp_path / "pytorch_model.safetensors"), "--model",
               str(model_dir), "--image-encoder", str(encoder_dir), "--out", str(out)]) == 0
  result = fc.load_result(out)
  assert result.config.variant == "full" and result.config.max_subjects == 4
  for path, value in tree.flatten({"unet": unet, "image_encoder": image}).items():
    np.testing.assert_array_equal(result.weights[path], value, err_msg=path)
  sampled = tree.flatten(fc.sample(SampleRequest(result, full.pipe, full.pipe.params, ())).params)
  for path, value in tree.flatten({"unet": unet}).items():
    np.testing.assert_array_equal(np.asarray(sampled[path]), value, err_msg=path)
  text = rng.standard_normal((3, 32)).astype(np.float32)
  embeds = rng.standard_normal((3, 16)).astype(np.float32)
  fuse = tree.unflatten({p[len("fastcomposer/fuse/"):]: v for p, v in result.weights.items()
                         if p.startswith("fastcomposer/fuse/")})
  got = PostfuseModule(32).apply({"params": fuse}, text, embeds)
  np.testing.assert_allclose(np.asarray(got), torch_postfuse(postfuse, text, embeds), atol=1e-5)
  state["postfuse_module.mlp3.fc1.weight"] = np.ones((2, 2), np.float32)
  write_safetensors(tmp_path / "bad" / "pytorch_model.safetensors", state)
  with pytest.raises(ModelFileError, match="unexpected tensor 'postfuse_module.mlp3.fc1.weight'"):
    import_official(tmp_path / "bad" / "pytorch_model.safetensors", model_dir, encoder_dir,
                    tmp_path / "bad_out")
