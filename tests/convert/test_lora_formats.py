"""LoRA files in diffusers/PEFT and kohya formats: diffusers' own loader takes what we write and
gives our outputs; we read what diffusers/PEFT write and give theirs; round trips are exact."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from persona_jax import tree
from persona_jax.convert import lora_formats as lf
from persona_jax.errors import ModelFileError
from persona_jax.methods import lora
from persona_jax.methods.lora_compose import apply_loras
from persona_jax.models import block_names
from persona_jax.verify import nchw
from tests.torch_reference import require_torch


def random_factors(pipe, seed=0) -> lf.LoRAFactors:
  """Attention, ff and proj linears at mixed ranks, 3x3 convs (LoCon) and the text encoder, with
  alphas other than the rank, and every factor non-zero."""
  config = lora.LoRAConfig(rank=4, alpha=8.0, conv_rank=2, conv_alpha=1.0, text_encoder=True,
                           targets=("kohya",), block_ranks={"IN01": 2, "OUT05": 3})
  rng = np.random.default_rng(seed)
  out = {}
  for t in lora.targets(config, pipe.params, pipe.unet_config):
    fan_in = int(np.prod(t.shape[:-1]))
    out[t.kernel] = lf.Factor(rng.normal(0, 0.2, (fan_in, t.rank)).astype(np.float32),
                                rng.normal(0, 0.2, (t.rank, t.shape[-1])).astype(np.float32),
                                np.asarray(t.scale, np.float32))
  return out


def merged(pipe, factors):
  ones = np.ones((1, len(block_names.all_blocks(pipe.unet_config))), np.float32)
  return apply_loras(pipe.params, [factors], ones, pipe.unet_config)


def write(path, tensors, metadata):
  save_file(tensors, str(path), metadata=metadata)
  return path


@pytest.fixture(scope="module")
def sd1(pipes):
  pipe = pipes["sd1"]
  return pipe, random_factors(pipe)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_round_trip_gives_the_same_merged_weights(sd1, tmp_path, fmt):
  pipe, factors = sd1
  if fmt == "peft":
    tensors, metadata = lf.peft_state_dict(factors, pipe.params)
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in tensors)
  else:
    tensors, metadata = lf.kohya_state_dict(factors, pipe.params, base_version="sd_v1")
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
  path = write(tmp_path / "x.safetensors", tensors, metadata)
  assert lf.detect_format(tensors) == {"peft": "diffusers", "kohya": "kohya"}[fmt]
  back = lf.read_lora_file(path, pipe.params)
  assert set(back) == set(factors)
  want, got = tree.flatten(merged(pipe, factors)), tree.flatten(merged(pipe, back))
  for p in factors:
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def diffusers_pipe(model_dirs):
  require_torch()
  import torch
  from diffusers import StableDiffusionPipeline
  torch.manual_seed(0)
  return lambda: StableDiffusionPipeline.from_pretrained(model_dirs["sd1"], safety_checker=None)


def outputs_torch(pipe_t, ids, x, t):
  import torch
  with torch.no_grad():
    ctx = pipe_t.text_encoder(torch.from_numpy(ids))[0]
    eps = pipe_t.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), ctx).sample
  return ctx.numpy(), eps.numpy()


def outputs_ours(pipe, params, ids, x, t):
  with jax.default_matmul_precision("highest"):
    ctx = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    eps = pipe.unet.apply({"params": params["unet"]}, x, t, ctx)
  return np.asarray(ctx), nchw(np.asarray(eps))


def inputs(pipe):
  rng = np.random.default_rng(3)
  ids = pipe.tokenizer(["a photo of a red ball"], padding="max_length", max_length=77,
                       return_tensors="np").input_ids
  return ids, rng.standard_normal((1, 16, 16, 4)).astype(np.float32), np.array([500])


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_diffusers_loads_our_export_and_matches_us(sd1, diffusers_pipe, tmp_path, fmt):
  pipe, factors = sd1
  build = lf.peft_state_dict if fmt == "peft" else (
      lambda f, p: lf.kohya_state_dict(f, p, base_version="sd_v1"))
  tensors, metadata = build(factors, pipe.params)
  write(tmp_path / "lora.safetensors", tensors, metadata)
  ids, x, t = inputs(pipe)
  pipe_t = diffusers_pipe()
  base_ctx, base_eps = outputs_torch(pipe_t, ids, x, t)
  pipe_t.load_lora_weights(tmp_path, weight_name="lora.safetensors")
  ctx, eps = outputs_torch(pipe_t, ids, x, t)
  assert np.abs(eps - base_eps).max() > 1e-3 and np.abs(ctx - base_ctx).max() > 1e-3   # it loaded
  # Compared fused (W + s * B @ A exactly): diffusers' own unfused and fused outputs differ by
  # ~1e-3 on this random UNet.
  pipe_t.fuse_lora()
  ctx, eps = outputs_torch(pipe_t, ids, x, t)
  our_ctx, our_eps = outputs_ours(pipe, merged(pipe, factors), ids, x, t)
  np.testing.assert_allclose(our_ctx, ctx, atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(our_eps, eps, atol=2e-4, rtol=1e-3)


def test_we_read_what_diffusers_writes_and_match_it(sd1, diffusers_pipe, tmp_path):
  """A LoRA added with PEFT to diffusers' UNet and text encoder (alpha != r, random B), saved
  by diffusers' own `save_lora_weights`, gives diffusers' outputs in persona_jax."""
  import torch
  from diffusers import StableDiffusionPipeline
  from diffusers.utils import convert_state_dict_to_diffusers
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  pipe, _ = sd1
  pipe_t = diffusers_pipe()
  pipe_t.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                                     init_lora_weights="gaussian"))
  pipe_t.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"],
                                             init_lora_weights="gaussian"))
  with torch.no_grad():
    for name, p in list(pipe_t.unet.named_parameters()) + list(pipe_t.text_encoder.named_parameters()):
      if "lora_B" in name:
        p.copy_(0.2 * torch.randn(p.shape))
  StableDiffusionPipeline.save_lora_weights(
      tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe_t.unet)),
      text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe_t.text_encoder)),
      unet_lora_adapter_metadata=pipe_t.unet.peft_config["default"].to_dict(),
      text_encoder_lora_adapter_metadata=pipe_t.text_encoder.peft_config["default"].to_dict())
  ids, x, t = inputs(pipe)
  pipe_t.unet.fuse_lora() if hasattr(pipe_t.unet, "fuse_lora") else None
  ctx, eps = outputs_torch(pipe_t, ids, x, t)
  factors = lf.read_lora_file(tmp_path / lf.PEFT_FILE, pipe.params)
  assert any(p.startswith("text_encoder/") for p in factors)
  assert {float(f.scale) for p, f in factors.items() if p.startswith("unet/")} == {2.0}
  our_ctx, our_eps = outputs_ours(pipe, merged(pipe, factors), ids, x, t)
  np.testing.assert_allclose(our_ctx, ctx, atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(our_eps, eps, atol=2e-4, rtol=1e-3)


def test_old_diffusers_processor_keys_are_read(sd1, tmp_path):
  pipe, factors = sd1
  path = next(p for p in factors if p.endswith("attn1/to_out_0/kernel"))
  module = lf.module_names(pipe.params)[path]
  down, up = lf.to_torch(factors[path], tree.flatten(pipe.params)[path].shape)
  old = module.replace(".to_out.0", ".processor.to_out_lora")
  f = write(tmp_path / "old.safetensors", {f"{old}.down.weight": down, f"{old}.up.weight": up}, {})
  back = lf.read_lora_file(f, pipe.params)
  np.testing.assert_allclose(back[path].a @ back[path].b, factors[path].a @ factors[path].b, rtol=1e-5)
  assert float(back[path].scale) == 1.0                   # no alpha in this format: scale 1


def test_bad_files_name_the_file_and_key(sd1, tmp_path):
  pipe, _ = sd1
  z = np.zeros((2, 32), np.float32)
  no_prefix = write(tmp_path / "a.safetensors", {
      "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": z,
      "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": z.T.copy()}, {})
  with pytest.raises(ModelFileError, match=r"a\.safetensors.*to_q\.lora_A.*no 'unet\.'"):
    lf.read_lora_file(no_prefix, pipe.params)
  other = write(tmp_path / "b.safetensors", {"lora_unet_nowhere_to_q.lora_down.weight": z,
                                             "lora_unet_nowhere_to_q.lora_up.weight": z.T.copy()}, {})
  with pytest.raises(ModelFileError, match=r"b\.safetensors.*lora_unet_nowhere_to_q.*no module"):
    lf.read_lora_file(other, pipe.params)
  junk = write(tmp_path / "c.safetensors", {"model.diffusion_model.x.weight": z}, {})
  with pytest.raises(ModelFileError, match=r"c\.safetensors.*model\.diffusion_model\.x\.weight"):
    lf.read_lora_file(junk, pipe.params)
  with pytest.raises(ModelFileError, match="pickle"):
    lf.read_lora_file(tmp_path / "d.bin", pipe.params)
