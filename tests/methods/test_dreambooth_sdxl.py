"""DreamBooth on an SDXL base (the tiny `sdxl` random model): the method bar with both text
encoders and prior preservation, the cached SDXL text conditioning (context and pooled), the
micro-conditioning the step reads, and the exports diffusers' StableDiffusionXLPipeline loads."""

import jax
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.data.batch import CONTEXT, IDS_2, POOLED, PRIOR, TIME_IDS
from persona_jax.data.pipeline import make_iterator
from persona_jax.diffusion.conditioning import encode_sdxl_prompt
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import (assert_training_bar, db_config, fixed_batch_trajectory, one_device_mesh,
                        write_class_images)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
  return write_class_images(tmp_path_factory.mktemp("class"), n=2)


@pytest.fixture(scope="module")
def run(sdxl_dir, class_dir):
  """UNet and both text encoders (the step would encode both prompts; VAE moments cached)."""
  return loop.build(db_config(sdxl_dir, class_dir, method=dict(name="dreambooth",
                                                               train_text_encoder=True)),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def unet_run(sdxl_dir, class_dir):
  """UNet only: VAE moments and both encoders' context and pooled embedding cached."""
  return loop.build(db_config(sdxl_dir, class_dir), mesh=one_device_mesh())


@pytest.fixture(scope="module", params=[pytest.param("unet", marks=slow),
                                        pytest.param("unet+text", marks=slow)])
def trained(request, run, unet_run):
  """(run, its trajectory): the UNet-only run or with both text encoders. Slow: a full SDXL UNet
  step's compile; the SDXL step trains in the LoRA, Textual Inversion, Custom Diffusion and
  IP-Adapter bars by default, and DreamBooth's step is the SD 1.x one's."""
  which = unet_run if request.param == "unet" else run
  return which, fixed_batch_trajectory(which, steps=4)


def test_trainable_set_is_the_unet_and_both_text_encoders(run):
  """All of both encoders but what SDXL never reads: the first one's last layer (of 3) and final
  layer norm (its penultimate hidden state is the context)."""
  expected = {f"{name}/{p}" for name in ("unet",) + TEXT_ENCODERS
              for p in tree.paths(run.pipe.params[name])}
  unread = {p for p in expected if p.startswith(("text_encoder/encoder/layers_2/",
                                                 "text_encoder/final_layer_norm/"))}
  assert len(unread) == 18
  assert set(tree.paths(run.trainable)) == expected - unread
  assert set(run.frozen) == {"text_encoder"}           # its unread leaves; VAE moments cached
  assert len(run.tokenizers) == 2


def test_batch_carries_both_prompts_and_the_crop_as_time_ids(run):
  batch = next(make_iterator(run.dataset))
  np.testing.assert_array_equal(batch[PRIOR], [0.0, 1.0])
  np.testing.assert_array_equal(batch[IDS_2], run.prompt_inputs(["a photo of sks toy",
                                                                 "a photo of toy"])[IDS_2])
  # Example subject images are 128x128 resized to 32: crop (0, 0) of 32x32; the class images 40x40.
  np.testing.assert_array_equal(batch[TIME_IDS], [[128, 128, 0, 0, 32, 32], [40, 40, 0, 0, 32, 32]])


def test_method_bar(trained):
  """Step 0 is the base; lr 0 moves nothing; every leaf gets a gradient; the loss falls; the
  frozen leaves stay bit-identical."""
  run, trajectory = trained
  params = run.full_params(run.trainable)
  for name in ("unet", "vae") + TEXT_ENCODERS:
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[name]),
                                                    jax.tree.leaves(run.pipe.params[name])))
  assert_training_bar(run, trajectory)


def test_cached_sdxl_conditioning_is_both_encoders_output(unet_run):
  """UNet only: the data pipeline caches each caption's concatenated context and pooled
  embedding (nothing in the text path trains), and the step needs neither text encoder."""
  run = unet_run
  assert run.frozen == {}
  first = run.dataset[0]
  ids = run.prompt_inputs(["a photo of sks toy", "a photo of toy"])
  context, pooled = encode_sdxl_prompt(run.models, run.pipe.params, ids["ids"], ids[IDS_2])
  np.testing.assert_allclose(first[CONTEXT], context, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first[POOLED], pooled, rtol=1e-5, atol=1e-6)


@slow
@pytest.mark.parametrize("single_file", [False, True])
def test_exports_load_in_diffusers_sdxl_pipeline(run, tmp_path, single_file):
  """The result folder (diffusers) and the original single file (A1111/ComfyUI) hold the trained
  weights; diffusers' StableDiffusionXLPipeline loads them, and its UNet reproduces ours. Slow:
  the result is `save_pipeline`'s SDXL folder and `save_single_file`'s SDXL file, each loaded by
  diffusers in tests/models/test_sdxl.py, test_sdxl_sampling.py and
  tests/convert/test_single_file_sdxl.py."""
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionXLPipeline

  from persona_jax.methods.base import ResultContext
  from persona_jax.methods.dreambooth import export_single_file, load
  from persona_jax.methods.spec import ExportRequest
  from persona_jax.verify import nchw
  trained = fixed_batch_trajectory(run, steps=2)["trained"]
  context = ResultContext(tmp_path, run.pipe, run.model_dir, run.config, run.full_params)
  (folder,) = run.method.save(trained, context)
  loaded = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
  if single_file:
    (single,), _ = export_single_file(ExportRequest(tmp_path, load(tmp_path), {},
                                                    tmp_path / "out", run.model_dir))
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=folder,
                                                        local_files_only=True)
  params = run.full_params(trained)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
  context_ = rng.standard_normal((1, 5, 80)).astype(np.float32)      # 32 + 48 wide encoders
  pooled = rng.standard_normal((1, 24)).astype(np.float32)
  time_ids = np.asarray([[32, 48, 0, 8, 32, 32]], np.float32)
  added = {"text_embeds": pooled, "time_ids": time_ids}
  with jax.default_matmul_precision("highest"):
    ours = run.pipe.unet.apply({"params": params["unet"]}, latents, np.array([500]), context_,
                               added_cond=added)
  with torch.no_grad():
    eps = loaded.unet(torch.from_numpy(nchw(latents)), torch.tensor([500]),
                      torch.from_numpy(context_),
                      added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
  np.testing.assert_allclose(eps.numpy(), nchw(ours), rtol=1e-4, atol=1e-5)
  te2 = loaded.text_encoder_2.state_dict()
  ours_te2 = params["text_encoder_2"]["final_layer_norm"]["scale"]
  np.testing.assert_array_equal(te2["text_model.final_layer_norm.weight"].numpy(), ours_te2)
