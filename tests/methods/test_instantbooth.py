"""InstantBooth on the training core: the method test bar of DESIGN.md section 5 (literal
trainable leaves, non-zero gradients, frozen bit-identical, loss falls, lr 0 moves nothing), base
output reproduced with the branches off, each branch on its own, the concept token's average
over images, beta and alpha traced at sampling, subject masks in the data pipeline, the result and
`sample --instantbooth`. The E4T tests' small model (one layer per block) and tiny random CLIP
image encoder (width 16, 16x16 images, 5 tokens) stand in for the real ones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from persona_jax import ConfigError, tree
from persona_jax.cli import main
from persona_jax.data.images import DataError
from persona_jax.data.pipeline import DataConfig, load_instances, make_dataset, make_iterator
from persona_jax.diffusion.sampling import TextConditioning, generate
from persona_jax.models.components import SDModels
from persona_jax.methods import instantbooth as ib
from persona_jax.data.batch import CLIP_PIXELS, IDS
from persona_jax.methods.spec import SampleRequest
from persona_jax.models.addons import GatedAdapter
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.train import loop
from persona_jax.world.captioned_folder import write_captioned_folder
from tests.methods.test_e4t import write_model
from tests.markers import slow
from tests.runs import (_merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh,
                        write_image_encoder)

TRANSFORMERS = ["down_blocks_0/attentions_0", "up_blocks_1/attentions_0",
                "up_blocks_1/attentions_1", "mid_block/attentions_0"]
ADAPTER_LEAVES = ["attn/to_q/kernel", "attn/to_k/kernel", "attn/to_v/kernel",
                  "attn/to_out_0/kernel", "attn/to_out_0/bias", "gamma", "linear/kernel",
                  "linear/bias", "norm/scale", "norm/bias"]
ADAPTERS = [f"unet/{t}/transformer_blocks_0/adapter/{leaf}"
            for t in TRANSFORMERS for leaf in ADAPTER_LEAVES]
HEADS = ["instantbooth/concept/kernel", "instantbooth/concept/bias",
         "instantbooth/patch/kernel", "instantbooth/patch/bias"]


def ib_config(model_dir, encoder_dir, data_dir, **overrides):
  """Toy-world captions and masks, 32px, batch 2, one warm-up step (lr 0 at step 0); every leaf
  at the run's lr (the config's 1e-4 / 1e-6, the paper's, are checked separately)."""
  values = dict(
      model=str(model_dir),
      method=dict(name="instantbooth", image_encoder=str(encoder_dir)),
      data=dict(instance_dir=str(data_dir), caption_source="files", resolution=32),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("ib_model") / "model")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return write_image_encoder(tmp_path_factory.mktemp("ib_image_encoder"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_captioned_folder(tmp_path_factory.mktemp("ib_data") / "world", 4)


@pytest.fixture(scope="module")
def run(model_dir, encoder_dir, data_dir):
  return loop.build(ib_config(model_dir, encoder_dir, data_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=4)


def test_trainable_set_is_literal(run):
  assert set(tree.paths(run.trainable)) == set(HEADS + ADAPTERS)
  assert set(run.frozen) == {"unet", "text_encoder", "image_encoder"}    # VAE moments cached
  assert run.method.unet == (GatedAdapter(),)
  assert run.method.tokens.added == ()                                   # "sks" is a word
  flat = tree.flatten(run.trainable)
  assert flat["instantbooth/concept/kernel"].shape == (16, 32)           # CLIP width -> text width
  assert flat["instantbooth/patch/kernel"].shape == (16, 32)
  assert not any(float(v) for p, v in flat.items() if p.endswith("gamma"))
  # The ablations' leaves; the paper's learning rates as groups.
  for option, want in (("concept_token", ["instantbooth/patch/kernel", "instantbooth/patch/bias"]
                        + ADAPTERS),
                       ("patch_tokens", ["instantbooth/concept/kernel", "instantbooth/concept/bias"])):
    config = dataclasses.replace(ib.InstantBoothConfig(image_encoder=run.config.method_options[
        "image_encoder"]), **{option: False})
    method = ib.make(config, run.pipe.params, run.pipe.tokenizer_dir, run.pipe.unet_config)
    got = jax.eval_shape(method.params.init, jax.random.PRNGKey(0), run.pipe.params)
    assert set(tree.paths(got)) == set(want), option
  from persona_jax.train.config import load_config, run_config
  optim = run_config(load_config("instantbooth")).optim
  assert optim.lr == 1e-4 and optim.lr_groups == ((ib.ADAPTER_LEAVES, 1e-6),)
  lrs = tree.flatten(tree.label(run.trainable, optim.lr_groups, optim.lr))
  assert {p for p, lr in lrs.items() if lr == 1e-4} == set(HEADS)
  assert {p for p, lr in lrs.items() if lr == 1e-6} == set(ADAPTERS)
  assert (ib.InstantBoothConfig().beta, ib.InstantBoothConfig().alpha) == (0.3, 0.4)


def test_training_bar(run, trajectory):
  """lr 0 moves nothing; every trainable leaf moves (non-zero gradients: the adapters' leaves
  once gamma has left 0); frozen params are bit-identical; the loss falls on a fixed batch."""
  assert_training_bar(run, trajectory)
  batch = trajectory["batch"]
  assert batch[CLIP_PIXELS].shape == (2, 16, 16, 3)
  assert not np.array_equal(batch[CLIP_PIXELS][0], batch[CLIP_PIXELS][1])    # each its own image


@pytest.fixture(scope="module")
def probe(run, trajectory):
  """One compiled program over the first batch: UNet outputs of the base and with the branches
  off / on alone (trained params: gamma != 0), and the conditioning of 1 vs 2 identical images."""
  cond = run.method.conditioning
  no_concept = dataclasses.replace(cond, concept_token=False)
  no_patch = dataclasses.replace(cond, patch_tokens=False)
  fresh = run.method.params.apply(run.frozen, run.trainable)
  trained = run.method.params.apply(run.frozen, trajectory["trained"])
  batch = jax.tree.map(jnp.asarray, trajectory["batch"])
  unet = run.models.unet
  noisy = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
  t = jnp.asarray([10, 700])

  @jax.jit
  def go(fresh, trained, batch, base):
    m, out = run.models, {}
    text = m.text_encoder.apply({"params": base["text_encoder"]}, batch[IDS]).last_hidden_state
    out["base"] = run.pipe.unet.apply({"params": base["unet"]}, noisy, t, text)
    apply = lambda p, kw: unet.apply({"params": p["unet"]}, noisy, t, **kw)
    state = no_concept.prepare(m, fresh, batch)
    out["fresh_off"] = apply(fresh, no_concept.unet_kwargs(state, 1.0, 1.0))       # gamma 0
    state = no_concept.prepare(m, trained, batch)
    out["beta0"] = apply(trained, no_concept.unet_kwargs(state, 1.0, 0.0))          # beta 0
    out["adapter_alone"] = apply(trained, no_concept.unet_kwargs(state, 1.0, 1.0))
    state = no_patch.prepare(m, trained, batch)
    kw = no_patch.unet_kwargs(state, 0.4, 1.0)
    out["concept_alone"], out["concept_context"] = apply(trained, kw), kw["encoder_hidden_states"]
    out["concept"], out["text"] = state["concept"], state["text"]
    one = batch[CLIP_PIXELS][:1, None]                                              # [1, 1, S, S, 3]
    out["one"] = cond.features(trained, one)
    out["two"] = cond.features(trained, jnp.concatenate([one, one], axis=1))
    out["mixed"] = cond.features(trained, batch[CLIP_PIXELS][None])
    return out
  return jax.device_get(go(fresh, trained, batch, run.pipe.params)), trajectory["batch"]


def test_branches_off_reproduce_the_base(probe):
  """Concept token off and gamma 0 (fresh), or beta 0 (trained gamma): the base bit for bit.
  (No image, i.e. no adapter stream: tests/models/test_unet_hooks.py.)"""
  out, _ = probe
  assert np.array_equal(out["fresh_off"], out["base"])
  assert np.array_equal(out["beta0"], out["base"])
  assert np.abs(out["adapter_alone"] - out["base"]).max() > 1e-4       # the adapters alone act


def test_concept_token_replaces_the_identifier_at_the_text_encoder_output(run, probe):
  out, batch = probe
  at = batch[IDS] == run.method.conditioning.identifier_id              # [B, L]
  assert at.sum(axis=1).tolist() == [1, 1]                                      # captions name sks
  np.testing.assert_array_equal(out["concept_context"][~at], out["text"][~at])
  np.testing.assert_allclose(out["concept_context"][at], 0.4 * out["concept"], rtol=1e-6)
  assert not np.allclose(out["concept"][0], out["concept"][1])                  # per example
  assert np.abs(out["concept_alone"] - out["base"]).max() > 1e-4


def test_several_images_average_the_concept_and_concatenate_the_patches(probe):
  out, _ = probe
  (c1, p1), (c2, p2), (cm, pm) = out["one"], out["two"], out["mixed"]
  np.testing.assert_allclose(c2, c1, atol=1e-5, rtol=0)          # two identical images = one
  assert p1.shape == (1, 5, 32) and p2.shape == (1, 10, 32)      # 5 CLIP tokens per image
  np.testing.assert_array_equal(p2[:, 5:], p1)
  assert pm.shape == (1, 10, 32)
  assert not np.allclose(cm, c1)                                 # another image moves the mean


@pytest.fixture(scope="module")
def sampling(run, trajectory, data_dir, tmp_path_factory):
  """The trained result written and read back for sampling with two of the training images."""
  workdir = tmp_path_factory.mktemp("ib_result")
  loop.write_outputs(run, trajectory["trained"], workdir)
  images = sorted(data_dir.glob("0000[01].png"))
  request = SampleRequest(ib.load_result(workdir), run.pipe, run.pipe.params, tuple(images))
  return workdir, images, ib.sample(request)


def test_result_gives_the_trained_params_back(run, trajectory, sampling):
  _, images, s = sampling
  got, want = tree.flatten(s.params), tree.flatten(run.full_params(trajectory["trained"]))
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
  assert s.inputs[CLIP_PIXELS].shape == (1, 2, 16, 16, 3)
  assert s.addons == (GatedAdapter(),)
  # A sampling image with its mask beside it is masked and cropped to its subject.
  from persona_jax.data.clip_images import preprocess_image
  from persona_jax.data.images import load_image, load_mask
  image = load_image(images[0])
  mask = load_mask(images[0].with_name("00000.mask.png"), image.shape[:2])
  processor = run.method.image_inputs.processor
  want = preprocess_image(ib.condition_image(image, mask), processor)
  np.testing.assert_array_equal(s.inputs[CLIP_PIXELS][0, 0], want)
  assert not np.array_equal(want, preprocess_image(image, processor))


def test_beta_and_alpha_are_traced_at_sampling(run, sampling):
  """Changing beta or alpha does not recompile and changes the samples. Concept token off and
  beta 0: the sampler's conditioning is the base's text conditioning with the adapters at scale
  0 in both halves (which the UNet computes as the base bit for bit: the probe above)."""
  _, _, s = sampling
  pipe = run.pipe
  models = SDModels(UNet2DConditionModel(dataclasses.replace(pipe.unet_config, addons=s.addons)),
                    pipe.text_encoder, pipe.vae)
  from persona_jax.tokenizer import tokenize
  text = {"ids": tokenize(pipe.tokenizer, ["a photo of a sks ball"]),
          "negative_ids": tokenize(pipe.tokenizer, [""])}
  inputs = lambda beta, alpha: {**text, CLIP_PIXELS: s.inputs[CLIP_PIXELS],
                                ib.BETA: np.float32([beta]), ib.ALPHA: np.float32([alpha])}

  def sample(beta, alpha):
    return generate(s.params, inputs(beta, alpha), 0, np.arange(1), 7.5, 0.0, 0.0, models=models,
                    scheduler=pipe.scheduler_config, num_steps=3, latent_shape=(4, 4, 4),
                    conditioning=s.conditioning, decode=False)
  first = sample(0.3, 0.4)
  n = generate._cache_size()
  other_beta, other_alpha = sample(1.0, 0.4), sample(0.3, 1.0)
  jax.block_until_ready((first, other_beta, other_alpha))
  assert generate._cache_size() == n, "changing beta or alpha recompiled"
  assert np.abs(np.asarray(other_beta - first)).max() > 1e-5
  assert np.abs(np.asarray(other_alpha - first)).max() > 1e-5

  off = dataclasses.replace(s.conditioning, concept_token=False)

  @jax.jit
  def prepared(params, base_params, inputs):
    state = off.prepare(models, params, inputs)
    cond, _ = off.at(models, params, state, None, None, 0)
    uncond = off.negative(models, params, state)
    return cond, uncond, TextConditioning().prepare(models, base_params, inputs)
  cond, uncond, base = jax.device_get(prepared(s.params, pipe.params, inputs(0.0, 0.4)))
  assert np.array_equal(cond["encoder_hidden_states"], base["context"])
  assert np.array_equal(uncond["encoder_hidden_states"], base["negative"])
  assert (cond["streams"]["adapter_scale"].tolist() == [0.0]
          == uncond["streams"]["adapter_scale"].tolist())


def test_sample_command(sampling, tmp_path, monkeypatch):
  """The command's wiring (the images, beta and alpha reach the sampler); the real sampling
  path is the test above, and a real run of the command is slow-only."""
  import persona_jax.text_to_image as t2i
  workdir, images, _ = sampling
  seen = {}

  def fake(pipe, prompts, *args, **kwargs):
    seen.update(kwargs, prompts=prompts)
    return np.zeros((1, 32, 32, 3), np.uint8)
  monkeypatch.setattr(t2i, "text_to_image", fake)
  for flag in ("--run", "--instantbooth"):     # --run (any method), then the method's flag
    args = ["sample", flag, str(workdir), "--prompt", "a photo of a sks ball",
            "--beta", "0.5", "--alpha", "0.25", "--out", str(tmp_path / "out")]
    assert main(args + sum((["--image", str(p)] for p in images), [])) == 0
    if flag == "--run":
      by_run = seen["sampling"]
  inputs = seen["sampling"].inputs
  for key, value in inputs.items():
    np.testing.assert_array_equal(by_run.inputs[key], value)
  assert by_run.conditioning == seen["sampling"].conditioning
  assert inputs[CLIP_PIXELS].shape == (1, 2, 16, 16, 3)
  assert (inputs[ib.BETA].tolist(), inputs[ib.ALPHA].tolist()) == ([0.5], [0.25])
  assert seen["sampling"].addons == (GatedAdapter(),)
  assert isinstance(seen["sampling"].conditioning, ib.InstantBoothConditioning)
  assert main(["sample", "--instantbooth", str(workdir), "--prompt", "x", "--out",
               str(tmp_path)]) == 2                                        # no --image


@slow
def test_sample_command_runs(sampling, tmp_path):
  workdir, images, _ = sampling
  out = tmp_path / "samples"
  args = ["sample", "--instantbooth", str(workdir), "--prompt", "a photo of a sks ball",
          "--steps", "2", "--beta", "0.5", "--alpha", "0.4", "--out", str(out)]
  assert main(args + sum((["--image", str(p)] for p in images), [])) == 0
  assert (out / "grid.png").is_file()


# ---------------------------------------------------------------------------------------------
# Data: subject masks and the condition image.


def test_masks_are_read_beside_their_images(data_dir, tmp_path):
  instances = load_instances(DataConfig(instance_dir=str(data_dir), caption_source="files",
                                        resolution=16), lambda c: c)
  assert len(instances.images) == 4 and len(instances.masks) == 4     # masks are not images
  assert instances.masks[0].shape == (16, 16) and instances.masks[0].max() > 128
  assert all("sks" in pool[0] for pool in instances.captions)
  bad = tmp_path / "bad"
  bad.mkdir()
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(bad / "a.png")
  Image.fromarray(np.zeros((10, 20), np.uint8)).save(bad / "a.mask.png")
  with pytest.raises(DataError, match=r"a\.mask\.png: the mask is 20x10 but its image is 20x20"):
    load_instances(DataConfig(instance_dir=str(bad), caption_source="prompt", prompt="x",
                              resolution=16), lambda c: c)


def test_condition_image_is_masked_cropped_and_augmented():
  image = np.full((32, 32, 3), 200, np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:16, 4:20] = 255                                         # a 8x16 subject
  plain = ib.condition_image(image, mask)
  assert plain.shape == (16, 16, 3)                              # its square box
  assert plain[4:12].min() == 200 and plain[:4].max() == 0       # background black
  np.testing.assert_array_equal(ib.condition_image(image), image)
  rng = np.random.default_rng(0)
  views = [ib.condition_image(image, mask, rng, crop_scale=0.5, rotation=30, flip=0.5)
           for _ in range(4)]
  assert len({v.shape for v in views}) > 1                       # random crops


def test_pipeline_hands_the_hook_the_flipped_mask(data_dir):
  """The `image_inputs` hook gets the mask cropped and flipped with the image."""
  seen = []

  class Hook:
    def __call__(self, image, mask=None, rng=None):
      seen.append((image, mask))
      return {}
  config = DataConfig(instance_dir=str(data_dir), caption_source="files", resolution=32,
                      center_crop=False, random_flip=0.5)
  instances = load_instances(config, lambda c: c)
  dataset = make_dataset(config, instances, 4, 0, tokenize=lambda c: {"ids": np.zeros((len(c), 4))},
                         image_inputs=Hook())
  batch = next(make_iterator(dataset))
  for (image, mask), pixels in zip(seen, batch["pixels"]):
    assert mask is not None and mask.shape == (32, 32)
    index = next(i for i, im in enumerate(instances.images)
                 if np.array_equal(im, image) or np.array_equal(im[:, ::-1], image))
    flipped = not np.array_equal(instances.images[index], image)
    np.testing.assert_array_equal(mask, instances.masks[index][:, ::-1] if flipped
                                  else instances.masks[index])


def test_config_errors(run):
  params, tok = run.pipe.params, run.pipe.tokenizer_dir
  encoder = run.config.method_options["image_encoder"]
  with pytest.raises(ConfigError, match="method.identifier: 'qzxwv' is"):
    ib.make(ib.InstantBoothConfig(identifier="qzxwv", image_encoder=encoder), params, tok,
            run.pipe.unet_config)
  with pytest.raises(ConfigError, match="both off"):
    ib.make(ib.InstantBoothConfig(concept_token=False, patch_tokens=False, image_encoder=encoder),
            params, tok, run.pipe.unet_config)
  with pytest.raises(ConfigError, match="one or more subject images"):
    ib.sample(SampleRequest(None, run.pipe, run.pipe.params, ()))
  sks = run.method.conditioning.identifier_id
  assert ib.prompts_without_identifier(["a sks ball", "a ball", "sks"], run.pipe.tokenizer,
                                       sks) == ["a ball"]
