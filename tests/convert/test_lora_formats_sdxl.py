"""SDXL LoRA files: diffusers/PEFT (`unet.`, `text_encoder.`, `text_encoder_2.`) and kohya
(`lora_unet_input_blocks_...`, `lora_te1_`, `lora_te2_`). An outside check: a file targeting every
layer we adapt (transformer linears, LoCon convs, both text encoders) goes through diffusers' own
StableDiffusionXLPipeline loader, which must consume every key, wrap every targeted module and,
fused, hold our merged weights and give our UNet output and text conditioning; we read back what
we write and what diffusers writes."""

import copy
import logging

import jax
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.convert import lora_formats as lf
from persona_jax.errors import ModelFileError
from persona_jax.verify import compare, nchw
from tests.convert.test_lora_formats import merged, random_factors, write
from tests.torch_reference import require_torch

PROMPT = "a photo of a red ball"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl(sdxl_pipe):
  """Every module we adapt (kohya's linears, LoCon convs, both encoders), alphas != ranks and, in
  one block's attention, another alpha (diffusers' kohya loader keeps only the majority alpha for
  attention projections: the writer must even them out); B scaled to LoRA-sized updates (at
  random_factors' size they swamp the tiny model, whose float32 round-off then grows past 1e-4)."""
  factors = {p: f._replace(b=0.3 * f.b) for p, f in random_factors(sdxl_pipe).items()}
  for p, f in factors.items():
    if "up_blocks_0/attentions_1/" in p:
      factors[p] = f._replace(scale=np.asarray(0.5, np.float32))
  return sdxl_pipe, factors


@pytest.fixture(scope="module")
def base_ref(sdxl_dir):
  require_torch()
  import torch
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True,
                                                   dtype=torch.float32)


def inputs(pipe):
  from persona_jax.tokenizer import tokenize
  rng = np.random.default_rng(3)
  return (tokenize(pipe.tokenizer, [PROMPT]), tokenize(pipe.tokenizer_2, [PROMPT]),
          rng.standard_normal((1, 16, 16, 4)).astype(np.float32), np.array([500]),
          np.array([[32, 32, 0, 0, 32, 32]], np.float32))


def outputs_torch(ref, pipe):
  """(text context [1, 77, D], UNet eps NCHW) of diffusers' pipeline on `inputs`."""
  import torch
  _, _, x, t, time_ids = inputs(pipe)
  with torch.no_grad():
    ctx, _, pooled, _ = ref.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    eps = ref.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.from_numpy(time_ids)})
  return ctx.numpy(), eps.sample.numpy()


@pytest.fixture(scope="module")
def ours(sdxl):
  """Our merged params (flat) and (context, eps NCHW) with the factors merged, once for every
  format."""
  from persona_jax.diffusion.conditioning import encode_sdxl_prompt
  pipe, factors = sdxl
  models = pipe.models()
  ids, ids_2, x, t, time_ids = inputs(pipe)

  def run(params):
    ctx, pooled = encode_sdxl_prompt(models, params, ids, ids_2)
    eps = models.unet.apply({"params": params["unet"]}, x, t, ctx,
                            added_cond={"text_embeds": pooled, "time_ids": time_ids})
    return ctx, eps
  params = merged(pipe, factors)
  with jax.default_matmul_precision("highest"):
    ctx, eps = jax.jit(run)(params)
  return tree.flatten(params), (np.asarray(ctx), nchw(np.asarray(eps)))


def file_of(fmt, factors, params, path):
  if fmt == "peft":
    tensors, metadata = lf.peft_state_dict(factors, params)
  else:
    tensors, metadata = lf.kohya_state_dict(factors, params, base_version="sdxl_base_v1-0")
  return write(path, tensors, metadata), tensors


def short(module: str) -> str:
  """A module name without `text_model.` (transformers 5 flattens CLIPTextModel, not the
  WithProjection model)."""
  return module.replace(".text_model.", ".")


def torch_module(ref, module: str):
  """diffusers' module for our module name (`text_encoder_2.text_model.encoder...`)."""
  component, _, rest = module.partition(".")
  model = getattr(ref, component)
  try:
    return model.get_submodule(rest)
  except AttributeError:
    return model.get_submodule(rest.removeprefix("text_model."))


def torch_layout(kernel):
  kernel = np.asarray(kernel)
  return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


class Messages(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_loads_every_key_and_matches_us(sdxl, base_ref, ours, tmp_path, fmt):
  from diffusers import StableDiffusionXLPipeline
  from peft.tuners.tuners_utils import BaseTunerLayer
  pipe, factors = sdxl
  path, tensors = file_of(fmt, factors, pipe.params, tmp_path / "lora.safetensors")
  names = lf.module_names(pipe.params)
  targeted = {names[p] for p in factors}
  assert {m.split(".")[0] for m in targeted} == set(COMPONENTS)
  assert any(p.endswith("conv1/kernel") for p in factors)     # LoCon convs are in the file
  if fmt == "kohya":
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_3_0_op.") for k in tensors)
    # diffusers' kohya conversion raises on any key it leaves unconverted; every module arrives.
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path),
                                                                  unet_config=base_ref.unet.config)
    assert len([k for k in converted if k.endswith(".down.weight")]) == len(factors)
    assert len(alphas) == len(factors)
    assert lf.base_version(pipe) == "sdxl_base_v1-0"
  ref = copy.deepcopy(base_ref)
  messages, logger = Messages(), logging.getLogger("diffusers")
  logger.addHandler(messages)
  try:
    ref.load_lora_weights(str(tmp_path), weight_name=path.name)
  finally:
    logger.removeHandler(messages)
  assert not [m for m in messages.lines if "unexpected" in m.lower() or "missing" in m.lower()]
  wrapped = {short(f"{c}.{n}") for c in COMPONENTS for n, m in getattr(ref, c).named_modules()
             if isinstance(m, BaseTunerLayer)}
  assert wrapped == {short(m) for m in targeted}
  # Fused, every targeted weight is W + s * B @ A exactly as we merge it, and the outputs are ours
  # (and not the base's).
  ref.fuse_lora()
  ours_merged, (our_ctx, our_eps) = ours
  for p in factors:
    module = torch_module(ref, names[p])
    w = getattr(module, "base_layer", module).weight.detach().numpy()
    np.testing.assert_allclose(w, torch_layout(ours_merged[p]), atol=1e-5, rtol=1e-5, err_msg=p)
  ctx, eps = outputs_torch(ref, pipe)
  assert compare("context", our_ctx, ctx).max_rel < 1e-4
  assert compare("eps", our_eps, eps).max_rel < 1e-4
  base_ctx, base_eps = outputs_torch(base_ref, pipe)
  assert np.abs(eps - base_eps).max() > 1e-2 and np.abs(ctx - base_ctx).max() > 1e-2
  # Read back: the same merged weights.
  back = tree.flatten(merged(pipe, lf.read_lora_file(path, pipe.params)))
  for p in factors:
    np.testing.assert_allclose(np.asarray(back[p]), np.asarray(ours_merged[p]), atol=1e-6, rtol=1e-5)


def test_we_read_what_diffusers_writes_for_sdxl(sdxl, base_ref, tmp_path):
  """PEFT adapters on the UNet and both encoders (alpha != r), saved by
  StableDiffusionXLPipeline.save_lora_weights, read to diffusers' fused weights; the same adapters
  through diffusers' convert_state_dict_to_kohya (the advanced SDXL script's webui file: diffusers'
  UNet names, lora_te1_/lora_te2_ without text_model_ under transformers 5, int64 alphas = r)
  read to the same factors at scale 1."""
  import torch
  from diffusers import StableDiffusionXLPipeline
  from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  from safetensors.torch import save_file
  pipe, _ = sdxl
  ref = copy.deepcopy(base_ref)
  ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                  "conv1", "conv_shortcut"]))
  for encoder in (ref.text_encoder, ref.text_encoder_2):
    encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                   target_modules=["q_proj", "k_proj", "fc1"]))
  with torch.no_grad():
    for c in COMPONENTS:
      for name, p in getattr(ref, c).named_parameters():
        if "lora_B" in name:
          p.copy_(0.1 * torch.randn(p.shape))
  peft = {c: get_peft_model_state_dict(getattr(ref, c)) for c in COMPONENTS}
  StableDiffusionXLPipeline.save_lora_weights(
      tmp_path, **{f"{c}_lora_layers": convert_state_dict_to_diffusers(peft[c]) for c in COMPONENTS},
      **{f"{c}_lora_adapter_metadata": getattr(ref, c).peft_config["default"].to_dict()
         for c in COMPONENTS})
  kohya = convert_state_dict_to_kohya({f"{c}.{k}": v for c in COMPONENTS for k, v in peft[c].items()})
  assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
  save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
  ref.fuse_lora(components=list(COMPONENTS))
  factors = lf.read_lora_file(tmp_path / lf.PEFT_FILE, pipe.params)
  assert {p.split("/")[0] for p in factors} == set(COMPONENTS)
  assert {float(f.scale) for p, f in factors.items() if p.startswith("unet/")} == {2.0}
  got, names = tree.flatten(merged(pipe, factors)), lf.module_names(pipe.params)
  for p in factors:
    module = torch_module(ref, names[p])
    w = getattr(module, "base_layer", module).weight.detach().numpy()
    np.testing.assert_allclose(torch_layout(got[p]), w, atol=1e-5, rtol=1e-5, err_msg=p)
  from_kohya = lf.read_lora_file(tmp_path / "kohya.safetensors", pipe.params)
  assert set(from_kohya) == set(factors)
  for p, f in factors.items():
    assert float(from_kohya[p].scale) == 1.0
    np.testing.assert_allclose(from_kohya[p].a @ from_kohya[p].b, f.a @ f.b, atol=1e-6, err_msg=p)


def test_sdxl_names_and_bad_files(sdxl, tmp_path):
  """kohya's SGM names (diffusers' _maybe_map_sgm_blocks_to_diffusers layout) for the tiny SDXL
  UNet; an SDXL file's bad key is reported as such (not as an SD 1.x LoRA)."""
  pipe, factors = sdxl
  names = lf.kohya_names(pipe.params)
  assert names["unet/down_blocks_0/downsamplers_0/conv/kernel"] == "lora_unet_input_blocks_3_0_op"
  assert names["unet/down_blocks_1/resnets_0/conv_shortcut/kernel"] == \
      "lora_unet_input_blocks_4_0_skip_connection"
  assert names["unet/mid_block/resnets_1/conv2/kernel"] == "lora_unet_middle_block_2_out_layers_3"
  assert names["unet/up_blocks_0/upsamplers_0/conv/kernel"] == "lora_unet_output_blocks_2_2_conv"
  assert names["unet/up_blocks_1/resnets_2/time_emb_proj/kernel"] == \
      "lora_unet_output_blocks_5_0_emb_layers_1"
  assert names["text_encoder_2/encoder/layers_1/mlp/fc2/kernel"] == \
      "lora_te2_text_model_encoder_layers_1_mlp_fc2"
  z = np.zeros((2, 48), np.float32)
  bad = write(tmp_path / "xl.safetensors", {
      "lora_te2_text_model_encoder_layers_7_self_attn_q_proj.lora_down.weight": z,
      "lora_te2_text_model_encoder_layers_7_self_attn_q_proj.lora_up.weight": z.T.copy()}, {})
  with pytest.raises(ModelFileError, match=r"xl\.safetensors: key 'lora_te2_text_model_encoder_"
                                           r"layers_7.*no module") as e:
    lf.read_lora_file(bad, pipe.params)
  assert "SD 1.x" not in str(e.value)


def test_kohya_targets_are_kohyas_selection_on_sdxl(sdxl, base_ref):
  """`targets=("kohya",)` with conv_rank and both encoders is kohya's networks/lora.py selection
  on diffusers' SDXL modules: every Linear and 1x1 Conv2d of a Transformer2DModel, the Conv2d of
  ResnetBlock2D / Downsample2D / Upsample2D (but time_emb_proj, a Linear kohya also adapts
  there), the Linears of CLIPAttention / CLIPMLP, the first encoder's unread last layer aside."""
  import torch
  from persona_jax.methods import lora
  pipe, factors = sdxl
  official = set()
  for component in COMPONENTS:
    kinds = (("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
             if component == "unet" else ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))
    for name, module in getattr(base_ref, component).named_modules():
      if type(module).__name__ not in kinds:
        continue
      for child, c in module.named_modules():
        transformer = type(module).__name__ == "Transformer2DModel"
        if isinstance(c, torch.nn.Linear) and (transformer or component != "unet"):
          official.add(short(f"{component}.{name}.{child}"))
        elif isinstance(c, torch.nn.Conv2d) and (not transformer or c.kernel_size == (1, 1)):
          official.add(short(f"{component}.{name}.{child}"))
  official -= {m for m in official if m.startswith("text_encoder.encoder.layers.2.")}
  config = lora.LoRAConfig(targets=("kohya",), conv_rank=2, text_encoder=True)
  names = lf.module_names(pipe.params)
  ours = {short(names[t.kernel]) for t in lora.targets(config, pipe.params, pipe.unet_config)}
  assert ours == official and ours == {short(names[p]) for p in factors}
