"""PhotoMaker's ID encoders (v1, v2) against a torch re-creation of the official modules
(persona_jax/photomaker_torch.py) at tiny size on random weights, loaded from official-layout files
(a pickled .bin {"id_encoder", "lora_weights"} for v1, a flattened safetensors for v2).

Tiny sizes: CLIP tower hidden 32, 4 heads of 8, 2 layers, 32x32 images in 8x8 patches;
projections 24 + 16 = fuse width 40; v2: ArcFace width 12, 2 tokens per image, a 2-layer perceiver
with heads of 8 (5 heads). Float32 at the highest matmul precision. Reached: about 1e-7 relative;
asserted: 1e-5.
"""

import jax
import numpy as np
import pytest

from persona_jax.convert import photomaker_files as pmf
from persona_jax.errors import ConfigError, ModelFileError, PickleRefusedError
from persona_jax.models.photomaker import (PhotoMakerIDEncoder, check_class_tokens_mask)
from persona_jax.verify import compare
from tests.torch_reference import require_torch

TOL = 1e-5
SIZE, LENGTH, ID_DIM, HEAD_DIM = 32, 20, 12, 8


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """{"v1": (file, torch model), "v2": (file, torch model)} in the official layouts."""
  torch = require_torch()
  from safetensors.torch import save_file
  from transformers import CLIPVisionConfig

  from persona_jax import photomaker_torch as ref
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24,
                            num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                            patch_size=8)
  torch.manual_seed(0)
  v1 = ref.IDEncoderV1(vision, 16).eval()
  v2 = ref.IDEncoderV2(vision, 16, 40, ID_DIM, depth=2, dim_head=HEAD_DIM).eval()
  ref.randomize_(v1, 0)
  ref.randomize_(v2, 1)
  lora = {"unet.down_blocks.0.lora.down.weight": torch.randn(4, 8)}   # ignored by the ID encoder
  root = tmp_path_factory.mktemp("photomaker")
  torch.save({"id_encoder": v1.state_dict(), "lora_weights": lora}, root / "photomaker-v1.bin")
  save_file({**{f"id_encoder.{k}": v.contiguous() for k, v in v2.state_dict().items()},
             **{f"lora_weights.{k}": v for k, v in lora.items()}}, root / "photomaker-v2.safetensors")
  return {"v1": (root / "photomaker-v1.bin", v1), "v2": (root / "photomaker-v2.safetensors", v2)}


@pytest.fixture(scope="module")
def loaded(official):
  """{version: (config, params, jitted apply)} loaded by our converter."""
  out = {}
  for version, (path, _) in official.items():
    config, params = pmf.load_id_encoder(path, allow_pickle=True, vision_head_dim=HEAD_DIM,
                                         perceiver_head_dim=HEAD_DIM)
    out[version] = (config, params, jax.jit(PhotoMakerIDEncoder(config).apply))
  return out


def _inputs(fuse_dim, images, spans, seed):
  """Random ID images [B, N, S, S, 3], prompts [B, L, E], ArcFace embeddings [B, N, 12] and a
  mask with the class word's copies at spans[r] = (start, count) of row r."""
  rng = np.random.default_rng(seed)
  b = len(spans)
  pixels = rng.standard_normal((b, images, SIZE, SIZE, 3)).astype(np.float32)
  prompt = rng.standard_normal((b, LENGTH, fuse_dim)).astype(np.float32)
  embeds = (3 * rng.standard_normal((b, images, ID_DIM))).astype(np.float32)
  mask = np.zeros((b, LENGTH), bool)
  for r, (start, count) in enumerate(spans):
    mask[r, start:start + count] = True
  return pixels, prompt, mask, embeds


def _official_rows(model, pixels, prompt, mask, embeds=None):
  """The official forward, one row at a time (its FuseModule handles batch 1 only)."""
  import torch
  out = []
  with torch.no_grad():
    for r in range(len(prompt)):
      args = [torch.from_numpy(pixels[r:r + 1].transpose(0, 1, 4, 2, 3).copy()),
              torch.from_numpy(prompt[r:r + 1].copy()), torch.from_numpy(mask[r:r + 1].copy())]
      if embeds is not None:
        args.append(torch.from_numpy(embeds[r:r + 1].copy()))
      out.append(model(*args).numpy())
  return np.concatenate(out)


def test_sizes_are_inferred_from_the_weights(loaded):
  v1, v2 = loaded["v1"][0], loaded["v2"][0]
  assert (v1.version, v2.version) == ("v1", "v2")
  for c in (v1, v2):
    v = c.vision
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads,
            v.image_size, v.patch_size, v.projection_dim) == (32, 37, 2, 4, SIZE, 8, 24)
    assert (c.projection_2_dim, c.fuse_dim, c.mlp1_hidden_dim, c.mlp2_hidden_dim) == (16, 40, 40, 40)
  assert v1.tokens_per_image == 1
  assert (v2.id_embeddings_dim, v2.token_proj_hidden_dim, v2.num_tokens, v2.tokens_per_image,
          v2.perceiver_depth, v2.perceiver_heads, v2.perceiver_head_dim,
          v2.perceiver_ff_mult) == (ID_DIM, 4 * ID_DIM, 2, 2, 2, 5, HEAD_DIM, 4)


# (images per row, [(start, count) of the class word's copies per row]); v1 fills one copy per
# image, v2 two. Two images: row 0 uses both; row 1 of v1 has one copy (the official code then
# uses the first image only), row 1 of v2 has no trigger word (the prompt is left unchanged).
CASES = {"v1": [(1, [(5, 1)]), (2, [(3, 2), (7, 1)])],
         "v2": [(1, [(5, 2)]), (2, [(2, 4), (0, 0)])]}


@pytest.mark.parametrize("version,case", [(v, i) for v in CASES for i in range(2)],
                         ids=["v1-one-image", "v1-two-images", "v2-one-image", "v2-two-images"])
def test_fused_prompt_embeddings_match_official(official, loaded, version, case):
  images, spans = CASES[version][case]
  config, params, apply = loaded[version]
  pixels, prompt, mask, embeds = _inputs(config.fuse_dim, images, spans, seed=case)
  embeds = embeds if version == "v2" else None
  want = _official_rows(official[version][1], pixels, prompt, mask, embeds)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(apply({"params": params}, pixels, prompt, mask, embeds))
  assert got.shape == prompt.shape
  assert compare(version, got, want).max_rel < TOL
  np.testing.assert_array_equal(got[~mask], prompt[~mask])           # only the class word moves
  assert np.abs(got[mask] - prompt[mask]).min() > 0


def test_official_keys_round_trip(official, loaded):
  for version, (_, model) in official.items():
    state = {f"id_encoder.{k}": v.numpy() for k, v in model.state_dict().items()}
    back = pmf.to_official(loaded[version][1])
    assert sorted(back) == sorted(state)
    for k, v in state.items():
      np.testing.assert_array_equal(back[k], v)


def test_strict_keys_one_line_errors(official):
  require_torch()
  path, model = official["v2"]
  state = {f"id_encoder.{k}": v.numpy() for k, v in model.state_dict().items()}
  kw = dict(vision_head_dim=HEAD_DIM, perceiver_head_dim=HEAD_DIM)
  dropped = "id_encoder.qformer_perceiver.perceiver_resampler.layers.1.0.to_kv.weight"
  with pytest.raises(ModelFileError, match=r"pm\.bin: .*missing 1 \(" + dropped.replace(".", r"\.")):
    pmf.id_encoder_params({k: v for k, v in state.items() if k != dropped}, "pm.bin", **kw)
  with pytest.raises(ModelFileError, match=r"pm\.bin: .*unexpected 1 \(id_encoder\.extra\.weight"):
    pmf.id_encoder_params({**state, "id_encoder.extra.weight": np.zeros(3)}, "pm.bin", **kw)
  with pytest.raises(ModelFileError, match="unexpected key.*beside id_encoder"):
    pmf.id_encoder_params({**state, "other.weight": np.zeros(3)}, "pm.bin", **kw)
  bad = dict(state, **{"id_encoder.fuse_module.mlp2.fc2.bias": np.zeros(3, np.float32)})
  with pytest.raises(ModelFileError, match=r"pm\.bin: id_encoder\.fuse_module\.mlp2\.fc2\.bias has shape"):
    pmf.id_encoder_params(bad, "pm.bin", **kw)
  with pytest.raises(ModelFileError, match="not a multiple of 128"):          # official head width
    pmf.id_encoder_params(state, "pm.bin", vision_head_dim=HEAD_DIM)
  with pytest.raises(PickleRefusedError, match="photomaker-v1.bin"):
    pmf.read_official(official["v1"][0])
  for error in ("missing", "unexpected"):
    try:
      pmf.id_encoder_params({k: v for k, v in state.items() if k != dropped}
                            if error == "missing" else {**state, "id_encoder.x": np.zeros(1)},
                            "pm.bin", **kw)
    except ModelFileError as e:
      assert "\n" not in str(e)


def test_bad_masks_and_inputs(loaded):
  mask = np.zeros((2, LENGTH), bool)
  mask[1, :5] = True
  with pytest.raises(ConfigError, match="class_tokens_mask: a row marks 5 .* 4 ID tokens"):
    check_class_tokens_mask(mask, 4)
  check_class_tokens_mask(mask, 5)
  config, params, _ = loaded["v2"]
  pixels, prompt, mask, _ = _inputs(config.fuse_dim, 1, [(0, 2)], seed=0)
  with pytest.raises(ValueError, match="v2: id_embeds .* required"):
    jax.eval_shape(PhotoMakerIDEncoder(config).apply, {"params": params}, pixels, prompt, mask)
  with pytest.raises(ValueError, match="ID images"):
    jax.eval_shape(PhotoMakerIDEncoder(config).apply, {"params": params}, pixels[0], prompt, mask)


def test_official_sizes_and_keys_at_full_size():
  """The official classes at full size (built on torch's meta device: shapes, no memory) hold
  exactly our default config's keys and shapes, and the sizes inferred from them are the
  defaults (v2: 16 perceiver heads of 128)."""
  torch = require_torch()
  from transformers import CLIPVisionConfig

  from persona_jax.convert.diffusers import key_table
  from persona_jax.models.photomaker import PhotoMakerConfig, abstract_params
  from persona_jax import photomaker_torch as ref
  vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                            num_hidden_layers=24, patch_size=14, projection_dim=768)
  with torch.device("meta"):
    models = {"v1": ref.IDEncoderV1(vision, 1280), "v2": ref.IDEncoderV2(vision, 1280, 2048, 512)}
  for version, model in models.items():
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = pmf.infer_config({k: _Shape(s) for k, s in shapes.items()}, "meta")
    assert config == PhotoMakerConfig(version=version)
    table = key_table(abstract_params(config))
    assert {pmf.official_key(k): e.torch_shape() for k, e in table.items()} == shapes


class _Shape:
  """A stand-in tensor that only has a shape."""
  def __init__(self, shape):
    self.shape = shape
