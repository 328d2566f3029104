"""IP-Adapter on SDXL (the tiny `sdxl` preset: 12 attn2 layers, two per transformer, ids 1 .. 23):
the method bar (trainable leaves a literal list, scale 0 = the base exactly, frozen bit-identical,
lr 0 moves nothing, the loss falls), SDXL's text conditioning and added conditioning beside the
image tokens, and both official SDXL layouts (ip-adapter_sdxl: ImageProjModel over ViT-bigG's
image embeds; ip-adapter-plus_sdxl_vit-h: the Resampler over ViT-H's penultimate hidden states)
written by re-created official torch modules, loaded by diffusers' StableDiffusionXLPipeline
.load_ip_adapter and by persona_jax; our export loaded by diffusers. Tiny CLIP image encoders
stand in for ViT-bigG and ViT-H (gelu, as both)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.data.batch import CLIP_PIXELS, IDS, IDS_2, TIME_IDS
from persona_jax.data.pipeline import make_iterator
from persona_jax.diffusion.conditioning import TextConditioning
from persona_jax.methods import ip_adapter as ipa
from persona_jax.methods import ip_adapter_conditioning as ipc
from persona_jax.methods import ip_adapter_verify as ipv
from persona_jax.models.addons import DecoupledCrossAttention
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import (assert_training_bar, fixed_batch_trajectory, ip_config, one_device_mesh,
                        write_image_encoder)

# diffusers' attn_processors order (down, up, mid; by attention, then transformer block): the
# official ids 1, 3, 5, ... of the attn2 processors.
TRANSFORMERS = ([f"down_blocks_1/attentions_{a}/transformer_blocks_{b}" for a in (0, 1) for b in (0, 1)]
                + [f"up_blocks_0/attentions_{a}/transformer_blocks_{b}" for a in (0, 1, 2) for b in (0, 1)]
                + [f"mid_block/attentions_0/transformer_blocks_{b}" for b in (0, 1)])
IP_LAYERS = [f"unet/{t}/attn2/to_{m}_ip/kernel" for t in TRANSFORMERS for m in "kv"]
PROJECTION = ["ip_adapter/image_proj/proj/kernel", "ip_adapter/image_proj/proj/bias",
              "ip_adapter/image_proj/norm/scale", "ip_adapter/image_proj/norm/bias"]
CROSS = 80                                  # the tiny SDXL UNet's cross_attention_dim (32 + 48)
ENCODERS = {"bigG": dict(hidden_size=24, projection_dim=20),     # ViT-bigG: 1664, embeds 1280
            "vit-h": dict(hidden_size=64, projection_dim=12)}    # ViT-H: 1280, embeds 1024


def write_sdxl_image_encoder(folder, hidden_size, projection_dim):
  """A tiny CLIPVisionModelWithProjection folder (gelu, 2 layers, 16px, patch 8)."""
  return write_image_encoder(folder, seed=3, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, projection_dim=projection_dim,
                             num_hidden_layers=2, hidden_act="gelu")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl_image_encoders")
  return {name: write_sdxl_image_encoder(root / name, **dims) for name, dims in ENCODERS.items()}


@pytest.fixture(scope="module")
def run(sdxl_dir, encoders):
  return loop.build(ip_config(sdxl_dir, encoders["bigG"]), mesh=one_device_mesh())


def test_trainable_set_is_literal(run):
  """Only the projection and every attn2's to_k_ip/to_v_ip (copies of to_k/to_v) train; both
  text encoders are frozen and read in the step (the image tokens are not cacheable)."""
  assert set(tree.paths(run.trainable)) == set(PROJECTION + IP_LAYERS)
  assert set(run.frozen) == {"unet", "text_encoder", "text_encoder_2", "image_encoder"}
  assert run.method.unet == (DecoupledCrossAttention(),)
  assert run.method.conditioning.sdxl
  flat, base = tree.flatten(run.trainable), tree.flatten(run.pipe.params)
  for path in IP_LAYERS:
    np.testing.assert_array_equal(flat[path], base["unet/" + path[5:].replace("_ip/", "/")])
  assert flat[PROJECTION[0]].shape == (20, 4 * CROSS)       # bigG's image embeds -> 4 tokens of D


def test_conditioning_is_sdxls_text_plus_the_image_tokens(run):
  """The conditioning's state and UNet kwargs: TextConditioning's (SDXL's context [B, L, 80],
  pooled, time ids as added_cond) beside the image tokens; ip_drop 2 (the text) gives both
  tokenizers' ids the empty caption's and keeps the image."""
  params = run.method.params.apply(run.frozen, run.trainable)
  cond, m = run.method.conditioning, run.models
  batch = jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))
  inputs = {k: batch[k] for k in (IDS, IDS_2, TIME_IDS, CLIP_PIXELS)}
  dropped = cond.drop_captions(inputs, jnp.asarray([True, False]))
  for key, empty in ((IDS, cond.empty_ids), (IDS_2, cond.empty_ids_2)):
    np.testing.assert_array_equal(dropped[key][0], empty)
    np.testing.assert_array_equal(dropped[key][1], inputs[key][1])
    assert not np.array_equal(inputs[key][0], empty)
  assert cond.empty_ids_2[2] == 0 and cond.empty_ids[2] == cond.empty_ids[1]   # "!" / EOS padding

  @jax.jit
  def go(params, inputs):
    state = cond.prepare(m, params, {**inputs, ipc.DROP: jnp.asarray([2, 0], jnp.int32)})
    kwargs, _ = cond.at(m, params, state, None, None, None)
    kept = cond.prepare(m, params, inputs)["tokens"]
    return state, kwargs, kept, TextConditioning().prepare(m, params, dropped)
  state, kwargs, kept, text = jax.device_get(go(params, inputs))
  for key in ("context", "pooled", "time_ids"):
    np.testing.assert_array_equal(state[key], text[key])
  assert state["context"].shape == (2, 77, CROSS)
  np.testing.assert_array_equal(kwargs["encoder_hidden_states"], text["context"])
  np.testing.assert_array_equal(kwargs["added_cond"]["text_embeds"], text["pooled"])
  np.testing.assert_array_equal(kwargs["added_cond"]["time_ids"], text["time_ids"])
  assert kwargs["streams"]["ip_tokens"].shape == (2, 4, CROSS)
  np.testing.assert_array_equal(kwargs["streams"]["ip_tokens"], kept)


def test_training_bar(run):
  """Every trainable leaf moves, frozen params are bit-identical, the loss falls on a fixed
  batch, lr 0 moves nothing."""
  trajectory = fixed_batch_trajectory(run, steps=3)
  assert_training_bar(run, trajectory)


def test_plus_on_sdxl_follows_ipadapterplusxl(run, encoders):
  """kind=plus on SDXL: the resampler as wide as the image encoder (IPAdapterPlusXL's 1280 for
  ViT-H), width // 64 heads, 16 queries, output D."""
  from persona_jax.methods.registry import make_method
  method = make_method("ip_adapter", dict(run.config.method_options, kind="plus",
                                          image_encoder=str(encoders["vit-h"])),
                       run.pipe.params, run.pipe.tokenizer_dir, run.pipe.unet_config)
  p = method.conditioning.projection
  assert (p.kind, p.num_tokens, p.image_dim, p.hidden_dim, p.heads, p.depth,
          p.cross_attention_dim) == ("plus", 16, 64, 64, 1, 4, CROSS)
  assert method.conditioning.empty_ids_2[2] == 0          # tokenizer_2 pads with "!"


# ---------------------------------------------------------------------------------------------
# The official layouts, written as the official code writes them.


def official_modules(kind, unet, encoder_config):
  """The official torch modules at tiny size (ip_adapter/ip_adapter.py IPAdapterXL /
  IPAdapterPlusXL, resampler.py; tutorial_train_sdxl.py), by their parameter names: the image
  projection, and `torch.nn.ModuleList(unet.attn_processors.values())` whose attn2 processors
  hold to_k_ip / to_v_ip."""
  import torch
  from torch import nn
  cross, hidden = unet.config.cross_attention_dim, encoder_config["hidden_size"]

  class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens):
      super().__init__()
      self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
      self.norm = nn.LayerNorm(cross_attention_dim)

  class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
      super().__init__()
      inner = dim_head * heads
      self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
      self.to_q = nn.Linear(dim, inner, bias=False)
      self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
      self.to_out = nn.Linear(inner, dim, bias=False)

  class Resampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim,
                 ff_mult):
      super().__init__()
      self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
      self.proj_in = nn.Linear(embedding_dim, dim)
      self.proj_out = nn.Linear(dim, output_dim)
      self.norm_out = nn.LayerNorm(output_dim)
      ff = lambda: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False),
                                 nn.GELU(), nn.Linear(dim * ff_mult, dim, bias=False))
      self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, dim_head, heads), ff()])
                                   for _ in range(depth)])

  class AttnProcessor(nn.Module):
    pass

  class IPAttnProcessor(nn.Module):
    def __init__(self, hidden_size, cross_attention_dim):
      super().__init__()
      self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
      self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

  if kind == "basic":       # IPAdapterXL: 4 tokens of the projected image embedding
    proj = ImageProjModel(cross, encoder_config["projection_dim"], 4)
  else:                     # IPAdapterPlusXL: dim 1280 (= ViT-H's width), 20 heads of 64
    proj = Resampler(dim=hidden, depth=4, dim_head=64, heads=hidden // 64, num_queries=16,
                     embedding_dim=hidden, output_dim=cross, ff_mult=4)
  procs, channels = {}, unet.config.block_out_channels
  for name in unet.attn_processors.keys():
    if name.startswith("mid_block"):
      hidden_size = channels[-1]
    elif name.startswith("up_blocks"):
      hidden_size = list(reversed(channels))[int(name[len("up_blocks.")])]
    else:
      hidden_size = channels[int(name[len("down_blocks.")])]
    procs[name] = (AttnProcessor() if name.endswith("attn1.processor")
                   else IPAttnProcessor(hidden_size, cross))
  return proj, nn.ModuleList(procs[name] for name in unet.attn_processors.keys())


def write_official(path, kind, unet, encoder_config, seed=0):
  """Random weights (norms and biases too) in the official file layout (safetensors)."""
  import torch
  from safetensors.torch import save_file

  from tests.torch_reference import randomize_affine_
  torch.manual_seed(seed)
  proj, layers = official_modules(kind, unet, encoder_config)
  randomize_affine_(proj, seed)
  with torch.no_grad():
    for p in layers.parameters():
      p.normal_(0, 0.2)
  state = {**{f"image_proj.{k}": v for k, v in proj.state_dict().items()},
           **{f"ip_adapter.{k}": v for k, v in layers.state_dict().items()}}
  save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  return path


@pytest.fixture(scope="module")
def torch_unet(sdxl_dir):
  """diffusers' UNet of the tiny SDXL folder (its attn_processors name the official layers)."""
  from tests.torch_reference import require_torch
  require_torch()
  from diffusers import UNet2DConditionModel
  return UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet", local_files_only=True)


def check_against_diffusers(sdxl_pipe, sdxl_dir, file, encoder_dir, kind):
  """diffusers' StableDiffusionXLPipeline.load_ip_adapter and ours: features, tokens and the UNet
  output (with SDXL's added conditioning) within 1e-4, and the file moved diffusers' UNet."""
  results = ipv.compare_ip_adapter(sdxl_pipe, sdxl_dir, file, encoder_dir, scale=0.6)
  assert [r.name for r in results][:3] == [f"ip_adapter({kind}).image_features",
                                           f"ip_adapter({kind}).image_proj tokens",
                                           f"ip_adapter({kind}).unet (scale 0.6)"]
  for r in results[:3]:
    assert r.ok(1e-4), r
  assert results[-1].max_rel > 1e-3
  return results


LAYOUTS = {"basic": ("ip-adapter_sdxl", "bigG"), "plus": ("ip-adapter-plus_sdxl_vit-h", "vit-h")}


@pytest.fixture(scope="module")
def official_files(torch_unet, tmp_path_factory):
  """{kind: a random file of that official SDXL layout, written by the official modules}."""
  root = tmp_path_factory.mktemp("official_sdxl")
  return {kind: write_official(root / f"{name}.safetensors", kind, torch_unet, ENCODERS[encoder],
                               seed=len(kind))
          for kind, (name, encoder) in LAYOUTS.items()}


@pytest.mark.parametrize("kind", ["basic", pytest.param("plus", marks=slow)])
def test_official_sdxl_file_loads_in_diffusers_and_ours(sdxl_pipe, sdxl_dir, encoders,
                                                        official_files, kind):
  """ip-adapter_sdxl (basic, bigG) and ip-adapter-plus_sdxl_vit-h (plus, ViT-H): ids 1 .. 23 map
  onto our attn2 layers in diffusers' order; the UNet outputs match diffusers'. Slow for plus:
  the official resampler loads against diffusers on SD 1.x by default (test_ip_adapter.py), and
  its SDXL widths are test_plus_on_sdxl_follows_ipadapterplusxl's."""
  file = official_files[kind]
  state = ipa.read_official(file)
  assert sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")}) == list(
      range(1, 24, 2))
  config, trainable = ipa.from_official(state, sdxl_pipe.params["unet"], CROSS, "test")
  assert config.kind == kind and set(tree.flatten(trainable)) >= set(IP_LAYERS)
  if kind == "plus":
    assert (config.num_tokens, config.depth, config.heads, config.hidden_dim,
            config.image_dim) == (16, 4, 1, 64, 64)
  check_against_diffusers(sdxl_pipe, sdxl_dir, file, encoders[LAYOUTS[kind][1]], kind)


def test_scale_zero_is_the_base_exactly(sdxl_pipe, encoders, official_files):
  """The official file's adapter (random to_k_ip/to_v_ip and projection) at ip_scale 0 gives the
  base SDXL UNet's output bit for bit, at 1 it does not (verify's program: no new compilation)."""
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.unet import UNet2DConditionModel
  config, trainable = ipa.from_official(ipa.read_official(official_files["basic"]),
                                        sdxl_pipe.params["unet"], CROSS, "test")
  clip_config, clip_params = load_image_encoder(encoders["bigG"])
  c, rng = sdxl_pipe.unet_config, np.random.default_rng(0)
  pixels = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
  t, ctx = np.array([500, 80]), rng.standard_normal((2, 7, CROSS)).astype(np.float32)
  added = ipv.random_added_cond(c, rng, 2)
  program = ipv.adapter_program(c, clip_config, config)
  params = tree.merge({"unet": sdxl_pipe.params["unet"]}, trainable)
  with jax.default_matmul_precision("highest"):
    off, on = (jax.device_get(program(params, clip_params, pixels, latents, t, ctx, added,
                                      jnp.float32(s))[2]) for s in (0.0, 1.0))
    base = jax.device_get(jax.jit(UNet2DConditionModel(c).apply)(
        {"params": sdxl_pipe.params["unet"]}, latents, t, ctx, added_cond=added))
  np.testing.assert_array_equal(off, base)
  assert np.abs(on - base).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Our result, exported, in diffusers.


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """(result file, trained leaves): a stand-in for a trained state (every leaf moved)."""
  rng = np.random.default_rng(1)
  trained = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                         jax.device_get(run.trainable))
  (file,) = loop.write_outputs(run, trained, tmp_path_factory.mktemp("ip_xl_run"))
  return file, trained


def test_our_sdxl_file_is_the_official_layout(run, exported, official_files):
  """The result holds the official file's keys and shapes (ids 1 .. 23 in diffusers' order, the
  layout diffusers loads above) and reads back as the trained leaves, bit for bit. (diffusers
  loading it and reproducing our outputs: the slow command test's `verify --ip-adapter`.)"""
  file, trained = exported
  state, official = ipa.read_official(file), ipa.read_official(official_files["basic"])
  assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in official.items()}
  for i, block in enumerate(TRANSFORMERS):
    np.testing.assert_array_equal(state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"],
                                  tree.flatten(trained)[f"unet/{block}/attn2/to_v_ip/kernel"].T)
  _, back = ipa.from_official(state, run.pipe.params["unet"], CROSS, "test")
  for path, value in tree.flatten(trained).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), value, err_msg=path)


@slow
def test_export_sample_and_verify_commands_on_sdxl(run, sdxl_dir, encoders, exported, tmp_path,
                                                   capsys):
  """`export --format diffusers` (the file and image_encoder/, which SDXL's load_ip_adapter
  reads with image_encoder_folder), `sample --ip-adapter` on the SDXL base, and `verify
  --ip-adapter` of our file: StableDiffusionXLPipeline.load_ip_adapter reproduces our features,
  tokens, UNet output and 3 DDIM steps with guidance."""
  import shutil

  import torch
  from diffusers import StableDiffusionXLPipeline
  from PIL import Image

  from persona_jax.train.loop import _write_config
  file, _ = exported
  workdir = tmp_path / "run"
  workdir.mkdir()
  _write_config(workdir, run.config)
  shutil.copyfile(file, workdir / ipa.RESULT_FILE)
  out = tmp_path / "exported"
  assert main(["export", str(workdir), "--format", "diffusers", "--out", str(out)]) == 0
  pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True,
                                                   dtype=torch.float32)
  pipe.load_ip_adapter(str(out), subfolder="", weight_name=ipa.RESULT_FILE,
                       image_encoder_folder="image_encoder")
  assert pipe.image_encoder.config.projection_dim == ENCODERS["bigG"]["projection_dim"]

  images = sorted(loop.data.example_subject_dir().glob("*.png"))[:1]
  samples = tmp_path / "samples"
  assert main(["sample", "--ip-adapter", str(file), "--image", str(images[0]), "--ip-scale",
               "0.5", "--prompt", "a ball", "--steps", "2", "--out", str(samples)]) == 0
  assert np.asarray(Image.open(samples / "grid.png")).std() > 0
  capsys.readouterr()
  assert main(["verify", str(sdxl_dir), "--ip-adapter", str(file), "--image-encoder",
               str(encoders["bigG"])]) == 0
  printed = capsys.readouterr().out
  for line in ("image_features", "image_proj tokens", "unet (scale 0.6)",
               "ddim 3 steps, cfg 7.5: latents"):
    assert f"ip_adapter(basic).{line}" in printed
  assert printed.strip().endswith("PASS")


@slow
def test_plus_training_bar_on_sdxl(sdxl_dir, encoders):
  """The bar for the resampler on SDXL (its own train-step compilation: slow only)."""
  run = loop.build(ip_config(sdxl_dir, encoders["vit-h"], method=dict(kind="plus", depth=1)),
                   mesh=one_device_mesh())
  trajectory = fixed_batch_trajectory(run, steps=3)
  assert_training_bar(run, trajectory)
  assert dataclasses.asdict(run.method.conditioning.projection)["hidden_dim"] == 64
