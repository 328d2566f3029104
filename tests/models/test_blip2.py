"""BLIP-Diffusion's networks against diffusers' deprecated classes run under the transformers 5
shim (persona_jax/blip_diffusion_torch.py): the BLIP-2 vision tower, the Q-Former's query
embeddings after the ProjLayer (as the pipeline uses them), and the context CLIP text encoder
with query embeddings at ctx_begin_pos; strict loading and its one-line errors.

Tiny models on random weights (norm weights and biases randomized too), saved by torch's
save_pretrained and read by our loaders: Q-Former 32 wide with 3 layers (cross-attention every
2nd), 4 heads, 4 query tokens; vision tower 24 wide, 2 layers, 28 px images in 14 px patches;
a BERT tokenizer on a 12-word vocab.txt (+ the model's [DEC]). float32 at the highest matmul
precision. Reached: about 3e-7 relative; asserted: 1e-5.
"""

import json

import jax
import numpy as np
import pytest

from persona_jax.convert import blip_diffusion_weights as weights
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.blip2 import Blip2QFormerModel
from persona_jax.models.context_clip import ContextCLIPTextModel
from persona_jax.verify import compare, nchw
from tests.torch_reference import randomize_affine_, require_torch

TOL = 1e-5
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "cat", "a", "red", "car", "##s",
         "teddy"]
SIZE = 28


@pytest.fixture(scope="module")
def qformer(tmp_path_factory):
  """(folder saved by diffusers' Blip2QFormerModel, the torch model) on a tiny BERT vocab."""
  torch = require_torch()
  from persona_jax import blip_diffusion_torch as shim
  root = tmp_path_factory.mktemp("blip2")
  (root / "tokenizer").mkdir()
  (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  torch.manual_seed(0)
  config = shim.tiny_blip2_config(vocab_size=len(VOCAB) + 1, qformer_layers=3,
                                  cross_attention_frequency=2, image_size=SIZE)
  model = shim.qformer_model(config, root / "tokenizer")
  randomize_affine_(model)
  with torch.no_grad():
    model.query_tokens.normal_()                  # zeros at init: make the queries distinct
  model.save_pretrained(root / "qformer")
  return root / "qformer", model


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
  """(folder saved by diffusers' ContextCLIPTextModel, the torch model): L = 16, D = 32."""
  torch = require_torch()
  from transformers import CLIPTextConfig

  from persona_jax import blip_diffusion_torch as shim
  torch.manual_seed(1)
  model = shim.context_text_encoder(CLIPTextConfig(
      vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16))
  randomize_affine_(model, seed=1)
  folder = tmp_path_factory.mktemp("ctx_clip") / "text_encoder"
  model.save_pretrained(folder)
  return folder, model


def _images(n: int, seed: int = 0):
  return np.random.default_rng(seed).standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)


def test_vision_tower_and_query_embeddings_match_diffusers(qformer):
  import torch

  from persona_jax import blip_diffusion_torch as shim
  folder, model = qformer
  config, params = weights.load_qformer(folder)
  assert config.num_query_tokens == 4 and config.qformer_config.encoder_hidden_size == 24
  assert "crossattention" in params["encoder"]["layer_2"]
  assert "crossattention" not in params["encoder"]["layer_1"]
  x = _images(2)
  categories = ["dog", "red teddy cats"]                    # different lengths: text padding
  tokens = model.tokenizer(categories, padding=True, return_tensors="np")
  assert tokens["attention_mask"].min() == 0
  pixels = torch.from_numpy(nchw(x))
  with torch.no_grad():
    vision = model.visual_encoder(pixels).last_hidden_state.numpy()
    full = model(image_input=pixels, text_input=categories, return_dict=True)
  want = shim.query_embeddings(model, pixels, categories).numpy()
  run = jax.jit(Blip2QFormerModel(config).apply)
  with jax.default_matmul_precision("highest"):
    got = run({"params": params}, x, tokens["input_ids"], tokens["attention_mask"])
    one = run({"params": params}, x[:1], tokens["input_ids"][:1, :3])      # the pipeline's B = 1
  assert got.image_embeds.shape == (2, 5, 24) and got.query_embeds.shape == (2, 4, 32)
  assert compare("vision", got.image_embeds, vision).max_rel < TOL
  assert compare("last", got.last_hidden_state, full.last_hidden_state.numpy()).max_rel < TOL
  assert compare("queries", got.query_embeds, want).max_rel < TOL
  want_one = shim.query_embeddings(model, pixels[:1], categories[:1]).numpy()
  assert compare("queries B=1", one.query_embeds, want_one).max_rel < TOL


def test_context_text_encoder_matches_diffusers(text_encoder):
  import torch
  folder, model = text_encoder
  config, params = weights.load_context_text_encoder(folder)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 60, (2, 12))                             # L - Q tokens
  ctx = rng.standard_normal((2, 4, 32)).astype(np.float32)
  full_ids = rng.integers(0, 60, (2, 16))                        # the negative prompt: L tokens
  with torch.no_grad():
    run = lambda **kw: model(**{k: torch.from_numpy(np.asarray(v)) if k != "ctx_begin_pos"
                                else v for k, v in kw.items()})[0].numpy()
    want_2 = run(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[2, 2])
    want_each = run(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[0, 12])
    want_plain = run(input_ids=full_ids)
  apply = jax.jit(ContextCLIPTextModel(config).apply)
  with jax.default_matmul_precision("highest"):
    got_2 = ContextCLIPTextModel(config).apply({"params": params}, ids, ctx, 2)
    got_each = apply({"params": params}, ids, ctx, np.array([0, 12]))       # traced positions
    got_plain = apply({"params": params}, full_ids)
  assert got_2.last_hidden_state.shape == (2, 16, 32)
  assert compare("ctx at 2", got_2.last_hidden_state, want_2).max_rel < TOL
  assert compare("ctx at 0, 12", got_each.last_hidden_state, want_each).max_rel < TOL
  assert compare("no ctx", got_plain.last_hidden_state, want_plain).max_rel < TOL
  with pytest.raises(ValueError, match="20 positions, more than max_position_embeddings 16"):
    ContextCLIPTextModel(config).apply({"params": params}, full_ids, ctx, 2)


def test_qformer_state_dict_round_trip(qformer):
  folder, model = qformer
  _, params = weights.load_qformer(folder)
  ours = weights.qformer_state_dict(params)
  theirs = {k: v.numpy() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
  assert set(ours) == set(theirs)
  assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def _copy(folder, dest, state=None, **config_changes):
  """`folder` at `dest` with config.json entries replaced (nested dicts merged) and, when given,
  other tensors."""
  from persona_jax.convert.files import read_safetensors, write_safetensors
  dest.mkdir()
  raw = json.loads((folder / "config.json").read_text())
  for key, value in config_changes.items():
    raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
  (dest / "config.json").write_text(json.dumps(raw))
  if state is None:
    (dest / "model.safetensors").symlink_to(folder / "model.safetensors")
  else:
    write_safetensors(dest / "model.safetensors", state(read_safetensors(folder / "model.safetensors")))
  return dest


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_strict_loading_errors_are_one_line(qformer, text_encoder, tmp_path):
  folder, _ = qformer
  key = "encoder.layer.1.output_query.dense.weight"
  cases = {
      "missing": (lambda s: {k: v for k, v in s.items() if k != key}, {},
                  ModelFileError, "1 weight(s) missing, e.g. 'encoder.layer_1.output_query"),
      "unexpected": (lambda s: {**s, "lm_head.weight": s[key]}, {},
                     ModelFileError, "1 unexpected tensor(s), e.g. 'lm_head.weight'"),
      "shape": (None, {"num_query_tokens": 8}, ModelFileError,
                "tensor 'query_tokens' has shape (1, 4, 32), the config needs (1, 8, 32)"),
      "relative": (None, {"qformer_config": {"position_embedding_type": "relative_key"}},
                   ConfigError, "qformer_config: config key 'position_embedding_type'"),
      "typo": (None, {"vision_config": {"patch_sise": 7}}, ConfigError,
               "vision_config: unknown config key 'patch_sise' = 7"),
      "model_type": (None, {"model_type": "blip"}, ConfigError, "model_type 'blip' where BLIP-2's"),
  }
  for name, (state, changes, error, match) in cases.items():
    with pytest.raises(error) as e:
      weights.load_qformer(_copy(folder, tmp_path / name, state, **changes))
    message = _one_line(e)
    assert match in message and str(tmp_path / name) in message, (name, message)
  with pytest.raises(ModelFileError, match="Q-Former folder not found"):
    weights.load_qformer(tmp_path / "nowhere")
  text_folder, _ = text_encoder
  with pytest.raises(ModelFileError) as e:
    weights.load_context_text_encoder(_copy(
        text_folder, tmp_path / "text", lambda s: {k: v for k, v in s.items()
                                                   if "final_layer_norm" not in k}))
  assert "2 weight(s) missing, e.g. 'final_layer_norm.bias'" in _one_line(e)
