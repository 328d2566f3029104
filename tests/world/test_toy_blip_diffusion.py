"""The toy BLIP-Diffusion base (world/toy_blip_diffusion.py) and the stage-2 / fine-tuning
examples of the toy world (world/blip_diffusion_data.py, data/blip_diffusion.py).

The folder loads with the BLIP-Diffusion loaders and its own Q-Former tokenizer, transformers
reads its Q-Former config, its vision tower computes the toy CLIP image encoder's features, and
the Q-Former's query embeddings go into the context text encoder. The examples' subject input
keeps every pixel the object covers and replaces every pixel it does not touch; categories and
captions are as the recipe builds them (docs/blip_diffusion_training.md).
"""

import filecmp
import json

import jax
import numpy as np
import pytest

from persona_jax.convert.blip_diffusion_weights import load_context_text_encoder, load_qformer
from persona_jax.data.blip_diffusion import blip_caption, example_arrays, training_caption
from persona_jax.default_model import default_model_dir
from persona_jax.models.blip2 import Blip2QFormerModel
from persona_jax.models.context_clip import ContextCLIPTextModel
from persona_jax.qformer_tokenizer import check_vocab_size, load_qformer_tokenizer
from persona_jax.tokenizer import load_tokenizer
from persona_jax.world import blip_diffusion_data as toy_data
from persona_jax.world import scenes
from persona_jax.world.toy_blip_diffusion import CTX_BEGIN_POS, write_toy_blip_diffusion


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_toy_blip_diffusion(tmp_path_factory.mktemp("toy_blip") / "toy-blip-diffusion")


@pytest.fixture(scope="module")
def loaded(folder):
  config, params = load_qformer(folder / "qformer")
  text_config, text_params = load_context_text_encoder(folder / "text_encoder")
  return config, params, text_config, text_params


@pytest.fixture(scope="module")
def arrays(folder, loaded):
  config = loaded[0]
  index = json.loads((folder / "model_index.json").read_text())
  examples = toy_data.pretraining_examples(12, seed=3)
  return examples, example_arrays(
      examples, clip_tokenizer=load_tokenizer(folder / "tokenizer"),
      qformer_tokenizer=load_qformer_tokenizer(folder), mean=index["mean"], std=index["std"],
      num_query_tokens=config.num_query_tokens, category_length=6)


def test_the_folder_is_the_released_layout_on_the_toy_base(folder, loaded):
  from transformers import Blip2Config
  config, params, text_config, _ = loaded
  base = default_model_dir()
  index = json.loads((folder / "model_index.json").read_text())
  assert index["_class_name"] == "BlipDiffusionPipeline" and index["ctx_begin_pos"] == 2
  assert index["qformer"] == ["blip_diffusion", "Blip2QFormerModel"]
  assert index["text_encoder"] == ["blip_diffusion", "ContextCLIPTextModel"]
  processor = json.loads((folder / "image_processor" / "preprocessor_config.json").read_text())
  assert processor["image_processor_type"] == "BlipImageProcessor"
  assert processor["image_mean"] == index["mean"] and processor["image_std"] == index["std"]
  assert processor["size"] == {"height": 32, "width": 32}
  for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                    ("vae", "diffusion_pytorch_model.safetensors"), ("tokenizer", "vocab.json")):
    assert filecmp.cmp(folder / sub / name, base / sub / name, shallow=False), sub
  # The ProjLayer writes into the text encoder's embedding space.
  assert config.qformer_config.hidden_size == text_config.hidden_size == 64
  assert params["embeddings"]["word_embeddings"]["embedding"].shape[0] == 12
  tokenizer = load_qformer_tokenizer(folder)                         # the folder's, not the shipped
  check_vocab_size(tokenizer, 12, folder / "qformer")
  assert tokenizer("ball star")["input_ids"] == [2, 5, 8, 3]
  theirs = Blip2Config.from_pretrained(folder / "qformer")           # what verify's torch side reads
  assert theirs.num_query_tokens == config.num_query_tokens == 16
  assert theirs.qformer_config.hidden_size == 64 and theirs.qformer_config.vocab_size == 12
  assert theirs.vision_config.hidden_act == "quick_gelu" and theirs.vision_config.image_size == 32


@pytest.fixture(scope="module")
def encoded(loaded, arrays):
  """The Q-Former on the first two examples, and their captions through the context text
  encoder with its query embeddings at ctx_begin_pos (highest matmul precision)."""
  config, params, text_config, text_params = loaded
  _, a = arrays
  with jax.default_matmul_precision("highest"):
    out = jax.jit(Blip2QFormerModel(config).apply)(
        {"params": params}, a["blip_pixels"][:2], a["category_ids"][:2], a["category_mask"][:2])
    encode = jax.jit(ContextCLIPTextModel(text_config).apply, static_argnums=3)
    text = encode({"params": text_params}, a["ids"][:2], out.query_embeds, CTX_BEGIN_POS)
  return out, text.last_hidden_state, encode


def test_the_vision_tower_is_the_toy_image_encoder(arrays, encoded):
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.clip_vision import CLIPVisionModel
  _, a = arrays
  ours = encoded[0]
  clip_config, clip_params = load_image_encoder(default_model_dir() / "image_encoder")
  with jax.default_matmul_precision("highest"):
    clip = jax.jit(CLIPVisionModel(clip_config).apply)({"params": clip_params}, a["blip_pixels"][:2])
  # BLIP-2 applies CLIP's post_layernorm to every token; CLIP to the class token (pooled) only.
  last = np.asarray(clip.last_hidden_state, np.float64)
  norm = clip_params["vision_model"]["post_layernorm"]
  mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  want = (last - mu) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  np.testing.assert_allclose(ours.image_embeds, want, rtol=0, atol=2e-5)
  np.testing.assert_allclose(ours.image_embeds[:, 0], clip.pooler_output, rtol=0, atol=2e-5)


def test_examples_condition_the_context_text_encoder(loaded, arrays, encoded):
  _, _, text_config, text_params = loaded
  examples, a = arrays
  queries, text, encode = encoded
  n = len(examples)
  assert a["ids"].shape == (n, 77 - 16) and a["pixels"].shape == (n, 32, 32, 3)
  assert queries.query_embeds.shape == (2, 16, 64) and np.isfinite(queries.query_embeds).all()
  assert not np.allclose(queries.query_embeds[0], queries.query_embeds[1], atol=1e-4)
  assert text.shape == (2, 77, 64) and np.isfinite(text).all()
  with jax.default_matmul_precision("highest"):
    plain = ContextCLIPTextModel(text_config).apply({"params": text_params}, a["ids"][:2, :CTX_BEGIN_POS])
  # Causal: "<bos> a" before the context is the plain encoder's.
  np.testing.assert_allclose(text[:, :CTX_BEGIN_POS], plain.last_hidden_state, atol=1e-5)
  # The queries are what follows: other query embeddings, other outputs from position 2 on.
  with jax.default_matmul_precision("highest"):
    swapped = encode({"params": text_params}, a["ids"][:2], queries.query_embeds[::-1], CTX_BEGIN_POS)
  assert not np.allclose(swapped.last_hidden_state[0, CTX_BEGIN_POS:], text[0, CTX_BEGIN_POS:],
                         atol=1e-4)


def test_the_subject_input_replaces_the_background_only_where_the_object_is_absent(arrays):
  examples, _ = arrays
  replaced_colour = 0
  for k, example in enumerate(examples):
    scene = scenes.sample_scene(3, "train", k)
    cover = scenes.coverage(scene, 32)
    inside, outside = cover == 1.0, cover == 0.0
    assert inside.sum() > 20 and outside.sum() > 300
    assert np.array_equal(example.subject[inside], example.target[inside])
    background = toy_data.replacement_background(scene, 3, k)
    assert background not in (scene.background, scene.look.colour, scene.look.pattern_colour)
    if background in scenes.COLOURS:
      replaced_colour += 1
      assert (example.subject[outside] == scenes.COLOURS[background]).all()
    # The target's own background is gone wherever the object does not reach.
    assert (example.subject[outside] != example.target[outside]).any(-1).mean() > 0.9
    edge = (cover > 0) & (cover < 1)
    assert (example.subject[edge] != example.target[edge]).any()
  assert replaced_colour >= 3
  used = {toy_data.replacement_background(scenes.sample_scene(0, "train", k), 0, k) for k in range(300)}
  assert used == set(scenes.BACKGROUNDS)                       # every background, at random


def test_categories_and_captions_are_built_as_the_recipe_does(folder, arrays):
  examples, a = arrays
  clip = load_tokenizer(folder / "tokenizer")
  qformer = load_qformer_tokenizer(folder)
  context = {"", *toy_data.POSITION_PHRASES.values()}
  for k, example in enumerate(examples):
    scene = scenes.sample_scene(3, "train", k)
    assert example.category == scene.cls
    assert qformer.convert_ids_to_tokens(a["category_ids"][k][:3].tolist()) == ["[CLS]", scene.cls, "[SEP]"]
    assert a["category_mask"][k].tolist() == [1, 1, 1, 0, 0, 0]
    head = f"a {scene.cls}"
    assert example.caption.startswith(head)
    rest = example.caption[len(head):].strip()
    bg = scenes.background_phrase(scene.background)
    assert rest.removesuffix(bg).strip() in context
    ids = a["ids"][k]
    assert ids[0] == clip.bos_token_id and clip.decode(ids[1:2]) == "a"      # ctx goes after "a"
    assert clip.decode(ids, skip_special_tokens=True) == example.caption
  assert len({e.caption for e in examples}) > 3
  # The subject input as the Q-Former sees it: rescaled and normalized with the folder's mean/std.
  index = json.loads((folder / "model_index.json").read_text())
  back = a["blip_pixels"] * np.asarray(index["std"]) + np.asarray(index["mean"])
  np.testing.assert_allclose(back * 255, np.stack([e.subject for e in examples]), atol=1e-3)
  np.testing.assert_allclose((a["pixels"] + 1) * 127.5, np.stack([e.target for e in examples]), atol=1e-3)


def test_fine_tuning_examples_are_the_subject_images_captioned_with_their_class():
  subject = scenes.subjects()[0]
  examples = toy_data.subject_examples(subject, 3, seed=1)
  refs = scenes.subject_scenes(subject, 3, 1)
  for example, scene in zip(examples, refs):
    assert np.array_equal(example.subject, example.target)
    assert np.array_equal(example.target, scenes.render(scene, 32))
    assert example.caption == f"a {subject.cls}" and example.category == subject.cls
  assert blip_caption("A Teddy-Bear!!  (Running).") == "a teddy-bear running"
  assert training_caption("Dog", "on the beach.") == "a dog on the beach"
  assert len(blip_caption(" ".join(["w"] * 60)).split()) == 50


def test_the_folder_refuses_to_overwrite_and_names_a_missing_image_encoder(folder, tmp_path):
  from persona_jax.errors import ConfigError, ModelFileError
  with pytest.raises(ConfigError, match="exists and is not empty"):
    write_toy_blip_diffusion(folder)
  base = tmp_path / "base"
  for sub in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
    (base / sub).mkdir(parents=True)
  with pytest.raises(ModelFileError, match="image_encoder: not found"):
    write_toy_blip_diffusion(tmp_path / "out", base=base)
  assert not (tmp_path / "out").exists()
