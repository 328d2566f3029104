"""BLIP-Diffusion zero-shot sampling (methods/blip_diffusion.py) on the tiny random folder of
`make-random-model --preset blip_diffusion` (the released layout: qformer/, text_encoder/ as
ContextCLIPTextModel, a PNDM scheduler config, image_processor/, model_index.json with
ctx_begin_pos, mean and std; the Q-Former over the shipped bert-base-uncased vocabulary).

`verify` against diffusers' deprecated BlipDiffusionPipeline under the transformers 5 shim: image
processing, query embeddings, prompt and negative embeddings, 3 DDIM steps with guidance (reached
about 2e-6 relative; asserted 1e-4); the prompt assembly equals the pipeline's `_build_prompt`;
BLIP's image processing equals BlipImageProcessor on images of several modes; `sample` writes
images that follow the subject image; bad input stops with one-line errors.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from persona_jax.cli import main
from persona_jax.errors import ConfigError, ModelFileError
from tests.markers import slow
from tests.torch_reference import require_torch

TOL = 1e-4


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
  """The folder written by `make-random-model --preset blip_diffusion` (read-only for tests)."""
  out = tmp_path_factory.mktemp("blip") / "blip_diffusion"
  assert main(["make-random-model", str(out), "--preset", "blip_diffusion", "--seed", "3"]) == 0
  return out


@pytest.fixture(scope="module")
def blip_pipe(blip_dir):
  from persona_jax.methods.registry import load_model
  return load_model(blip_dir)


@pytest.fixture(scope="module")
def subject_png(tmp_path_factory):
  """An RGBA subject image (converted to RGB as diffusers does: alpha onto white)."""
  path = tmp_path_factory.mktemp("subject") / "subject.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA").save(path)
  return path


def test_the_folder_loads_as_released(blip_dir, blip_pipe):
  from persona_jax.methods.blip_diffusion_folder import BlipDiffusionPipeline
  index = json.loads((blip_dir / "model_index.json").read_text())
  assert index["_class_name"] == "BlipDiffusionPipeline" and index["ctx_begin_pos"] == 2
  assert index["text_encoder"] == ["blip_diffusion", "ContextCLIPTextModel"]
  assert json.loads((blip_dir / "scheduler/scheduler_config.json").read_text())[
      "_class_name"] == "PNDMScheduler"
  assert isinstance(blip_pipe, BlipDiffusionPipeline)
  assert set(blip_pipe.params) == {"unet", "text_encoder", "vae", "qformer"}
  assert len(blip_pipe.qformer_tokenizer) == 30523           # bert-base-uncased + [DEC]
  cond = blip_pipe.conditioning()
  assert cond.prompt_length == 77 - 4 and cond.ctx_begin_pos == 2
  assert blip_pipe.image_processing.resize_to == (28, 28)


def test_verify_passes_on_the_tiny_folder(blip_dir, capsys):
  require_torch()
  assert main(["verify", str(blip_dir)]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.endswith((" ok", "FAIL"))]
  names = [r.split("  ")[0] for r in rows]
  assert names == ["blip image processing", "prompt assembly (exact)", "qformer query embeddings",
                   "text_encoder: prompt with ctx", "text_encoder: negative (no ctx)",
                   "ddim 3 steps, cfg 7.5: latents", "ddim 3 steps, cfg 7.5: images"], out
  assert all(float(r.split()[-2]) <= TOL for r in rows) and out.strip().endswith("PASS"), out


@pytest.mark.parametrize("prompt, target, strength, reps", [
    ("swimming underwater", "dog", 1.0, 20), ("  on a sofa ", "teddy bear", 0.5, 20),
    ("x", "cat", 0.3, 20), ("x", "cat", 0.0, 20), ("in the snow", "dog", 1.0, 1)])
def test_prompt_assembly_equals_the_pipeline(prompt, target, strength, reps):
  require_torch()
  from diffusers.pipelines.deprecated.blip_diffusion.pipeline_blip_diffusion import (
      BlipDiffusionPipeline)

  from persona_jax.methods.blip_diffusion_conditioning import build_prompt
  want = BlipDiffusionPipeline._build_prompt(None, [prompt], [target], strength, reps)
  assert [build_prompt(prompt, target, strength, reps)] == want


def test_blip_image_processing_equals_diffusers(tmp_path):
  """Odd sizes and modes, other mean/std (model_index.json's win over the processor's), and an
  image read from a file as `sample` reads it."""
  require_torch()
  from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import (
      BlipImageProcessor)

  from persona_jax.data.blip_images import blip_processing
  from persona_jax.data.clip_images import preprocess, preprocess_image
  from persona_jax.data.images import load_image
  rng = np.random.default_rng(1)
  mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
  raw = {**BlipImageProcessor(size={"height": 32, "width": 32}).to_dict(), "image_mean": [0.1] * 3}
  ref = BlipImageProcessor(**{k: v for k, v in raw.items() if k != "image_processor_type"})
  config = blip_processing(json.loads(json.dumps(raw)), 32, mean=mean, std=std)
  palette = Image.fromarray(rng.integers(0, 256, (20, 50), dtype=np.uint8), "L").convert("P")
  palette.info["transparency"] = 7
  images = [Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze(), mode)
            for (h, w, c, mode) in ((50, 37, 3, "RGB"), (17, 40, 4, "RGBA"), (33, 33, 1, "L"),
                                    (64, 20, 2, "LA"))] + [palette]
  want = ref.preprocess(images, image_mean=mean, image_std=std, return_tensors="np").pixel_values
  np.testing.assert_allclose(preprocess(images, config), want.transpose(0, 2, 3, 1), atol=1e-6)
  images[1].save(tmp_path / "rgba.png")
  from_file = preprocess_image(load_image(tmp_path / "rgba.png"), config)
  np.testing.assert_allclose(from_file, want[1].transpose(1, 2, 0), atol=1e-6)


def _sample(blip_dir, out, *flags):
  return main(["sample", "--model", str(blip_dir), "--prompt", "swimming underwater",
               "--steps", "2", "--out", str(out), *flags])


def test_sample_writes_images_that_follow_the_subject(blip_dir, blip_pipe, subject_png, tmp_path):
  """The command's image, and the same sampling (library calls, the same compiled program) with
  another subject image: the query embeddings reach the UNet."""
  from persona_jax.methods.registry import spec
  from persona_jax.methods.spec import SampleRequest
  from persona_jax.text_to_image import SampleOptions, text_to_image
  knobs = {"subject_class": "teddy bear", "target_class": "bear", "prompt_reps": 3}
  flags = [f"--{k.replace('_', '-')}={v}" for k, v in knobs.items()]
  assert _sample(blip_dir, tmp_path / "a", "--image", str(subject_png), *flags) == 0
  written = sorted(p.name for p in (tmp_path / "a").iterdir())
  assert written == ["0000_0000.png", "grid.png"]
  a = np.asarray(Image.open(tmp_path / "a" / "0000_0000.png"))
  other = tmp_path / "other.png"
  Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(other)
  images = {}
  for name, path in (("same", subject_png), ("other", other)):
    sampling = spec("blip_diffusion").sample(
        SampleRequest(None, blip_pipe, blip_pipe.params, (path,), knobs))
    images[name] = text_to_image(blip_pipe, "swimming underwater", options=SampleOptions(steps=2),
                                 sampling=sampling, progress=True)[0]
  assert a.shape == (32, 32, 3) and np.array_equal(images["same"], a)
  assert np.abs(images["other"].astype(np.int32) - a).max() > 0


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--image", "{subject}"], "--subject-class WORD is needed: the category of the --image"),
    (["--subject-class", "dog"], "--model (blip_diffusion) needs --image PATH"),
    (["--image", "{subject}", "--image", "{subject}", "--subject-class", "dog"],
     "--model (blip_diffusion) reads one --image"),
    (["--image", "{subject}", "--subject-class", "dog", "--prompt-reps", "-1"],
     "--prompt-strength 1.0 and --prompt-reps -1 must be >= 0"),
    (["--image", "{missing}", "--subject-class", "dog"], "missing.png: cannot read this image"),
])
def test_bad_sampling_input_is_a_one_line_error(flags, message, blip_dir, subject_png, tmp_path,
                                                capsys):
  paths = {"subject": str(subject_png), "missing": str(tmp_path / "missing.png")}
  assert _sample(blip_dir, tmp_path / "out", *[f.format(**paths) for f in flags]) == 2
  assert message in _one_line_error(capsys)
  assert not (tmp_path / "out").exists()


def test_blip_knobs_need_a_blip_folder(tmp_path, capsys):
  """Checked before any model loads (here: the embedded default)."""
  assert main(["sample", "--prompt", "x", "--subject-class", "dog", "--out", str(tmp_path)]) == 2
  assert "--subject-class goes with a blip_diffusion --model" in _one_line_error(capsys)


def _copy(blip_dir, dest, index=None, processor=None):
  """`blip_dir` at `dest` (files linked) with JSON entries of model_index.json and the image
  processor's config replaced."""
  shutil.copytree(blip_dir, dest, copy_function=os.symlink)
  for name, changes in (("model_index.json", index), ("image_processor/preprocessor_config.json",
                                                      processor)):
    if changes:
      path = dest / name
      raw = json.loads(path.read_text())
      path.unlink()
      path.write_text(json.dumps({**raw, **changes}))
  return dest


def test_bad_folders_are_one_line_errors(blip_dir, tmp_path):
  from persona_jax.methods.blip_diffusion_folder import read_blip_folder
  words = _copy(blip_dir, tmp_path / "words")
  (words / "qformer_tokenizer").mkdir()
  (words / "qformer_tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ndog\n")
  cases = [
      (words, ModelFileError, "word embeddings have 30523 rows but its tokenizer"),
      (_copy(blip_dir, tmp_path / "size", processor={"size": {"height": 32, "width": 32}}),
       ConfigError, "size 32x32 is not the Q-Former's image_size 28"),
      (_copy(blip_dir, tmp_path / "pos", index={"ctx_begin_pos": 90}), ConfigError,
       "ctx_begin_pos 90 must be a whole number from 0 to 73"),
      (_copy(blip_dir, tmp_path / "std", index={"std": [0.5, 0.5]}), ConfigError,
       "'std' = [0.5, 0.5]; expected 3 numbers"),
      (_copy(blip_dir, tmp_path / "class", index={"qformer": ["blip_diffusion", "Blip2Model"]}),
       ModelFileError, "qformer is a Blip2Model; supported: Blip2QFormerModel"),
  ]
  for folder, error, message in cases:
    with pytest.raises(error) as e:
      read_blip_folder(folder)
    assert message in str(e.value) and str(folder) in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@slow
def test_verify_fails_when_ours_puts_the_context_elsewhere(blip_pipe, blip_dir):
  """The comparison sees the context position: ours at 3, diffusers' at the folder's 2."""
  import dataclasses

  from persona_jax.methods.blip_diffusion_verify import verify_folder
  require_torch()
  results = {r.name: r for r in verify_folder(dataclasses.replace(blip_pipe, ctx_begin_pos=3),
                                              blip_dir, steps=1)}
  assert results["qformer query embeddings"].ok(TOL)
  assert not results["text_encoder: prompt with ctx"].ok(TOL)
  assert results["text_encoder: negative (no ctx)"].ok(TOL)
