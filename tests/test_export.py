"""`persona-jax export`: each method's formats from a run folder, the round trip through kohya
back into `sample --lora`, and the error for a format the method lacks. (The files' contents
are checked against diffusers' own loaders in tests/convert.)"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.convert import embedding_formats as ef
from persona_jax.convert import lora_formats as lf
from persona_jax.pipeline import load_pipeline
from persona_jax.verify import nchw
from tests.convert.test_lora_formats import merged, random_factors
from tests.torch_reference import require_torch


def run_folder(path, model, method):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"model": str(model), "method": {"name": method}}))
  return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dirs, pipes):
  """A LoRA run folder whose lora.safetensors holds random factors (LoCon convs and text encoder
  included) in our own format."""
  pipe = pipes["sd1"]
  factors = random_factors(pipe, seed=5)
  wd = run_folder(tmp_path_factory.mktemp("runs") / "my_lora", model_dirs["sd1"], "lora")
  flat = {}
  for path, f in factors.items():
    target = path[: -len("/kernel")]
    flat.update({f"{target}/a": f.a, f"{target}/b": f.b,
                 f"{target}/alpha": np.asarray(f.scale * f.a.shape[1], np.float32)})
  save_file(flat, str(wd / "lora.safetensors"), metadata={"format": "persona_jax-lora"})
  return wd, factors


@pytest.mark.parametrize("fmt,name", [("diffusers", "pytorch_lora_weights.safetensors"),
                                      ("kohya", "my_lora.safetensors"),
                                      ("a1111", "my_lora.safetensors")])
def test_lora_exports_read_back_to_the_same_weights(lora_run, pipes, tmp_path, capsys, fmt, name):
  wd, factors = lora_run
  out = tmp_path / "out"
  assert main(["export", str(wd), "--format", fmt, "--out", str(out)]) == 0
  assert capsys.readouterr().out.split() == [str(out / name)]
  record = json.loads((out / "export.json").read_text())
  assert record["method"]["name"] == "lora" and record["format"] == fmt
  pipe = pipes["sd1"]
  back = lf.read_lora_file(out / name, pipe.params)
  want, got = tree.flatten(merged(pipe, factors)), tree.flatten(merged(pipe, back))
  for p in factors:
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-5, atol=1e-6)


def test_kohya_round_trip_samples_identically(lora_run, model_dirs, tmp_path, capsys):
  wd, _ = lora_run
  assert main(["export", str(wd), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
  kohya = capsys.readouterr().out.split()[0]
  grids = []
  for i, lora in enumerate((str(wd / "lora.safetensors"), kohya)):
    assert main(["sample", "--model", str(model_dirs["sd1"]), "--prompt", "a photo of a ball",
                 "--steps", "3", "--height", "32", "--width", "32", "--lora", lora,
                 "--out", str(tmp_path / f"s{i}")]) == 0
    grids.append(np.asarray(Image.open(tmp_path / f"s{i}" / "grid.png")))
  capsys.readouterr()
  np.testing.assert_array_equal(grids[0], grids[1])


def test_textual_inversion_exports(model_dirs, tmp_path, capsys):
  wd = run_folder(tmp_path / "ti", model_dirs["sd1"], "textual_inversion")
  rows = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  save_file({"<my-toy>": rows}, str(wd / "learned_embeds.safetensors"), metadata={"format": "pt"})
  assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
  assert main(["export", str(wd), "--format", "a1111", "--out", str(tmp_path / "a")]) == 0
  d, a = capsys.readouterr().out.split()
  np.testing.assert_array_equal(load_file(d)["<my-toy>"], rows)
  assert a.endswith("my-toy.safetensors")
  np.testing.assert_array_equal(ef.read_embedding_file(a)["my-toy"], rows)


def test_dreambooth_exports_a_diffusers_folder(model_dirs, pipes, tmp_path, capsys):
  wd = run_folder(tmp_path / "db", model_dirs["sd1"], "dreambooth")
  shutil.copytree(model_dirs["sd1"], wd / "model")
  out = tmp_path / "out"
  assert main(["export", str(wd), "--format", "diffusers", "--out", str(out)]) == 0
  assert capsys.readouterr().out.split() == [str(out)]
  keys = load_file(out / "text_encoder" / "model.safetensors")
  assert all(k.startswith("text_model.") for k in keys)          # transformers 4.x and 5.x load it
  assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
  got = tree.flatten(load_pipeline(out).params)
  for k, v in tree.flatten(pipes["sd1"].params).items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))
  require_torch()
  from diffusers import StableDiffusionPipeline
  loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)     # diffusers' loader
  np.testing.assert_array_equal(loaded.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0),
                                np.asarray(got["unet/conv_in/kernel"]))


def test_a_format_the_method_lacks_is_an_error(lora_run, tmp_path, capsys):
  wd, _ = lora_run
  assert main(["export", str(wd), "--format", "single-file", "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert "a lora run exports as diffusers, kohya, a1111" in err
  assert main(["export", str(tmp_path), "--format", "kohya", "--out", str(tmp_path / "y")]) == 2
  assert "no config.json" in capsys.readouterr().err
  # Another method's export option; a run that has not finished (config.json, no result yet).
  assert main(["export", str(wd), "--format", "kohya", "--timestep", "3",
               "--out", str(tmp_path / "z")]) == 2
  assert "--timestep: not an export option of a lora run" in capsys.readouterr().err
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(wd / "config.json", unfinished / "config.json")
  assert main(["export", str(unfinished), "--format", "kohya", "--out", str(tmp_path / "u")]) == 2
  assert "no lora.safetensors; the run has not finished" in capsys.readouterr().err
  assert not (tmp_path / "u").exists()


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory, model_dirs, pipes):
  """A Custom Diffusion run folder: attn2 K/V moved off the base and one modifier token."""
  import re
  from persona_jax.methods import custom_diffusion as cd
  pipe = pipes["sd1"]
  rng = np.random.default_rng(2)
  flat = {p: np.asarray(v) + rng.normal(0, 0.2, v.shape).astype(np.float32)
          for p, v in tree.flatten(pipe.params).items() if re.fullmatch(r"unet/.*/attn2/to_(k|v)/kernel", p)}
  flat["tokens"] = rng.normal(0, 0.5, (1, 32)).astype(np.float32)
  wd = run_folder(tmp_path_factory.mktemp("cd") / "cd", model_dirs["sd1"], "custom_diffusion")
  save_file(flat, str(wd / cd.RESULT_FILE), metadata={
      "format": cd.FORMAT, "base_model": str(model_dirs["sd1"]),
      "concepts": json.dumps([{"token": "<new1>", "prompt": "a photo of a <new1> ball"}])})
  return wd


def _cd_outputs_ours(pipe, wd):
  from persona_jax.methods import custom_diffusion as cd
  from persona_jax.models.components import SDModels
  from persona_jax.tokenizer import tokenize
  params, tokenizer, conditioning = cd.with_result(cd.load_result(wd), pipe)
  ids = tokenize(tokenizer, ["a photo of a <new1> ball"])
  ctx = conditioning.encode(SDModels(pipe.unet, pipe.text_encoder, pipe.vae), params, ids)
  x = np.random.default_rng(3).standard_normal((1, 16, 16, 4)).astype(np.float32)
  eps = pipe.unet.apply({"params": params["unet"]}, x, np.array([500]), ctx)
  return x, np.asarray(ctx), nchw(np.asarray(eps))


def _cd_outputs_diffusers(pipe_t, x):
  import torch
  ids = pipe_t.tokenizer(["a photo of a <new1> ball"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
  with torch.no_grad():
    ctx = pipe_t.text_encoder(ids)[0]
    eps = pipe_t.unet(torch.from_numpy(nchw(x)), torch.tensor([500]), ctx).sample
  return ctx.numpy(), eps.numpy()


@pytest.mark.parametrize("load", ["safetensors", "bin", "merged"])
def test_custom_diffusion_exports_load_in_diffusers(cd_run, model_dirs, pipes, tmp_path, capsys, load):
  require_torch()
  from diffusers import StableDiffusionPipeline
  from diffusers.models.attention_processor import AttnProcessor2_0
  from safetensors.torch import load_file as load_torch
  out = tmp_path / "out"
  fmt = "merged" if load == "merged" else "diffusers"
  assert main(["export", str(cd_run), "--format", fmt, "--out", str(out)]) == 0
  capsys.readouterr()
  x, ctx_ours, eps_ours = _cd_outputs_ours(pipes["sd1"], cd_run)
  if load == "merged":
    pipe_t = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipe_t.load_textual_inversion(out / "tokens", weight_name="<new1>.safetensors")
  else:
    pipe_t = StableDiffusionPipeline.from_pretrained(model_dirs["sd1"], safety_checker=None)
    if load == "bin":
      pipe_t.unet.load_attn_procs(out, weight_name="pytorch_custom_diffusion_weights.bin",
                                  _pipeline=pipe_t)
    else:            # the documented workaround for diffusers' own .safetensors loader
      procs = pipe_t.unet._process_custom_diffusion(
          load_torch(out / "pytorch_custom_diffusion_weights.safetensors"))
      pipe_t.unet.set_attn_processor({n: procs.get(n, AttnProcessor2_0())
                                      for n in pipe_t.unet.attn_processors})
    assert "CustomDiffusion" in type(pipe_t.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                                     .attn2.processor).__name__
    pipe_t.load_textual_inversion(out, weight_name="<new1>.safetensors")
  ctx, eps = _cd_outputs_diffusers(pipe_t, x)
  np.testing.assert_allclose(ctx_ours, ctx, atol=1e-4, rtol=1e-3)
  np.testing.assert_allclose(eps_ours, eps, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["lora-ours", "embedding", "custom-diffusion"])
def test_verify_compares_an_adapter_with_diffusers(lora_run, cd_run, model_dirs, tmp_path, capsys, kind):
  require_torch()
  wd, _ = lora_run
  if kind == "lora-ours":
    flag = ["--lora", str(wd / "lora.safetensors")]
  elif kind == "embedding":
    rows = np.random.default_rng(1).normal(0, 0.5, (2, 32)).astype(np.float32)
    save_file({"emb_params": rows}, str(tmp_path / "trigger.safetensors"))
    flag = ["--embedding", f"{tmp_path / 'trigger.safetensors'}:<trig>"]
  else:
    flag = ["--custom-diffusion", str(cd_run)]
  assert main(["verify", str(model_dirs["sd1"]), *flag]) == 0, capsys.readouterr().out
  out = capsys.readouterr().out
  assert "adapter: unet" in out and "adapter moved diffusers' unet by" in out and "PASS" in out
  if kind == "embedding":                                 # beyond the tolerance: exit 1
    assert main(["verify", str(model_dirs["sd1"]), *flag, "--tolerance", "0"]) == 1
    capsys.readouterr()


def test_dreambooth_single_file_export_samples_like_the_folder(model_dirs, tmp_path, capsys):
  wd = run_folder(tmp_path / "db1", model_dirs["sd1"], "dreambooth")
  shutil.copytree(model_dirs["sd1"], wd / "model")
  assert main(["export", str(wd), "--format", "single-file", "--out", str(tmp_path / "o")]) == 0
  file = capsys.readouterr().out.split()[0]
  assert file.endswith("db1.safetensors")
  grids = []
  for i, model in enumerate((["--model", str(wd / "model")],
                             ["--model", file, "--config", str(model_dirs["sd1"])])):
    assert main(["sample", *model, "--prompt", "a ball", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / f"s{i}")]) == 0
    grids.append(np.asarray(Image.open(tmp_path / f"s{i}" / "grid.png")))
  np.testing.assert_array_equal(grids[0], grids[1])
  # SD 2.x: a base from a diffusers folder lacks the file's extra text-encoder layer.
  wd2 = run_folder(tmp_path / "db2", model_dirs["sd2"], "dreambooth")
  shutil.copytree(model_dirs["sd2"], wd2 / "model")
  capsys.readouterr()
  assert main(["export", str(wd2), "--format", "single-file", "--out", str(tmp_path / "o2")]) == 2
  assert "--base-single-file" in capsys.readouterr().err


def test_train_from_a_single_file(model_dirs, pipes, tmp_path):
  """`--config.model=FILE.safetensors --config.model_config=DIR`: a run builds on an original
  single file, and without a config folder or prediction type says what to pass."""
  from persona_jax.convert.single_file import save_single_file
  from persona_jax.errors import ConfigError
  from persona_jax.train import loop
  from tests.runs import one_device_mesh, ti_config
  file = save_single_file(pipes["sd1"], tmp_path / "sd1.safetensors")
  with pytest.raises(ConfigError, match="prediction"):
    loop.build(ti_config(file), mesh=one_device_mesh())
  run = loop.build(ti_config(file, model_config=str(model_dirs["sd1"])), mesh=one_device_mesh())
  for k, v in tree.flatten(pipes["sd1"].params).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(run.pipe.params)[k]), np.asarray(v))
  assert run.model_dir == file and len(run.fingerprint) == 16


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, model_dirs):
  wd = run_folder(tmp_path_factory.mktemp("runs") / "ti", model_dirs["sd1"], "textual_inversion")
  rows = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  save_file({"<my-toy>": rows}, str(wd / "learned_embeds.safetensors"), metadata={"format": "pt"})
  return wd


@pytest.fixture(scope="module")
def db_run(tmp_path_factory, model_dirs):
  wd = run_folder(tmp_path_factory.mktemp("runs") / "db", model_dirs["sd1"], "dreambooth")
  shutil.copytree(model_dirs["sd2"], wd / "model")          # a "trained" model: another one
  return wd


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth", "lora", "custom_diffusion"])
def test_sample_run_equals_the_methods_own_flags(method, ti_run, db_run, lora_run, cd_run,
                                                 model_dirs, tmp_path, capsys):
  """`sample --run WORKDIR` samples each run as the file flags do: an embedding (--embedding),
  a model folder (--model), a LoRA (--lora), Custom Diffusion (--custom-diffusion)."""
  sd1 = ["--model", str(model_dirs["sd1"])]
  wd, flags, prompt = {
      "textual_inversion": (ti_run, sd1 + ["--embedding", str(ti_run / "learned_embeds.safetensors")],
                            "a photo of <my-toy>"),
      "dreambooth": (db_run, ["--model", str(db_run / "model")], "a photo of a ball"),
      "lora": (lora_run[0], sd1 + ["--lora", str(lora_run[0] / "lora.safetensors")], "a ball"),
      "custom_diffusion": (cd_run, sd1 + ["--custom-diffusion", str(cd_run)],
                           "a photo of a <new1> ball"),
  }[method]
  # These test files record no base model (a run's do): name it.
  run = ["--run", str(wd)] + (sd1 if method in ("lora", "textual_inversion") else [])
  grids = []
  for i, given in enumerate((flags, run)):
    assert main(["sample", *given, "--prompt", prompt, "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / f"s{i}")]) == 0
    grids.append(np.asarray(Image.open(tmp_path / f"s{i}" / "grid.png")))
  capsys.readouterr()
  np.testing.assert_array_equal(grids[0], grids[1])
  if method == "dreambooth":          # its result is a whole model: --model would be ignored
    assert main(["sample", "--run", str(wd), *sd1, "--prompt", "x", "--out",
                 str(tmp_path / "x")]) == 2
    assert "is its own base" in capsys.readouterr().err
