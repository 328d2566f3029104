"""SDXL's networks and folders against diffusers/transformers PyTorch on random weights.

The tiny SDXL pipeline (`make-random-model --preset sdxl`, a session fixture) has a first level
without attention, per-level heads and depths, linear projections, both text encoders (the
second with `text_projection` and "!" padding) and text_time added conditioning. A second UNet,
made by diffusers itself, has per-layer transformer depths (and reversed ones for the up path).
Both sides float32 on CPU at the highest matmul precision; reached about 1e-6, asserted 1e-5.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from persona_jax.errors import ModelFileError
from persona_jax.pipeline import load_pipeline, save_pipeline
from persona_jax.verify import compare, nchw
from tests.markers import slow
from tests.torch_reference import randomize_affine_, require_torch

TOL = 1e-5
PROMPTS = ["a photo of a dog", "a red ball on a blue background, studio light"]


@pytest.fixture(scope="module")
def torch_sdxl(sdxl_dir):
  require_torch()
  import torch
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True,
                                                   dtype=torch.float32)


def per_layer_unet_config(sdxl_pipe) -> dict:
  """The preset's UNet with per-layer transformer depths, down and (reversed) up."""
  raw = {k: v for k, v in sdxl_pipe.raw_configs["unet"].items() if not k.startswith("_")}
  return dict(raw, transformer_layers_per_block=[[1, 1], [2, 1]],
              reverse_transformer_layers_per_block=[[1, 2, 1], [1, 1, 1]])


def _unet_inputs(pipe, hw, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  c = pipe.unet_config
  pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
  x = rng.standard_normal((batch, *hw, 4)).astype(np.float32)
  ctx = rng.standard_normal((batch, 77, c.cross_attention_dims[0])).astype(np.float32)
  added = {"text_embeds": rng.standard_normal((batch, pooled)).astype(np.float32),
           "time_ids": np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 32, 0, 640, 384]],
                                np.float32)[:batch]}
  return x, np.array([3, 917])[:batch], ctx, added


def _torch_unet_output(unet, x, t, ctx, added):
  import torch
  with torch.no_grad():
    return unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()


@pytest.mark.parametrize("hw", [(16, 24), pytest.param((9, 7), marks=slow)])
def test_unet_with_added_conditioning_matches_diffusers(hw, sdxl_pipe, torch_sdxl):
  pipe = sdxl_pipe
  x, t, ctx, added = _unet_inputs(pipe, hw)
  want = _torch_unet_output(torch_sdxl.unet, x, t, ctx, added)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx, added_cond=added)
  assert compare("unet", nchw(got), want).max_rel < TOL
  # The added conditioning matters: other time ids move the output.
  other = dict(added, time_ids=added["time_ids"][::-1].copy())
  moved = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx, added_cond=other)
  assert np.abs(np.asarray(moved) - np.asarray(got)).max() > 1e-3


@slow      # the default suite's verify on a diffusers-written folder has this UNet too
def test_per_layer_transformer_depths_match_diffusers(sdxl_pipe, tmp_path):
  require_torch()
  from diffusers import UNet2DConditionModel
  from persona_jax.convert.diffusers import state_dict_to_params
  from persona_jax.models.components import abstract_params
  from persona_jax.models.configs import UNetConfig
  ref = UNet2DConditionModel(**per_layer_unet_config(sdxl_pipe)).eval()
  randomize_affine_(ref, seed=3)
  ref.save_pretrained(tmp_path)
  config = UNetConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
  assert config.down_transformer_layers == ((1, 1), (2, 1))
  assert config.up_transformer_layers == ((1, 2, 1), (1, 1, 1)) and config.mid_transformer_layers == 2
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = state_dict_to_params(state, abstract_params("unet", config), source="test")
  pipe = dataclasses.replace(sdxl_pipe, unet_config=config)
  x, t, ctx, added = _unet_inputs(pipe, (16, 24))
  with jax.default_matmul_precision("highest"):
    got = jax.jit(pipe.unet.apply)({"params": params}, x, t, ctx, added_cond=added)
  assert compare("unet", nchw(got), _torch_unet_output(ref, x, t, ctx, added)).max_rel < TOL


def test_added_conditioning_errors_are_one_line(sdxl_pipe):
  x, t, ctx, added = _unet_inputs(sdxl_pipe, (8, 8))
  apply = sdxl_pipe.unet.apply
  with pytest.raises(ValueError, match="needs added_cond\\['time_ids'\\]"):
    apply({"params": sdxl_pipe.params["unet"]}, x, t, ctx,
          added_cond={"text_embeds": added["text_embeds"]})
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    apply({"params": sdxl_pipe.params["unet"]}, x, t, ctx,
          added_cond=dict(added, text_embeds=added["text_embeds"][:, :5]))


def test_both_text_encoders_and_the_sdxl_text_path_match(sdxl_pipe, torch_sdxl):
  """Each encoder by ids (hidden states, pooled, projected) and by embeddings; then the whole
  prompt encoding (penultimate states concatenated, the second's projected pooled output, "!"
  padding of tokenizer_2) against StableDiffusionXLPipeline.encode_prompt, and zeroed negatives."""
  import torch
  from persona_jax.diffusion.conditioning import encode_sdxl_prompt, sdxl_state
  from persona_jax.tokenizer import tokenize
  pipe, ref = sdxl_pipe, torch_sdxl
  ids = tokenize(pipe.tokenizer, PROMPTS)
  ids_2 = tokenize(pipe.tokenizer_2, PROMPTS)
  assert ids[0, -1] == 49407 and ids_2[0, -1] == 0          # EOS padding vs "!" padding
  for name, tok_ids, torch_enc in (("text_encoder", ids, ref.text_encoder),
                                   ("text_encoder_2", ids_2, ref.text_encoder_2)):
    with torch.no_grad():
      want = torch_enc(torch.from_numpy(tok_ids).long(), output_hidden_states=True)
      tower = getattr(torch_enc, "text_model", torch_enc)     # WithProjection keeps text_model
      pooled = tower(torch.from_numpy(tok_ids).long()).pooler_output.numpy()
    model = getattr(pipe, name)
    with jax.default_matmul_precision("highest"):
      got = jax.jit(model.apply)({"params": pipe.params[name]}, tok_ids)
    assert compare("pooled", got.pooled, pooled).max_rel < TOL
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
      assert compare("hidden", a, b.numpy()).max_rel < TOL
    if name == "text_encoder_2":
      assert compare("projected", got.text_embeds, want.text_embeds.numpy()).max_rel < TOL
    else:
      assert got.text_embeds is None
    # By embeddings: a perturbed row at position 2 through a hook on the token embedding.
    table = np.asarray(pipe.params[name]["embeddings"]["token_embedding"]["embedding"])
    embeds = table[tok_ids].copy()
    embeds[:, 2] += np.random.default_rng(0).standard_normal(embeds[:, 2].shape).astype(np.float32)
    emb_module = tower.embeddings.token_embedding
    hook = emb_module.register_forward_hook(lambda mod, inp, out: torch.from_numpy(embeds))
    try:
      with torch.no_grad():
        want_e = torch_enc(torch.from_numpy(tok_ids).long()).last_hidden_state.numpy()
    finally:
      hook.remove()
    with jax.default_matmul_precision("highest"):
      got_e = model.apply({"params": pipe.params[name]}, tok_ids, embeds)
    assert compare("embeds", got_e.last_hidden_state, want_e).max_rel < TOL

  with torch.no_grad():
    want_ctx, want_neg, want_pooled, want_neg_pooled = ref.encode_prompt(
        PROMPTS, do_classifier_free_guidance=True)
  models, params = pipe.models(), pipe.params
  with jax.default_matmul_precision("highest"):
    ctx, pooled = jax.jit(lambda p, a, b: encode_sdxl_prompt(models, p, a, b))(params, ids, ids_2)
  assert ctx.shape == (2, 77, 80)
  assert compare("context", ctx, want_ctx.numpy()).max_rel < TOL
  assert compare("pooled", pooled, want_pooled.numpy()).max_rel < TOL
  # No negative prompt + force_zeros_for_empty_prompt: zeros, as diffusers.
  assert not want_neg.abs().max() and not want_neg_pooled.abs().max()
  inputs = {"ids": ids, "ids_2": ids_2, "negative_ids": ids, "negative_ids_2": ids_2,
            "time_ids": np.zeros((2, 6), np.float32), "negative_time_ids": np.ones((2, 6), np.float32),
            "negative_zero": np.array([True, False])}
  state = jax.jit(lambda p, i: sdxl_state(models, p, i))(params, inputs)
  assert not np.abs(np.asarray(state["negative"][0])).max()
  assert not np.abs(np.asarray(state["negative_pooled"][0])).max()
  np.testing.assert_array_equal(state["negative"][1], state["context"][1])


def test_sdxl_folder_round_trip_is_bit_exact_fp16_variant_and_shards(sdxl_dir, sdxl_pipe, tmp_path,
                                                                     torch_sdxl):
  from persona_jax.convert.files import read_safetensors
  out = save_pipeline(sdxl_pipe, tmp_path / "copy")
  for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
    stem = "model" if comp.startswith("text") else "diffusion_pytorch_model"
    a = read_safetensors(sdxl_dir / comp / f"{stem}.safetensors")
    b = read_safetensors(out / comp / f"{stem}.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert "text_projection.weight" in read_safetensors(out / "text_encoder_2" / "model.safetensors")
  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
  for name in ("tokenizer", "tokenizer_2"):
    assert (out / name / "vocab.json").read_bytes() == (sdxl_dir / name / "vocab.json").read_bytes()
  # diffusers' own fp16 variant and sharded weights (max_shard_size) load too.
  torch_sdxl.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True,
                             max_shard_size="200KB")
  assert list((tmp_path / "fp16" / "unet").glob("*.safetensors.index*.json"))
  half = load_pipeline(tmp_path / "fp16", variant="fp16")
  flat = lambda tree: jax.tree.leaves(tree)                             # noqa: E731
  for comp in ("unet", "text_encoder_2"):
    for a, b in zip(flat(half.params[comp]), flat(sdxl_pipe.params[comp]), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def _edit_index(folder, **changes):
  path = folder / "model_index.json"
  index = json.loads(path.read_text())
  index.update(changes)
  path.write_text(json.dumps(index))


def test_bad_sdxl_folders_are_one_line_errors(sdxl_dir, tmp_path):
  missing = shutil.copytree(sdxl_dir, tmp_path / "no_te2")
  _edit_index(missing, text_encoder_2=[None, None])
  with pytest.raises(ModelFileError, match=r"model_index.json: a StableDiffusionXLPipeline without "
                                           r"text_encoder_2") as e:
    load_pipeline(missing)
  assert "\n" not in str(e.value)
  gone = shutil.copytree(sdxl_dir, tmp_path / "no_te2_dir")
  shutil.rmtree(gone / "text_encoder_2")
  with pytest.raises(ModelFileError, match="text_encoder_2: folder missing"):
    load_pipeline(gone)
  refiner = shutil.copytree(sdxl_dir, tmp_path / "refiner")
  _edit_index(refiner, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
              tokenizer=[None, None], requires_aesthetics_score=True)
  with pytest.raises(ModelFileError, match="requires_aesthetics_score is true: an SDXL refiner"):
    load_pipeline(refiner)
  five = shutil.copytree(sdxl_dir, tmp_path / "five_ids")
  unet = json.loads((five / "unet" / "config.json").read_text())
  unet["projection_class_embeddings_input_dim"] -= unet["addition_time_embed_dim"]
  (five / "unet" / "config.json").write_text(json.dumps(unet))
  with pytest.raises(ModelFileError, match="means 5 time ids \\(the SDXL refiner's aesthetic"):
    load_pipeline(five)


def test_sd1_embedding_on_sdxl_is_a_one_line_error(sdxl_pipe, pipes, tmp_path):
  from persona_jax.convert.embedding_formats import read_embedding_spec
  from persona_jax.convert.files import write_safetensors
  from persona_jax.errors import PersonaError
  emb = tmp_path / "learned_embeds.safetensors"
  write_safetensors(emb, {"<cat>": np.ones((32,), np.float32)})
  with pytest.raises(PersonaError, match="learned_embeds.safetensors: an SD 1.x/2.x embedding "
                                        ".*SDXL.*use an SD 1.x/2.x base") as e:
    read_embedding_spec(str(emb), width=32, sdxl=sdxl_pipe.is_sdxl)
  assert "\n" not in str(e.value)


def test_sd1_lora_on_sdxl_is_a_one_line_error(sdxl_pipe, tmp_path):
  from persona_jax.convert.files import write_safetensors
  from persona_jax.errors import PersonaError
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  lora = tmp_path / "pytorch_lora_weights.safetensors"
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
  write_safetensors(lora, {key: np.ones((4, 32), np.float32),
                           key.replace("lora_A", "lora_B"): np.ones((32, 4), np.float32)})
  with pytest.raises(PersonaError, match="pytorch_lora_weights.safetensors: .*the model is SDXL: "
                                        "is this an SD 1.x/2.x LoRA") as e:
    with_loras(sdxl_pipe.params, [LoRASpec.parse(str(lora))], sdxl_pipe.unet_config)
  assert "\n" not in str(e.value)
