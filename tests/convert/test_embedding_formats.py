"""Textual Inversion embedding files: our exports load in diffusers and encode prompts as we do;
every layout we read comes back as {token: float32 [N, D]}; bad files and tokens are named."""

import copy
import functools

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from persona_jax.convert import embedding_formats as ef
from persona_jax.errors import ConfigError, ModelFileError, PickleRefusedError
from persona_jax.text_to_image import SampleOptions, Sampling, text_to_image
from persona_jax.tokenizer import tokenize
from tests.torch_reference import require_torch

D = 32   # the random sd1 model's text width


def rows(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


@pytest.fixture(scope="module")
def diffusers_pipe(model_dirs):
  """diffusers' StableDiffusionPipeline (torch, float32) over the random sd1 folder."""
  require_torch()
  from diffusers import StableDiffusionPipeline
  from diffusers.utils import logging
  logging.disable_progress_bar()
  return StableDiffusionPipeline.from_pretrained(model_dirs["sd1"], safety_checker=None)


@pytest.fixture
def fresh(diffusers_pipe):
  """(tokenizer, text_encoder) copies for one test, so new ids start at the vocabulary size."""
  return copy.deepcopy(diffusers_pipe.tokenizer), copy.deepcopy(diffusers_pipe.text_encoder)


def diffusers_encode(pipe, tokenizer, text_encoder, prompt):
  """diffusers' prompt path: maybe_convert_prompt, pad to 77, the text encoder's last state."""
  import torch
  prompt = pipe.maybe_convert_prompt(prompt, tokenizer)
  ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return ids.numpy(), text_encoder(ids)[0].numpy()


def ours_encode(result, prompt):
  ids = tokenize(result.tokenizer, [result.expand_prompt(prompt)])
  te = result.pipe.text_encoder
  return ids, np.asarray(te.apply({"params": result.pipe.params["text_encoder"]}, ids).last_hidden_state)


def check_same_as_diffusers(diffusers_pipe, fresh, result, prompt, new_rows):
  """The loader grew diffusers' table by our rows; ids and last hidden states match ours."""
  tokenizer, text_encoder = fresh
  v = len(diffusers_pipe.tokenizer)
  assert len(tokenizer) == v + len(new_rows)
  table = text_encoder.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(table[v:], new_rows)
  assert tokenizer.convert_ids_to_tokens(list(range(v, v + len(new_rows)))) == list(
      result.tokenizer.convert_ids_to_tokens(list(range(v, v + len(new_rows)))))
  theirs_ids, theirs = diffusers_encode(diffusers_pipe, tokenizer, text_encoder, prompt)
  ours_ids, ours = ours_encode(result, prompt)
  np.testing.assert_array_equal(ours_ids, theirs_ids)
  assert set(range(v, v + len(new_rows))) <= set(ours_ids[0].tolist())
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# --- export -> diffusers' own loader ------------------------------------------------------------

def test_diffusers_file_multi_vector_loads_in_diffusers(diffusers_pipe, fresh, pipes, tmp_path):
  vectors = rows(2)
  path = ef.write_diffusers_embedding({"<cat-toy>": vectors}, tmp_path, {"base_model": "sd1"})
  assert path == tmp_path / "learned_embeds.safetensors"
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    assert f.metadata()["format"] == "pt" and f.metadata()["base_model"] == "sd1"
    assert list(f.keys()) == ["<cat-toy>"] and f.get_tensor("<cat-toy>").dtype == np.float32
  diffusers_pipe.load_textual_inversion(str(tmp_path), tokenizer=fresh[0], text_encoder=fresh[1])
  assert fresh[0].convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"]) == [49408, 49409]
  result = ef.with_embeddings(pipes["sd1"], ef.read_embedding_file(tmp_path))
  assert result.expand_prompt("a <cat-toy> toy") == "a <cat-toy> <cat-toy>_1 toy"
  check_same_as_diffusers(diffusers_pipe, fresh, result, "a photo of <cat-toy> on a table", vectors)


def test_a1111_file_loads_in_diffusers_with_its_trigger_word(diffusers_pipe, fresh, pipes, tmp_path):
  vectors = rows(1, seed=1)
  path = ef.write_a1111_embedding("<my/style>", vectors, tmp_path)
  assert path.name == "mystyle.safetensors"
  from safetensors.numpy import load_file
  assert list(load_file(path)) == ["emb_params"]
  diffusers_pipe.load_textual_inversion(str(path), token="mystyle", tokenizer=fresh[0],
                                        text_encoder=fresh[1])
  embeddings = ef.read_embedding_file(path, width=D)
  assert list(embeddings) == ["mystyle"]
  result = ef.with_embeddings(pipes["sd1"], embeddings)
  check_same_as_diffusers(diffusers_pipe, fresh, result, "a house in mystyle, detailed", vectors)


def test_custom_diffusion_token_file_loads_in_diffusers(diffusers_pipe, fresh, pipes, tmp_path):
  vector = rows(1, seed=2)[0]
  save_file({"<new1>": vector}, str(tmp_path / "<new1>.safetensors"))
  diffusers_pipe.load_textual_inversion(str(tmp_path), weight_name="<new1>.safetensors",
                                        tokenizer=fresh[0], text_encoder=fresh[1])
  result = ef.with_embeddings(pipes["sd1"], ef.read_embedding_file(tmp_path / "<new1>.safetensors"))
  check_same_as_diffusers(diffusers_pipe, fresh, result, "a <new1> cat", vector[None])


def test_diffusers_file_holds_one_token(tmp_path):
  with pytest.raises(ConfigError, match="exactly one token"):
    ef.write_diffusers_embedding({"<a>": rows(1), "<b>": rows(1)}, tmp_path)


def test_a1111_file_names():
  assert ef.a1111_file_name("<cat-toy>") == "cat-toy.safetensors"
  assert ef.a1111_file_name('a b:c?"d*|\\') == "abcd.safetensors"
  with pytest.raises(ConfigError, match="no characters usable"):
    ef.a1111_file_name("<>")


# --- sampling -----------------------------------------------------------------------------------

def test_text_to_image_samples_with_the_embedding(pipes):
  """A 2-vector token holding the rows of 'red' and 'ball' draws the image 'red ball' draws."""
  pipe = pipes["sd1"]
  table = np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
  red_ball = tokenize(pipe.tokenizer, ["red ball"])[0][1:3]
  result = ef.with_embeddings(pipe, {"<rb>": table[red_ball]})
  assert result.pipe.text_encoder_config.vocab_size == table.shape[0] + 2
  assert result.pipe.tokenizer is result.tokenizer
  options = SampleOptions(steps=2, batch_size=1)

  def draw(prompt):
    return text_to_image(result.pipe, prompt, options=options, progress=False,
                         sampling=Sampling(tokenizer=result.tokenizer,
                                           expand_prompt=result.expand_prompt))
  with_token = draw("a photo of <RB>")       # CLIP matches added tokens case-insensitively
  np.testing.assert_array_equal(with_token, draw("a photo of red ball"))
  assert not np.array_equal(with_token, draw("a photo of ball"))


def test_with_embeddings_refuses_vocabulary_tokens(pipes):
  with pytest.raises(ConfigError, match="'dog' is already a token"):
    ef.with_embeddings(pipes["sd1"], {"dog": rows(1)})
  with pytest.raises(ConfigError, match="embedding token 'Dog'.*'dog' is already a token"):
    ef.with_embeddings(pipes["sd1"], {"Dog": rows(1)})
  with pytest.raises(ConfigError, match="repeat"):
    ef.with_embeddings(pipes["sd1"], {"<a>": rows(2), "<A>_1": rows(1)})
  with pytest.raises(ConfigError, match="width 7, but this model's text encoder needs 32"):
    ef.with_embeddings(pipes["sd1"], {"<a>": np.zeros((1, 7), np.float32)})


# --- import -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,tensors,token,want_token,n", [
    ("learned_embeds.safetensors", {"<tok>": rows(3)}, None, "<tok>", 3),          # diffusers
    ("learned_embeds.safetensors", {"<tok>": rows(1)[0]}, None, "<tok>", 1),       # diffusers (D,)
    ("learned_embeds.safetensors", {"<tok>": rows(1)}, "<other>", "<other>", 1),   # token=
    ("my-style.safetensors", {"emb_params": rows(2)}, None, "my-style", 2),        # A1111/OneTrainer
    ("my-style.safetensors", {"emb_params": rows(2)}, "<s>", "<s>", 2),
    ("old.safetensors", {"string_to_param.*": rows(4),
                         "string_to_token.*": np.array([265], np.int64)}, None, "old", 4),
    ("<new1>.safetensors", {"<new1>": rows(1)[0]}, None, "<new1>", 1),             # Custom Diffusion
])
def test_read_layouts(tmp_path, name, tensors, token, want_token, n):
  path = tmp_path / name
  save_file(tensors, str(path))
  out = ef.read_embedding_file(path, token=token, width=D)
  assert list(out) == [want_token]
  value = out[want_token]
  assert value.dtype == np.float32 and value.shape == (n, D)
  source = next(v for k, v in tensors.items() if not k.startswith("string_to_token"))
  np.testing.assert_array_equal(value, source.reshape(n, D))


def test_read_half_precision_and_folder(tmp_path):
  half = rows(2).astype(ml_dtypes.bfloat16)
  ef.write_diffusers_embedding({"<h>": rows(2)}, tmp_path / "run")
  save_file({"<h>": half}, str(tmp_path / "bf16.safetensors"))
  out = ef.read_embedding_file(tmp_path / "bf16.safetensors")
  assert out["<h>"].dtype == np.float32
  np.testing.assert_array_equal(out["<h>"], half.astype(np.float32))
  np.testing.assert_array_equal(ef.read_embedding_file(tmp_path / "run")["<h>"], rows(2))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_read_refuses_pickles(tmp_path, suffix):
  path = tmp_path / f"style{suffix}"
  path.write_bytes(b"\x80\x04not read")
  with pytest.raises(PickleRefusedError, match=rf"style\{suffix}: a pickle file; persona_jax does "
                                               "not read pickles"):
    ef.read_embedding_file(path)


@pytest.mark.parametrize("tensors,match", [
    ({"lora_unet_down.lora_down.weight": rows(4), "lora_unet_down.lora_up.weight": rows(4)},
     "key 'lora_unet_down.lora_down.weight' fits no layout"),
    ({"string_to_param.*": rows(1), "step": np.array([3])}, "tensor step is int64, not floating point"),
    ({"<t>": np.zeros((1, 2, D), np.float32)}, r"key '<t>': expected a float \[D\] or \[N, D\] "
                                               r"tensor, got float32 \(1, 2, 32\)"),
    ({"<t>": np.zeros((1, D), np.int32)}, "tensor <t> is int32, not floating point"),
])
def test_read_names_the_key_that_fits_no_layout(tmp_path, tensors, match):
  path = tmp_path / "thing.safetensors"
  save_file(tensors, str(path))
  with pytest.raises(ModelFileError, match=match) as e:
    ef.read_embedding_file(path)
  assert str(path) in str(e.value)


def test_read_checks_the_width(tmp_path):
  path = tmp_path / "wide.safetensors"
  save_file({"emb_params": np.zeros((2, 1024), np.float32)}, str(path))
  with pytest.raises(ModelFileError, match=r"wide.safetensors: embedding width 1024, but this "
                                           "model's text encoder needs 768"):
    ef.read_embedding_file(path, width=768)


def test_read_missing_or_garbled_files(tmp_path):
  with pytest.raises(ModelFileError, match="embedding file not found"):
    ef.read_embedding_file(tmp_path / "nope.safetensors")
  with pytest.raises(ModelFileError, match="embedding file not found"):
    ef.read_embedding_file(tmp_path)            # a folder without learned_embeds.safetensors
  (tmp_path / "bad.safetensors").write_bytes(b"garbage")
  with pytest.raises(ModelFileError, match="bad.safetensors: cannot read safetensors"):
    ef.read_embedding_file(tmp_path / "bad.safetensors")


# --- SDXL: {"clip_l": [N, D1], "clip_g": [N, D2]} -------------------------------------------------

XL = (32, 48)   # the tiny sdxl model's text widths (text_encoder, text_encoder_2)


def xl_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in zip(("clip_l", "clip_g"), XL)}


def test_sdxl_file_round_trip_and_token_names(tmp_path):
  """Ours record the token; A1111's and the advanced script's take the file name or FILE:TOKEN."""
  from safetensors import safe_open
  emb = xl_rows(2)
  path = ef.write_sdxl_embedding(tmp_path / "x.safetensors", emb, {"base_model": "xl"}, token="<t>")
  with safe_open(str(path), "np") as f:
    assert sorted(f.keys()) == ["clip_g", "clip_l"]
    assert f.metadata()["tokens"] == '["<t>", "<t>_1"]' and f.metadata()["format"] == "pt"
  for token, kw, want in [(None, {}, "<t>"), ("<o>", {}, "<o>"), (None, dict(sdxl=True), "<t>")]:
    out = ef.read_embedding_file(path, token=token, width=XL, **kw)
    assert list(out) == [want]
    for k in emb:
      np.testing.assert_array_equal(out[want][k], emb[k])
  a1111 = ef.write_a1111_embedding("<my style>", emb, tmp_path)
  assert a1111.name == "mystyle.safetensors"
  assert list(ef.read_embedding_spec(str(a1111), width=XL, sdxl=True)) == ["mystyle"]
  save_file({k: v.astype(np.float16) for k, v in emb.items()}, str(tmp_path / "y_emb.safetensors"))
  out = ef.read_embedding_spec(f"{tmp_path / 'y_emb.safetensors'}:<s0>", width=XL[0])
  np.testing.assert_array_equal(out["<s0>"]["clip_g"], emb["clip_g"].astype(np.float16))
  with pytest.raises(ConfigError, match="exactly clip_l and clip_g"):
    ef.write_sdxl_embedding(tmp_path / "z.safetensors", {"clip_l": emb["clip_l"]})
  with pytest.raises(ConfigError, match="clip_l has 2 vectors and clip_g 1"):
    ef.write_sdxl_embedding(tmp_path / "z.safetensors", {**emb, "clip_g": emb["clip_g"][:1]})


@pytest.mark.parametrize("tensors,kw,match", [
    (xl_rows(1), dict(sdxl=False), "an SDXL embedding \\(keys clip_g, clip_l\\), but the model is "
                                   "SD 1.x/2.x .*use an SDXL base model"),
    ({"clip_l": rows(1)}, {}, "an SDXL embedding without 'clip_g'"),
    ({**xl_rows(1), "step": np.ones(1, np.float32)}, {}, "key 'step' does not belong to an SDXL"),
    ({**xl_rows(1), "clip_g": xl_rows(2)["clip_g"]}, {}, "clip_l holds 1 vectors and clip_g 2"),
    (xl_rows(1), dict(width=(32, 1280)),
     "clip_g width 48, but this model's text encoder needs 1280"),
])
def test_bad_sdxl_files_are_named(tmp_path, tensors, kw, match):
  path = tmp_path / "thing.safetensors"
  save_file(tensors, str(path))
  with pytest.raises(ModelFileError, match=match) as e:
    ef.read_embedding_file(path, **kw)
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_embeddings_of_the_other_family_are_refused(pipes, sdxl_pipe):
  with pytest.raises(ConfigError, match="embedding '<a>': an SDXL embedding .*the model is SD 1.x"):
    ef.with_embeddings(pipes["sd1"], {"<a>": xl_rows(1)})
  with pytest.raises(ConfigError, match="embedding '<a>': an SD 1.x/2.x embedding .*model is SDXL"):
    ef.with_embeddings(sdxl_pipe, {"<a>": rows(1)})
  with pytest.raises(ConfigError, match="clip_g width 32, but this model's text encoder 2 needs"):
    ef.with_embeddings(sdxl_pipe, {"<a>": {"clip_l": rows(1), "clip_g": rows(1)}})


def test_advanced_sdxl_script_file_reproduces_its_text_conditioning(sdxl_dir, sdxl_pipe, tmp_path):
  """diffusers' train_dreambooth_lora_sdxl_advanced.py at tiny size: TokenEmbeddingsHandler's
  initialize_new_tokens (<s0><s1> as special tokens, resize, random rows) and save_embeddings
  (clip_l / clip_g of the new ids, safetensors.torch.save_file). Read back as FILE:<s0>, the
  prompt `<s0>` (our 2-vector expansion) gives the script's own encoders' SDXL conditioning of
  `<s0><s1>`: both penultimate states and the pooled projection."""
  torch = require_torch()
  from safetensors.torch import save_file as torch_save_file
  from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

  from persona_jax.diffusion.conditioning import encode_sdxl_prompt
  tokenizers = [CLIPTokenizer.from_pretrained(sdxl_dir / t) for t in ("tokenizer", "tokenizer_2")]
  encoders = [CLIPTextModel.from_pretrained(sdxl_dir / "text_encoder"),
              CLIPTextModelWithProjection.from_pretrained(sdxl_dir / "text_encoder_2")]
  inserting_toks = ["<s0>", "<s1>"]

  def model(text_encoder):            # the script's `text_encoder.text_model if hasattr(...)`
    return text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
  torch.manual_seed(0)
  for tokenizer, text_encoder in zip(tokenizers, encoders):          # initialize_new_tokens
    tokenizer.add_special_tokens({"additional_special_tokens": inserting_toks})
    text_encoder.resize_token_embeddings(len(tokenizer))
    train_ids = tokenizer.convert_tokens_to_ids(inserting_toks)
    weight = model(text_encoder).embeddings.token_embedding.weight.data
    weight[train_ids] = torch.randn(len(train_ids), model(text_encoder).config.hidden_size) * (
        weight.std())
  tensors = {}                                                        # save_embeddings
  for idx, text_encoder in enumerate(encoders):
    weight = model(text_encoder).embeddings.token_embedding.weight.data
    assert weight.shape[0] == len(tokenizers[0]), "Tokenizers should be the same."
    tensors[{0: "clip_l", 1: "clip_g"}[idx]] = weight[train_ids]
  path = tmp_path / f"{tmp_path.name}_emb.safetensors"
  torch_save_file(tensors, str(path))

  embedding = ef.read_embedding_spec(f"{path}:<s0>", width=ef.text_widths(sdxl_pipe.params),
                                     sdxl=True)
  added = ef.with_embeddings(sdxl_pipe, embedding)
  prompt = "a photo of <s0> on a table"
  ids = [tokenize(t, [added.expand_prompt(prompt)]) for t in (added.tokenizer, added.tokenizer_2)]
  theirs_ids = [t(prompt.replace("<s0>", "<s0><s1>"), padding="max_length", max_length=77,
                  return_tensors="pt").input_ids for t in tokenizers]
  for ours, theirs in zip(ids, theirs_ids):
    np.testing.assert_array_equal(ours, theirs.numpy())
  assert {49408, 49409} <= set(ids[0][0].tolist())
  encode = jax.jit(functools.partial(encode_sdxl_prompt, added.pipe.models()))
  context, pooled = encode(added.pipe.params, *ids)
  with torch.no_grad():
    out_1 = encoders[0](theirs_ids[0], output_hidden_states=True)
    out_2 = encoders[1](theirs_ids[1], output_hidden_states=True)
  want = np.concatenate([out_1.hidden_states[-2].numpy(), out_2.hidden_states[-2].numpy()], -1)
  np.testing.assert_allclose(context, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(pooled, out_2.text_embeds.numpy(), atol=1e-5, rtol=1e-5)
