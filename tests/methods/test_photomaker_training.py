"""PhotoMaker v1 and v2 training on the tiny SDXL base (context 32 + 48 = 80 wide) with a tiny CLIP
image encoder (quick_gelu, 32 wide in 2 heads of 16, 16 px in 8 px patches, projection 24, so
visual_projection_2 is 80 - 24 = 56 wide) on toy-world identity folders (3 identities x 3 scenes):
the method bar (the trainable set a literal list, the tower and everything else bit-identical,
lr 0 moves nothing, every leaf moves, the loss falls on a fixed batch), the identity data (ID
images never the target, always the same person, 1..N of them, zeros after), and the result file
read back by the sampling path (the same fused prompt and LoRA-merged UNet; slow: `sample
--photomaker` on it writes images). v2 on the toy world's data source (the toy identity encoder's
face embeddings): its trainable set, the face embeddings in the batch, the training bar. Both
versions' results, and their exported .bin, load strictly in the torch re-creation of the official
modules and match it (`verify_file`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.data import photomaker as pm_data
from persona_jax.data.batch import IDS, IDS_2, PIXELS, TIME_IDS
from persona_jax.data.clip_images import CLIPImageProcessorConfig, preprocess_image
from persona_jax.data.images import DataError
from persona_jax.data.pipeline import make_iterator
from persona_jax.errors import ConfigError
from persona_jax.convert import photomaker_files as pmf
from persona_jax.methods import photomaker as pm
from persona_jax.methods.base import ResultContext
from persona_jax.methods.photomaker_conditioning import (ID_COUNT, ID_EMBEDS, ID_PIXELS,
                                                         PHOTOMAKER, PhotoMakerConditioning)
from persona_jax.train import loop
from persona_jax.world.photomaker_data import toy_people, write_identity_folders
from configs.photomaker import TOY_SOURCE
from tests.methods.test_ip_adapter_sdxl import TRANSFORMERS
from tests.methods.test_photomaker import _check
from tests.torch_reference import require_torch
from tests.markers import slow
from tests.runs import (_merge, assert_training_bar, fixed_batch_trajectory, one_device_mesh,
                        write_image_encoder)

REFERENCES = 2
HEADS = ["photomaker/visual_projection_2/kernel"] + [
    f"photomaker/fuse_module/{m}/{layer}/{leaf}" for m in ("mlp1", "mlp2")
    for layer, leaves in (("layernorm", ("scale", "bias")), ("fc1", ("kernel", "bias")),
                          ("fc2", ("kernel", "bias"))) for leaf in leaves] + [
    "photomaker/fuse_module/layer_norm/scale", "photomaker/fuse_module/layer_norm/bias"]
PERCEIVER = [f"photomaker/qformer_perceiver/{k}" for k in (
    [f"perceiver_resampler/layers_{n}_{leaf}" for n in range(4) for leaf in (
        "attn/norm1/bias", "attn/norm1/scale", "attn/norm2/bias", "attn/norm2/scale",
        "attn/to_kv/kernel", "attn/to_out/kernel", "attn/to_q/kernel", "ff/fc1/kernel",
        "ff/fc2/kernel", "ff/norm/bias", "ff/norm/scale")]
    + [f"perceiver_resampler/{layer}/{leaf}" for layer, leaves in (
        ("norm_out", ("bias", "scale")), ("proj_in", ("bias", "kernel")),
        ("proj_out", ("bias", "kernel"))) for leaf in leaves]
    + ["token_norm/bias", "token_norm/scale", "token_proj_0/bias", "token_proj_0/kernel",
       "token_proj_2/bias", "token_proj_2/kernel"])]
LORA = [f"lora/unet/{t}/{attn}/{proj}/{f}" for t in TRANSFORMERS for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0") for f in "ab"]


def write_encoder(folder):
  """A tiny CLIPVisionModelWithProjection folder as a PhotoMaker file's tower (quick_gelu)."""
  return write_image_encoder(folder, seed=3, hidden_size=32, intermediate_size=64,
                             projection_dim=24, num_hidden_layers=2)


def pm_config(sdxl_dir, encoder, identities, **overrides):
  values = dict(
      model=str(sdxl_dir),
      method=dict(name="photomaker", image_encoder=str(encoder), rank=2,
                  num_references=REFERENCES),
      data=dict(source="photomaker", instance_dir=str(identities), resolution=32, random_flip=0.0),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("photomaker_training")
  return {"encoder": write_encoder(root / "encoder"),
          "identities": write_identity_folders(root / "identities", 3, 3, resolution=32)}


@pytest.fixture(scope="module")
def run(sdxl_dir, files):
  return loop.build(pm_config(sdxl_dir, files["encoder"], files["identities"]),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory(run):
  return fixed_batch_trajectory(run, steps=3)


V2_IDENTITIES = 3


@pytest.fixture(scope="module")
def run_v2(sdxl_dir, files):
  return loop.build(pm_config(sdxl_dir, files["encoder"], "", method=dict(version="v2"),
                              data=dict(source=TOY_SOURCE, num_images=V2_IDENTITIES)),
                    mesh=one_device_mesh())


@pytest.fixture(scope="module")
def trajectory_v2(run_v2):
  return fixed_batch_trajectory(run_v2, steps=3)


def test_trainable_set_is_literal(run, files):
  """The ID encoder's visual_projection_2 and fuse module and LoRA on every attention's
  q/k/v/out train; the tower and CLIP's own projection are the encoder folder's, frozen."""
  from persona_jax.image_encoder import load_image_encoder
  assert set(tree.paths(run.trainable)) == set(HEADS + LORA)
  assert set(run.frozen) == {"unet", "vae", "text_encoder", "text_encoder_2", PHOTOMAKER}
  _, encoder = load_image_encoder(files["encoder"])
  for path, value in tree.flatten(encoder).items():
    np.testing.assert_array_equal(tree.flatten(run.frozen[PHOTOMAKER])[path], value)
  assert tree.flatten(run.trainable)[HEADS[0]].shape == (32, 80 - 24)
  cond = run.method.conditioning
  assert (cond.config.fuse_dim, cond.num_images, cond.trigger_id) == (80, REFERENCES,
                                                                      len(run.tokenizer) - 1)
  assert run.method.tokens.added == ("img",)


def test_data_source_references_are_other_images_of_the_same_person(run, files):
  """Every reference slot < n is another image of the target's person (CLIP-preprocessed), the
  rest zeros; n in 1..min(N, images - 1); the caption holds the trigger word after the class."""
  people = pm_data.read_folders(files["identities"], 32)
  processor = CLIPImageProcessorConfig.for_image_size(16)
  clip = [[preprocess_image(im, processor) for im in p.images] for p in people]
  counts = set()
  batches = make_iterator(run.dataset)
  for _ in range(6):
    batch = next(batches)
    assert batch[ID_PIXELS].shape == (2, REFERENCES, 16, 16, 3)
    assert batch[TIME_IDS].shape == (2, 6) and batch[IDS_2].shape == (2, 77)
    for row in range(2):
      (p, j), = [(p, j) for p, person in enumerate(people) for j, im in enumerate(person.images)
                 if np.allclose(batch[PIXELS][row], im / 127.5 - 1.0, atol=1e-6)]
      n = int(batch[ID_COUNT][row])
      counts.add(n)
      assert 1 <= n <= REFERENCES
      for slot in range(REFERENCES):
        x = batch[ID_PIXELS][row, slot]
        if slot >= n:
          assert not x.any()
          continue
        (k,) = [k for k, c in enumerate(clip[p]) if np.array_equal(c, x)]
        assert k != j
      assert (batch[IDS][row] == run.method.conditioning.trigger_id).sum() == 1
  assert counts == {1, 2}
  rng = np.random.default_rng(0)
  picks = [pm_data.pick_references(rng, 5, 2, 4) for _ in range(200)]
  assert all(2 not in p and len(set(p)) == len(p) for p in picks)
  assert {len(p) for p in picks} == {1, 2, 3, 4}


def test_data_errors(tmp_path):
  """An identity with one image, a caption without the trigger word: one-line errors."""
  write_identity_folders(tmp_path / "a", 1, 1)
  with pytest.raises(DataError, match="at least two"):
    pm_data.read_folders(tmp_path / "a", 32)
  people = toy_people(1, 2)
  people[0].captions[1] = "a photo of a ball"
  with pytest.raises(DataError, match="toy identity 0: caption 'a photo of a ball' must hold"):
    pm_data.check_captions(people, lambda c: np.asarray([[0, 1, 2, 9] if "img" in s else
                                                         [0, 1, 2, 3] for s in c]), 9, "img")


@slow
def test_training_bar(run, trajectory):
  """v1 (v2's bar is default; the step is the same but for the ID tokens): lr 0 moves nothing, every trainable leaf moves, the loss falls on the fixed batch, frozen
  params bit-identical."""
  assert_training_bar(run, trajectory)


@pytest.fixture(params=["v2", pytest.param("v1", marks=slow)])
def trained(request, sdxl_dir, files):
  """(version, run, trajectory, the run's config values): v2 by default, v1 slow."""
  if request.param == "v2":
    return ("v2", request.getfixturevalue("run_v2"), request.getfixturevalue("trajectory_v2"),
            (files["encoder"], "", dict(method=dict(version="v2"),
                                         data=dict(source=TOY_SOURCE, num_images=V2_IDENTITIES))))
  return ("v1", request.getfixturevalue("run"), request.getfixturevalue("trajectory"),
          (files["encoder"], files["identities"], {}))


def test_result_file_samples(trained, sdxl_dir, tmp_path):
  """photomaker.safetensors (the official layout) read by the sampling path: the same fused
  prompt as training's conditioning, the same LoRA-merged UNet; `method.pretrained` on it starts
  a run from the trained leaves (its rank, its tower)."""
  from persona_jax.convert.lora_formats import read_lora_file
  from persona_jax.methods.lora_compose import apply_loras
  from persona_jax.models import block_names
  version, run, trajectory, (encoder, identities, overrides) = trained
  context = ResultContext(tmp_path, run.pipe, run.model_dir, run.config, run.full_params)
  trained = trajectory["trained"]
  (path,) = run.method.save(trained, context)
  config, id_params, lora = pm.read_file(path)
  cond = run.method.conditioning
  assert config == cond.config
  params = run.method.params.apply(run.frozen, trained)
  for p, v in tree.flatten(id_params).items():
    np.testing.assert_array_equal(v, tree.flatten(params[PHOTOMAKER])[p])
  factors = read_lora_file(path, run.pipe.params, tensors=lora)
  blocks = len(block_names.all_blocks(run.pipe.unet_config))
  merged = apply_loras(run.pipe.params, [factors], np.ones((1, blocks), np.float32),
                       run.pipe.unet_config)
  got, want = tree.flatten(merged["unet"]), tree.flatten(params["unet"])
  assert max(float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()) for k in want) < 1e-6
  # the fused prompt of a training batch, with the file's ID encoder as sampling builds it
  batch = jax.tree.map(jnp.asarray, trajectory["batch"])
  sampling = PhotoMakerConditioning(config, cond.trigger_id, cond.pad_ids, cond.num_images)
  fused = jax.jit(lambda p, b: cond.fused(run.models, p, b))(params, batch)
  read = jax.jit(lambda p, b: sampling.fused(run.models, p, b))(
      {**params, PHOTOMAKER: id_params}, batch)
  np.testing.assert_allclose(read[0], fused[0], atol=1e-5)
  # method.pretrained: a run starting from the file starts where this one ended
  method = {**overrides.get("method", {}), "pretrained": str(path), "image_encoder": "", "rank": 64}
  again = loop.build(pm_config(sdxl_dir, encoder, identities, **{**overrides, "method": method}),
                     mesh=one_device_mesh())
  assert again.method.conditioning == cond
  start, ended = tree.flatten(again.trainable), tree.flatten(trained)
  assert set(start) == set(ended)
  for p in start:
    np.testing.assert_allclose(start[p], ended[p], rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(again.frozen[PHOTOMAKER]), jax.tree.leaves(run.frozen[PHOTOMAKER])):
    np.testing.assert_array_equal(a, b)


@slow
def test_sample_command_on_the_result(run, trajectory, sdxl_dir, tmp_path):
  """`sample --photomaker WORKDIR/photomaker.safetensors` writes images."""
  from PIL import Image
  context = ResultContext(tmp_path, run.pipe, run.model_dir, run.config, run.full_params)
  (path,) = run.method.save(trajectory["trained"], context)
  photos = []
  for k, image in enumerate(toy_people(1, 2)[0].images):
    photos.append(tmp_path / f"p{k}.png")
    Image.fromarray(image).save(photos[-1])
  assert main(["sample", "--model", str(sdxl_dir), "--photomaker", str(path), "--prompt",
               "a photo of a ball img", "--steps", "2", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "out"), "--image", str(photos[0]),
               "--image", str(photos[1])]) == 0
  assert list((tmp_path / "out").glob("*.png"))


def test_v2_trains_the_perceiver_on_face_embeddings(run_v2, trajectory_v2):
  """v2: the QFormerPerceiver and fuse module and the LoRA train (official sizes, heads 16 wide
  on this 80-wide base); visual_projection_2 is zeros (frozen: v2 never reads it); each reference
  slot holds its image's toy face embedding, zeros after n; the training bar."""
  assert set(tree.paths(run_v2.trainable)) == set(PERCEIVER + HEADS[1:] + LORA)
  c = run_v2.method.conditioning.config
  assert (c.version, c.num_tokens, c.token_proj_hidden_dim, c.perceiver_depth,
          c.perceiver_head_dim, c.perceiver_heads) == ("v2", 2, 2048, 4, 16, 5)
  assert not run_v2.frozen[PHOTOMAKER]["visual_projection_2"]["kernel"].any()
  people = toy_people(V2_IDENTITIES, 4, faces=True)
  processor = CLIPImageProcessorConfig.for_image_size(16)
  clip = {preprocess_image(im, processor).tobytes(): e for p in people
          for im, e in zip(p.images, p.embeddings)}
  batch = trajectory_v2["batch"]
  assert batch[ID_EMBEDS].shape == (2, REFERENCES, 512)
  for row in range(2):
    n = int(batch[ID_COUNT][row])
    for slot in range(REFERENCES):
      if slot >= n:
        assert not batch[ID_EMBEDS][row, slot].any()
      else:
        np.testing.assert_array_equal(batch[ID_EMBEDS][row, slot],
                                      clip[batch[ID_PIXELS][row, slot].tobytes()])
  assert_training_bar(run_v2, trajectory_v2)


def test_v2_face_analysis_data(tmp_path):
  """Folder data for v2 embeds each image's first face; images without one are never ID images;
  a person with fewer than two faces is a one-line error naming them."""
  from persona_jax.face.analysis import Face
  people = toy_people(2, 3)

  class Analysis:                     # a face in every image but the first person's first
    def analyze(self, image, det_sizes=None):
      if image is people[0].images[0]:
        return []
      e = np.full(4, float(image.mean()), np.float32)
      return [Face(np.zeros(4), 0.9, np.zeros((5, 2)), e, float(np.linalg.norm(e)))]
  embedded = pm_data.embed_faces(people, Analysis())
  assert embedded[0].embeddings[0] is None
  assert embedded[1].embeddings[2][0] == np.float32(people[1].images[2].mean())
  rng = np.random.default_rng(0)
  eligible = [k for k, e in enumerate(embedded[0].embeddings) if e is not None]
  assert all(0 not in pm_data.pick_references(rng, 3, 1, 2, eligible) for _ in range(50))
  people[0].images[1] = people[0].images[0]
  with pytest.raises(DataError, match="identity_0000: a face found in 1 of 3 images"):
    pm_data.embed_faces(people, Analysis())


def test_results_load_in_the_official_modules(trained, sdxl_dir, sdxl_pipe, tmp_path):
  """A v2 (v1: slow) result (photomaker.safetensors) loads strictly in the torch re-creation of the
  official ID encoders and diffusers' load_lora_weights, and match them (fused prompt,
  LoRA-merged UNet); `export --format official` writes the same tensors as the official nested
  .bin (the tiny heads are not the official widths a .bin implies, so it is compared, not run)."""
  torch = require_torch()
  from persona_jax.methods.photomaker_verify import verify_file
  from persona_jax.methods.spec import ExportRequest
  version, r, t, _ = trained
  context = ResultContext(tmp_path / version, r.pipe, r.model_dir, r.config, r.full_params)
  (tmp_path / version).mkdir()
  (path,) = r.method.save(t["trained"], context)
  out = tmp_path / version / "export"
  out.mkdir()
  written, _ = pm.export(ExportRequest(tmp_path / version, pm.load(path), {}, out, sdxl_dir))
  assert [p.name for p in written] == ["photomaker.safetensors", f"photomaker-{version}.bin"]
  _check(verify_file(sdxl_pipe, sdxl_dir, path, sampling_steps=0))
  blob = torch.load(written[1], weights_only=True)
  assert set(blob) == {"id_encoder", "lora_weights"}
  flat = pmf.read_official(path)
  pickled = pmf.read_official(written[1], allow_pickle=True)
  assert set(pickled) == set(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(pickled[k], v)


def test_config_errors(sdxl_dir, files, model_dirs):
  """v2 without face analysis for folder data, an SD 1.x base, a trigger word already in the
  vocabulary: one-line errors."""
  with pytest.raises(ConfigError, match="method.face_analysis: PhotoMaker v2 trains"):
    loop.build(pm_config(sdxl_dir, files["encoder"], files["identities"],
                         method=dict(version="v2")), mesh=one_device_mesh())
  with pytest.raises(ConfigError, match="trains on SDXL bases"):
    loop.build(pm_config(model_dirs["sd1"], files["encoder"], files["identities"]),
               mesh=one_device_mesh())
  with pytest.raises(ConfigError, match="already a token"):
    loop.build(pm_config(sdxl_dir, files["encoder"], files["identities"],
                         method=dict(trigger_word="<|endoftext|>")), mesh=one_device_mesh())


def test_per_row_copies_match_each_rows_own_expansion():
  """ID_COUNT: each row expanded as with its own number of ID images (the official expansion)."""
  from persona_jax.methods.photomaker_conditioning import expand_class_word
  ids = jnp.asarray([[49406, 5, 6, 7, 99, 8, 49407, 0, 0, 0],
                     [49406, 5, 7, 99, 8, 9, 10, 49407, 0, 0]], jnp.int32)
  counts = jnp.asarray([[1], [3]], jnp.int32)
  got, mask = expand_class_word(ids, 99, counts, 0)
  for row, n in enumerate((1, 3)):
    want, want_mask = expand_class_word(ids[row:row + 1], 99, n, 0)
    np.testing.assert_array_equal(got[row], want[0])
    np.testing.assert_array_equal(mask[row], want_mask[0])
    assert int(mask[row].sum()) == n
