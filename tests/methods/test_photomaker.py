"""PhotoMaker v1/v2 sampling with official-layout files on the tiny SDXL base (context 32 + 48 =
80 wide, so the files' fuse width is 80): files written by the torch re-creation of the official
modules (persona_jax/photomaker_torch.py; tower 64 wide with one head of 64, 32 px in 8 px
patches; v1 projections 32 + 48; v2: face embeddings 12 wide, a one-layer perceiver with heads of
16, recorded in the safetensors metadata) and random `lora_weights` in the official files'
naming (diffusers' older `unet.<...>.processor.to_q_lora.down.weight`) on every attention of the
UNet. Checked: the prompt expansion (ids and mask) against the official logic, the fused
embeddings, the LoRA-merged UNet (against diffusers' load_lora_weights) and DDIM sampling through
the official loop's start_merge_step switch (0 and past the last step) via verify, the sample
command end to end, v2's face embeddings from a tiny insightface pack (the face tests' SCRFD and
IResNet), and the one-line errors.
"""

import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from persona_jax.cli import main
from persona_jax.errors import ConfigError, PersonaError
from persona_jax.methods import photomaker as pm
from persona_jax.methods import photomaker_inputs as pmi
from persona_jax.methods.photomaker_conditioning import expand_class_word, remove_trigger
from tests.markers import slow
from tests.torch_reference import require_torch

TOL = 1e-4
ID_DIM = 12
RANK = 4


def _lora_weights(torch, sdxl_dir):
  """Random official-named LoRA factors for every attention of the tiny SDXL UNet."""
  from diffusers import UNet2DConditionModel
  from diffusers.models.attention_processor import Attention
  unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
  g = torch.Generator().manual_seed(7)
  out = {}
  for name, m in unet.named_modules():
    if not isinstance(m, Attention):
      continue
    for proj, layer in (("to_q", m.to_q), ("to_k", m.to_k), ("to_v", m.to_v), ("to_out", m.to_out[0])):
      key = f"unet.{name}.processor.{proj}_lora"
      out[f"{key}.down.weight"] = 0.3 * torch.randn(RANK, layer.in_features, generator=g)
      out[f"{key}.up.weight"] = 0.3 * torch.randn(layer.out_features, RANK, generator=g)
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, sdxl_dir):
  """{"v1": photomaker-v1.bin (pickle), "v1st": the same as safetensors, "v2": safetensors}."""
  torch = require_torch()
  from safetensors.torch import save_file
  from transformers import CLIPVisionConfig

  from persona_jax import photomaker_torch as ref
  vision = CLIPVisionConfig(hidden_size=64, intermediate_size=37, projection_dim=32,
                            num_hidden_layers=1, num_attention_heads=1, image_size=32, patch_size=8)
  torch.manual_seed(0)
  v1 = ref.IDEncoderV1(vision, 48).eval()
  v2 = ref.IDEncoderV2(vision, 48, 80, ID_DIM, depth=1, dim_head=16).eval()
  ref.randomize_(v1, 0)
  ref.randomize_(v2, 1)
  lora = _lora_weights(torch, sdxl_dir)
  root = tmp_path_factory.mktemp("photomaker_files")
  flat = lambda m: {**{f"id_encoder.{k}": v.contiguous() for k, v in m.state_dict().items()},
                    **{f"lora_weights.{k}": v.contiguous() for k, v in lora.items()}}
  torch.save({"id_encoder": v1.state_dict(), "lora_weights": lora}, root / "photomaker-v1.bin")
  save_file(flat(v1), root / "photomaker-v1.safetensors")
  save_file(flat(v2), root / "photomaker-v2.safetensors", metadata={"perceiver_head_dim": "16"})
  return {"v1": root / "photomaker-v1.bin", "v1st": root / "photomaker-v1.safetensors",
          "v2": root / "photomaker-v2.safetensors"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Two random RGB photos of different sizes."""
  root = tmp_path_factory.mktemp("photomaker_photos")
  rng = np.random.default_rng(0)
  out = []
  for i, (h, w) in enumerate(((40, 48), (52, 36))):
    path = root / f"face_{i}.png"
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    out.append(path)
  return out


# ---------------------------------------------------------------------------------------------
# The prompt expansion against the official code.

PROMPTS = ("a photo of a man img", "instagram photo, portrait photo of a woman img, colorful, "
           "perfect face, natural skin, hard shadows, film grain, best quality",
           "a man img " + "very " * 80)                     # truncated before and after


def test_prompt_expansion_matches_official(sdxl_pipe):
  require_torch()
  from persona_jax import photomaker_torch as ref
  from persona_jax.tokenizer import tokenize
  tok, tok_2, trigger = pmi.trigger_tokenizers(sdxl_pipe, "img")
  ref_tok, ref_trigger = ref.add_trigger_word(sdxl_pipe.tokenizer, "img")
  ref_tok_2, _ = ref.add_trigger_word(sdxl_pipe.tokenizer_2, "img")
  assert trigger == ref_trigger == 49408
  for ours, theirs in ((tok, ref_tok), (tok_2, ref_tok_2)):
    ids = tokenize(ours, list(PROMPTS))
    for copies in (1, 2, 4, 8):
      got, mask = expand_class_word(jnp.asarray(ids), trigger, copies, ours.pad_token_id)
      for r, prompt in enumerate(PROMPTS):
        want, want_mask = ref.expand_prompt_ids(theirs, prompt, ref_trigger, copies)
        np.testing.assert_array_equal(np.asarray(got[r]), want[0].numpy())
        np.testing.assert_array_equal(np.asarray(mask[r]), want_mask[0].numpy())
    plain = np.asarray(remove_trigger(jnp.asarray(ids), trigger, ours.pad_token_id))
    for r, prompt in enumerate(PROMPTS[:2]):           # the official text-only prompt, re-encoded
      want = tokenize(theirs, [ref.text_only_prompt(ref_tok, prompt, "img")])[0]
      np.testing.assert_array_equal(plain[r], want)


def test_prompt_checks_are_one_line_errors(sdxl_pipe):
  tok, tok_2, trigger = pmi.trigger_tokenizers(sdxl_pipe, "img")
  check = pmi.check_prompt(tok_2, trigger, "img")
  assert check("a man img in the snow") == "a man img in the snow"
  for prompt, match in (("a photo of a man", r"exactly once \(found 0\)"),
                        ("a man img and a woman img", r"exactly once \(found 2\)"),
                        ("img of a man", "must follow the class word")):
    with pytest.raises(ConfigError, match=match) as e:
      check(prompt)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="already a token"):
    pmi.trigger_tokenizers(sdxl_pipe, "<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# Against the torch re-creation and diffusers (verify).


def _check(results):
  moved = [r for r in results if r.name.startswith("adapter moved")]
  assert len(moved) == 1 and moved[0].max_rel > 1e-3, moved
  for r in results:
    if r not in moved:
      assert r.max_rel < TOL, r
  exact = [r for r in results if "ids" in r.name or "mask" in r.name]
  assert len(exact) == 3 and all(r.max_abs == 0 for r in exact)


def test_verify_command_v1_pickle_with_images(files, sdxl_dir, photos, capsys):
  """v1 (pickled .bin) through `persona-jax verify --photomaker FILE --allow-pickle --image ...`:
  our CLIP preprocessing of the photos against transformers', the expansion, the fused
  embeddings, the LoRA-merged UNet, and DDIM sampling at start_merge_step 0 (one text-only step,
  then fused) and 10 (text-only throughout)."""
  require_torch()
  assert main(["verify", str(sdxl_dir), "--photomaker", str(files["v1"]), "--allow-pickle",
               "--image", str(photos[0]), "--image", str(photos[1])]) == 0
  out = capsys.readouterr().out
  for line in ("photomaker: ID image pixels", "photomaker v1: fused prompt embeddings",
               "photomaker v1: unet, LoRA merged", "ddim 3 steps, start_merge_step 0",
               "ddim 3 steps, start_merge_step 10", "adapter moved diffusers' UNet output"):
    assert line in out, out
  assert out.strip().endswith("PASS")


@pytest.mark.parametrize("steps", [0, pytest.param(3, marks=slow)], ids=["embeddings", "sampling"])
def test_v2_matches_official(files, sdxl_dir, sdxl_pipe, steps):
  """v2 (safetensors, two random ID images, random face embeddings): the expansion (2 tokens per
  image), the fused embeddings, the LoRA-merged UNet (and sampling: slow)."""
  require_torch()
  from persona_jax.methods.photomaker_verify import verify_file
  results = verify_file(sdxl_pipe, sdxl_dir, files["v2"], sampling_steps=steps)
  _check(results)
  assert len(results) == 9 + 2 * bool(steps)


# ---------------------------------------------------------------------------------------------
# The sample command.


def _sample(sdxl_dir, file, photos, out, *extra):
  return main(["sample", "--model", str(sdxl_dir), "--photomaker", str(file), "--prompt",
               "a photo of a man img in the snow", "--steps", "2", "--out", str(out),
               "--image", str(photos[0]), "--image", str(photos[1]), *extra])


@slow          # the sampling path runs by default in the verify command and start_merge_step tests
def test_sample_command_writes_images(files, sdxl_dir, photos, tmp_path, capsys):
  assert _sample(sdxl_dir, files["v1"], photos, tmp_path / "v1", "--allow-pickle",
                 "--start-merge-step", "0", "--num-images", "2") == 0
  written = sorted(p.name for p in (tmp_path / "v1").iterdir())
  assert written == ["0000_0000.png", "0000_0001.png", "grid.png"]
  image = np.asarray(Image.open(tmp_path / "v1" / "0000_0000.png"))
  assert image.shape[2] == 3 and image.std() > 0


@slow
def test_sample_command_v2_with_a_face_embedding_file(files, sdxl_dir, photos, tmp_path):
  np.save(tmp_path / "face.npy", np.random.default_rng(0).standard_normal(ID_DIM).astype(np.float32))
  assert _sample(sdxl_dir, files["v2"], photos, tmp_path / "v2", "--face-embedding",
                 str(tmp_path / "face.npy")) == 0
  assert (tmp_path / "v2" / "grid.png").is_file()


def test_start_merge_step_is_traced(files, sdxl_pipe, photos):
  """One compiled sampler for every start_merge_step: the value is an input, not a constant."""
  from persona_jax.methods.spec import SampleRequest
  result = pm.load(files["v1st"])
  sampling = [pm.sample(SampleRequest(result, sdxl_pipe, sdxl_pipe.params, tuple(photos),
                                      {"start_merge_step": s})) for s in (0, 10)]
  assert sampling[0].conditioning == sampling[1].conditioning          # the jit's static part
  assert hash(sampling[0].conditioning) == hash(sampling[1].conditioning)
  assert [int(s.inputs["start_merge_step"][0]) for s in sampling] == [0, 10]
  assert sampling[0].inputs["photomaker_pixels"].shape == (1, 2, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# Bad input.


def _one_line_error(capsys, match):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0], err


def test_bad_input_one_line_errors(files, sdxl_dir, model_dirs, photos, tmp_path, capsys):
  assert _sample(sdxl_dir, files["v1"], photos, tmp_path / "a") == 2
  _one_line_error(capsys, "--allow-pickle")
  assert _sample(sdxl_dir, files["v2"], photos, tmp_path / "b") == 2
  _one_line_error(capsys, "PhotoMaker v2 needs a face embedding")
  assert _sample(model_dirs["sd1"], files["v1st"], photos, tmp_path / "c") == 2
  _one_line_error(capsys, "PhotoMaker samples on SDXL bases")
  assert main(["sample", "--model", str(sdxl_dir), "--photomaker", str(files["v1st"]),
               "--prompt", "a photo of a man", "--steps", "2", "--out", str(tmp_path / "d"),
               "--image", str(photos[0])]) == 2
  _one_line_error(capsys, "exactly once (found 0)")
  assert not any((tmp_path / d).exists() for d in "abcd")


def test_face_embedding_file_errors(tmp_path, photos):
  from persona_jax.models.photomaker import PhotoMakerConfig
  v1, v2 = PhotoMakerConfig(), PhotoMakerConfig(version="v2", id_embeddings_dim=ID_DIM)
  np.save(tmp_path / "one.npy", np.ones(ID_DIM, np.float32))
  kept, embeds = pmi.face_embeddings(v2, photos, tmp_path / "one.npy")
  assert kept == photos and embeds.shape == (2, ID_DIM)            # [D]: the same for each image
  np.save(tmp_path / "bad.npy", np.zeros((3, ID_DIM), np.float32))
  cases = ((v2, dict(embedding_file=tmp_path / "bad.npy"), "one raw ArcFace embedding per --image"),
           (v2, dict(embedding_file=tmp_path / "one.npy", pack="p"), "give one of them"),
           (v1, dict(embedding_file=tmp_path / "one.npy"), "a PhotoMaker v1 file uses no face"))
  for config, kw, match in cases:
    with pytest.raises(ConfigError, match=match) as e:
      pmi.face_embeddings(config, photos, **kw)
    assert "\n" not in str(e.value)


class _Face:
  def __init__(self, value, x):
    self.embedding = np.full(ID_DIM, value, np.float32)
    self.box, self.score = np.array([x, 0, x + 10, 10.0]), 0.9


class _Analysis:
  """Stands in for face/analysis.py's FaceAnalysis: faces per image file name."""
  def __init__(self, faces):
    self.faces, self.sizes = faces, []

  def analyze(self, image, det_sizes=None):
    self.sizes.append(det_sizes)
    return self.faces.pop(0)


def test_face_analysis_picks_the_first_face_and_leaves_out_faceless_images(monkeypatch, photos,
                                                                          caplog):
  from persona_jax.face import analysis as fa
  from persona_jax.models.photomaker import PhotoMakerConfig
  config = PhotoMakerConfig(version="v2", id_embeddings_dim=ID_DIM)
  fake = _Analysis([[_Face(1.0, 0), _Face(2.0, 20)], []])
  monkeypatch.setattr(fa, "load_face_analysis", lambda pack: fake)
  with caplog.at_level(logging.WARNING):
    kept, embeds = pmi.face_embeddings(config, photos, pack="pack")
  assert kept == photos[:1] and embeds.shape == (1, ID_DIM) and (embeds == 1.0).all()
  assert fake.sizes == [fa.PHOTOMAKER_V2_DET_SIZES] * 2
  assert "2 faces found; using the first detected" in caplog.text
  assert f"{photos[1]}: no face found; PhotoMaker v2 leaves this ID image out" in caplog.text
  monkeypatch.setattr(fa, "load_face_analysis", lambda pack: _Analysis([[], []]))
  with pytest.raises(PersonaError, match="no face found in any --image"):
    pmi.face_embeddings(config, photos, pack="pack")


# ---------------------------------------------------------------------------------------------
# v2's face embeddings from a real (tiny) insightface pack.


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
  """A buffalo_l-layout folder: the face tests' tiny SCRFD as det_10g.onnx and a tiny ArcFace
  IResNet with ID_DIM-wide embeddings (the v2 file's) exported as w600k_r50.onnx."""
  pytest.importorskip("onnxruntime")
  pytest.importorskip("onnx")
  require_torch()
  from tests.face import tiny_iresnet, tiny_scrfd
  folder = tmp_path_factory.mktemp("photomaker_pack") / "buffalo_l"
  folder.mkdir()
  model = tiny_scrfd.calibrate(tiny_scrfd.build(0), tiny_scrfd.image(100, (640, 640)), 0.001)
  tiny_scrfd.export(model, folder / "det_10g.onnx")
  tiny_iresnet.export(tiny_iresnet.build(0, embedding=ID_DIM), folder / "w600k_r50.onnx")
  return folder


@pytest.fixture(scope="module")
def face_photos(tmp_path_factory):
  """{"faces": two photos the tiny SCRFD finds faces in, "blank": a flat gray one it finds none
  in at any of PhotoMaker v2's detection sizes}."""
  from tests.face import tiny_scrfd
  root = tmp_path_factory.mktemp("photomaker_face_photos")
  images = {"face_a.png": tiny_scrfd.image(4, (300, 260)), "face_b.png": tiny_scrfd.image(5, (200, 240)),
            "blank.png": np.full((64, 64, 3), 128, np.uint8)}
  for name, image in images.items():
    Image.fromarray(image).save(root / name)
  return {"faces": [root / "face_a.png", root / "face_b.png"], "blank": root / "blank.png"}


def test_face_analysis_pack_gives_the_first_faces_raw_embedding(face_pack, face_photos, caplog):
  """face_embeddings(pack=...) as PhotoMaker v2 takes them: per image, the raw embedding of the
  first face `load_face_analysis(pack).analyze` detects (highest score); an image without a face
  left out with a warning naming it; none with a face: the one-line error."""
  from persona_jax.data.images import load_image
  from persona_jax.face.analysis import load_face_analysis
  from persona_jax.models.photomaker import PhotoMakerConfig
  config = PhotoMakerConfig(version="v2", id_embeddings_dim=ID_DIM)
  analysis = load_face_analysis(face_pack)
  expected = []
  for path in face_photos["faces"]:
    faces = analysis.analyze(load_image(path))
    assert len(faces) >= 2 and faces[0].score == max(f.score for f in faces)
    expected.append(faces[0].embedding)
  assert analysis.analyze(load_image(face_photos["blank"])) == []
  images = [face_photos["faces"][0], face_photos["blank"], face_photos["faces"][1]]
  with caplog.at_level(logging.WARNING):
    kept, embeds = pmi.face_embeddings(config, images, pack=face_pack)
  assert kept == face_photos["faces"]
  assert embeds.dtype == np.float32 and embeds.shape == (2, ID_DIM)
  np.testing.assert_array_equal(embeds, np.stack(expected))
  assert np.linalg.norm(embeds, axis=1).min() > 1.5          # raw, not unit-normalized
  assert f"{face_photos['blank']}: no face found; PhotoMaker v2 leaves this ID image out" in caplog.text
  for path in face_photos["faces"]:
    assert re.search(rf"{re.escape(str(path))}: \d+ faces found; using the first detected", caplog.text)
  with pytest.raises(PersonaError, match=r"^no face found in any --image \(.*blank\.png\)") as e:
    pmi.face_embeddings(config, [face_photos["blank"]], pack=face_pack)
  assert "\n" not in str(e.value)


@slow
def test_sample_command_v2_with_a_face_analysis_pack(files, sdxl_dir, face_pack, face_photos,
                                                     tmp_path, caplog):
  photos = [face_photos["faces"][0], face_photos["blank"]]
  with caplog.at_level(logging.WARNING):
    assert _sample(sdxl_dir, files["v2"], photos, tmp_path / "v2", "--face-analysis",
                   str(face_pack)) == 0
  assert f"{face_photos['blank']}: no face found" in caplog.text
  image = np.asarray(Image.open(tmp_path / "v2" / "0000_0000.png"))
  assert image.shape[2] == 3 and image.std() > 0
