"""The UNet's add-ons (models/addons.py): IP-Adapter's decoupled cross-attention, InstantBooth's
gated self-attention adapter, cross-attention maps (FastComposer), and a toy stream reaching every
down, mid and up block (the plug point SDXL's and ControlNet's streams will use).

Branch off = base is checked bit for bit (jnp.array_equal); parity with diffusers at float32,
highest matmul precision (reached about 1e-6 relative, asserted 1e-5).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import tree
from persona_jax.errors import ConfigError
from persona_jax.models.adapters import GatedSelfAttention
from persona_jax.models.addons import (Addon, AttentionMaps, DecoupledCrossAttention, GatedAdapter,
                                       Where)
from persona_jax.models.attention_maps import ATTENTION_MAPS, collect
from persona_jax.models.unet import UNet2DConditionModel, init_added_params, skip_places
from persona_jax.verify import compare, nchw
from tests.torch_reference import require_torch

HW = (16, 24)
# The sd1 preset's transformers (down level 0, mid, up level 1).
TRANSFORMERS = ("down_blocks_0/attentions_0", "down_blocks_0/attentions_1", "mid_block/attentions_0",
                "up_blocks_1/attentions_0", "up_blocks_1/attentions_1", "up_blocks_1/attentions_2")
ADDED_SUFFIXES = (
    "adapter/attn/to_k/kernel", "adapter/attn/to_out_0/bias", "adapter/attn/to_out_0/kernel",
    "adapter/attn/to_q/kernel", "adapter/attn/to_v/kernel", "adapter/gamma", "adapter/linear/bias",
    "adapter/linear/kernel", "adapter/norm/bias", "adapter/norm/scale",
    "attn2/to_k_ip/kernel", "attn2/to_v_ip/kernel")


def specs(params):
  return {p: (v.shape, v.dtype) for p, v in tree.flatten(params).items()}


def on_config(config):
  return dataclasses.replace(config, addons=(DecoupledCrossAttention(), GatedAdapter()))


@pytest.fixture(scope="module")
def setup(pipes):
  """sd1 inputs, the base output, and the UNet with both added layers (gamma 0: fresh)."""
  pipe = pipes["sd1"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *HW, 4)).astype(np.float32)
  t = np.array([3, 917])
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  streams = {"ip_tokens": rng.standard_normal((2, 4, 32)).astype(np.float32),
             "adapter_tokens": rng.standard_normal((2, 5, 24)).astype(np.float32)}
  base = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx)
  unet = UNet2DConditionModel(on_config(pipe.unet_config))
  added = init_added_params(unet, jax.random.key(1), streams)
  params = tree.merge(pipe.params["unet"], added)
  apply = jax.jit(lambda p, extra: unet.apply({"params": p}, x, t, ctx, extra))
  return dict(pipe=pipe, x=x, t=t, ctx=ctx, streams=streams, base=base, unet=unet, params=params,
              apply=apply)


def with_gamma(params, value):
  return tree.map_with_path(lambda p, v: jnp.full_like(v, value) if p.endswith("adapter/gamma")
                            else v, params)


def test_param_tree_is_the_base_without_streams_and_adds_exact_leaves(setup):
  pipe, s = setup["pipe"], setup
  x, t, ctx = s["x"], s["t"], s["ctx"]
  init = lambda unet, *extra: jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx, *extra)
  base_specs = specs(pipe.params["unet"])
  assert specs(init(pipe.unet)["params"]) == base_specs
  # Options on but no stream: nothing added (a base checkpoint loads unchanged).
  assert specs(init(s["unet"])["params"]) == base_specs
  full = specs(init(s["unet"], s["streams"])["params"])
  added = {p: v for p, v in full.items() if p not in base_specs}
  assert {p: full[p] for p in base_specs} == base_specs
  assert sorted(added) == sorted(f"{b}/transformer_blocks_0/{leaf}" for b in TRANSFORMERS
                                 for leaf in ADDED_SUFFIXES)
  assert specs(setup["params"]) == full           # init_added_params gives exactly these
  mid = "mid_block/attentions_0/transformer_blocks_0/"
  assert added[mid + "attn2/to_k_ip/kernel"][0] == (32, 64)       # cross_attention_dim -> width
  assert added[mid + "adapter/linear/kernel"][0] == (24, 64)      # patch width -> width
  assert added[mid + "adapter/gamma"][0] == ()
  assert not np.any(tree.flatten(setup["params"])[mid + "adapter/gamma"])


def test_branches_off_reproduce_the_base_bit_for_bit(setup):
  s = setup
  base, apply, streams = s["base"], s["apply"], s["streams"]
  assert jnp.array_equal(jax.jit(lambda p: s["unet"].apply({"params": p}, s["x"], s["t"],
                                                           s["ctx"]))(s["params"]), base)
  off = {**streams, "ip_scale": np.zeros(2, np.float32), "adapter_scale": np.ones(2, np.float32)}
  assert jnp.array_equal(apply(s["params"], off), base)                   # ip scale 0, gamma 0
  gated = with_gamma(s["params"], 0.5)
  beta_off = {**streams, "ip_scale": np.float32(0.0), "adapter_scale": np.float32(0.0)}
  assert jnp.array_equal(apply(gated, beta_off), base)                    # beta 0
  # Per-example scales: image 0 off, image 1 on.
  mixed = apply(gated, {**streams, "ip_scale": np.array([0, 0.7], np.float32),
                        "adapter_scale": np.array([0, 1], np.float32)})
  assert jnp.array_equal(mixed[0], base[0])
  assert compare("on", mixed[1], base[1]).max_rel > 1e-3


def test_stream_for_a_layer_the_unet_lacks_is_an_error(setup):
  s = setup
  with pytest.raises(ValueError, match="no add-on of this UNet reads it"):
    jax.eval_shape(s["pipe"].unet.apply, {"params": s["pipe"].params["unet"]}, s["x"], s["t"],
                   s["ctx"], {"ip_tokens": s["streams"]["ip_tokens"]})


def test_gated_adapter_changes_the_output_only_through_its_attention(setup):
  s = setup
  gated = with_gamma(s["params"], 0.5)
  extra = {**s["streams"], "ip_scale": np.float32(0.0), "adapter_scale": np.float32(1.0)}
  assert compare("gated", s["apply"](gated, extra), s["base"]).max_rel > 1e-3
  silent = tree.map_with_path(lambda p, v: jnp.zeros_like(v) if "adapter/attn/to_out_0" in p
                              else v, gated)
  assert jnp.array_equal(s["apply"](silent, extra), s["base"])


def layer_norm(z, scale, bias, eps=1e-5):
  mean = z.mean(-1, keepdims=True)
  var = ((z - mean) ** 2).mean(-1, keepdims=True)
  return (z - mean) / np.sqrt(var + eps) * scale + bias


def test_gated_adapter_matches_a_numpy_reference():
  """y + beta * tanh(gamma) * Attn(LN([y, linear(f_p)]))[:, :T], heads split as diffusers does."""
  rng = np.random.default_rng(4)
  b, t, p, c, dp, heads = 2, 6, 3, 8, 5, 2
  x = rng.standard_normal((b, t, c)).astype(np.float32)
  f_p = rng.standard_normal((b, p, dp)).astype(np.float32)
  beta = np.array([1.0, 0.3], np.float32)
  module = GatedSelfAttention(c, heads, kernel="einsum")
  params = module.init(jax.random.key(0), x, f_p, beta)["params"]
  params = jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32) * 0.5, params)
  params["gamma"] = np.float32(0.8)
  with jax.default_matmul_precision("highest"):
    got = module.apply({"params": params}, x, f_p, beta)

  w = jax.tree.map(np.asarray, params)
  z = np.concatenate([x, f_p @ w["linear"]["kernel"] + w["linear"]["bias"]], axis=1)
  z = layer_norm(z, w["norm"]["scale"], w["norm"]["bias"])
  split = lambda a: a.reshape(b, t + p, heads, c // heads).transpose(0, 2, 1, 3)    # [B, N, S, Dh]
  q, k, v = (split(z @ w["attn"][n]["kernel"]) for n in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // heads)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  h = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t + p, c)
  h = h @ w["attn"]["to_out_0"]["kernel"] + w["attn"]["to_out_0"]["bias"]
  want = x + (beta * np.tanh(0.8))[:, None, None] * h[:, :t]
  assert compare("adapter", got, want).max_rel < 1e-5


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_ip_attention_matches_diffusers(preset, pipes, model_dirs):
  """diffusers' IPAdapterAttnProcessor2_0 in every attn2, random to_k_ip/to_v_ip, scale 0.7
  (sd2: per-block head counts, linear projections, two transformer layers)."""
  torch = require_torch()
  from diffusers import UNet2DConditionModel as TorchUNet
  from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
  pipe = pipes[preset]
  ref = TorchUNet.from_pretrained(model_dirs[preset] / "unet").eval()
  gen = torch.Generator().manual_seed(5)
  processors, ip, ip_processors = dict(ref.attn_processors), {}, []
  for name in processors:
    if not name.endswith("attn2.processor"):
      continue
    layer = ref.get_submodule(name[: -len(".processor")])
    proc = IPAdapterAttnProcessor2_0(layer.to_q.out_features, layer.to_k.in_features,
                                     num_tokens=4, scale=0.7)
    with torch.no_grad():
      for lin in (proc.to_k_ip[0], proc.to_v_ip[0]):
        lin.weight.copy_(0.3 * torch.randn(lin.weight.shape, generator=gen))
    processors[name] = proc
    ip_processors.append(proc)
    path = re.sub(r"\.(\d+)", r"_\1", name[: -len(".processor")]).replace(".", "/")
    ip[f"{path}/to_k_ip/kernel"] = proc.to_k_ip[0].weight.detach().numpy().T
    ip[f"{path}/to_v_ip/kernel"] = proc.to_v_ip[0].weight.detach().numpy().T
  ref.set_attn_processor(processors)

  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, *HW, 4)).astype(np.float32)
  t = np.array([3, 917])
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  tokens = rng.standard_normal((2, 4, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t),
               encoder_hidden_states=(torch.from_numpy(ctx), [torch.from_numpy(tokens)])).sample
  unet = UNet2DConditionModel(dataclasses.replace(pipe.unet_config,
                                                  addons=(DecoupledCrossAttention(),)))
  params = tree.merge(pipe.params["unet"], tree.unflatten(ip))
  with jax.default_matmul_precision("highest"):
    got = jax.jit(unet.apply)({"params": params}, x, t, ctx,
                              {"ip_tokens": tokens, "ip_scale": np.float32(0.7)})
  assert compare("ip unet", nchw(got), want.numpy()).max_rel < 1e-5
  for proc in ip_processors:
    proc.scale = [0.0]
  with torch.no_grad():
    text_only = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t),
                    encoder_hidden_states=(torch.from_numpy(ctx), [torch.from_numpy(tokens)])).sample
  assert compare("ip branch", want.numpy(), text_only.numpy()).max_rel > 1e-2


MAP_BLOCKS = ("IN01", "MID", "OUT05")


def test_attention_maps_of_asked_blocks(setup):
  s = setup
  unet = UNet2DConditionModel(dataclasses.replace(s["pipe"].unet_config,
                                                  addons=(AttentionMaps(MAP_BLOCKS),)))
  variables = {"params": s["pipe"].params["unet"]}
  out, state = jax.jit(lambda v: unet.apply(v, s["x"], s["t"], s["ctx"], mutable=[ATTENTION_MAPS]))(
      variables)
  assert jnp.array_equal(out, s["base"])
  maps = collect(state, unet.config, HW)
  assert {k: v.shape for k, v in maps.items()} == {
      "down_blocks_0/attentions_0/transformer_blocks_0/attn2": (2, 16, 24, 77),
      "mid_block/attentions_0/transformer_blocks_0/attn2": (2, 8, 12, 77),
      "up_blocks_1/attentions_2/transformer_blocks_0/attn2": (2, 16, 24, 77)}
  for m in maps.values():
    assert m.dtype == jnp.float32 and float(m.min()) >= 0.0
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
  # Not asked (the collection not mutable): the very same program as the base UNet's.
  plain = lambda u: jax.make_jaxpr(lambda v: u.apply(v, s["x"], s["t"], s["ctx"]))(variables)
  assert str(plain(unet)) == str(plain(s["pipe"].unet))


def test_attention_maps_reject_blocks_without_cross_attention(setup):
  s = setup
  for blocks, message in ((("IN03",), "no cross-attention"), (("IN99",), "does not exist")):
    unet = UNet2DConditionModel(dataclasses.replace(s["pipe"].unet_config,
                                                    addons=(AttentionMaps(blocks),)))
    with pytest.raises(ConfigError, match=message):
      jax.eval_shape(unet.apply, {"params": s["pipe"].params["unet"]}, s["x"], s["t"], s["ctx"])


@dataclasses.dataclass(frozen=True)
class ToyShift(Addon):
  """A toy add-on: adds `toy` [P + 1] (one number per block output, in `places` order, then one
  for the time embedding) times a pattern over the channels (a constant would vanish in the next
  group norm) to the output of every down skip, the mid block, every up block and to the time
  embedding; records where it is called and the shape it sees there."""
  places: tuple = ()
  reads = ("toy",)

  @staticmethod
  def shift(x, value):
    pattern = jnp.sin(jnp.arange(x.shape[-1], dtype=x.dtype))        # [C]
    return x + value.astype(x.dtype) * pattern.reshape((1,) * (x.ndim - 1) + (-1,))

  def time_embedding(self, temb, streams):
    CALLED.append(("time", temb.shape[1:]))
    return temb if "toy" not in streams else self.shift(temb, streams["toy"][len(self.places)])

  def block_output(self, where, x, streams):
    CALLED.append((where, x.shape[1:]))
    if "toy" not in streams:
      return x
    return self.shift(x, streams["toy"][self.places.index(where)])


CALLED = []


def test_a_toy_stream_reaches_every_down_mid_and_up_block(setup):
  """A new stream needs no branch in the blocks: an add-on's `time_embedding` sees the time
  embedding, its `block_output` every skip the down path leaves (ControlNet's down residuals
  enter there: they change what the up path reads), the mid block's output and every up block's
  output, each at its own shape; a value at one place changes the UNet's output (without the
  stream: the base, bit for bit)."""
  s = setup
  config = s["pipe"].unet_config
  c0, c1 = config.block_out_channels                        # the sd1 preset: two levels,
  assert config.layers_per_block_list == (2, 2)              # two layers each
  full, half = HW, (HW[0] // 2, HW[1] // 2)
  # conv_in, the two layers and the downsampler of level 0, the two layers of level 1 (no
  # downsampler on the last level), the mid block, the two up blocks (the first upsamples).
  shapes = {Where("down", -1, 0): (*full, c0), Where("down", 0, 0): (*full, c0),
            Where("down", 0, 1): (*full, c0), Where("down", 0, 2): (*half, c0),
            Where("down", 1, 0): (*half, c1), Where("down", 1, 1): (*half, c1),
            Where("mid"): (*half, c1), Where("up", 0): (*full, c1), Where("up", 1): (*full, c0)}
  places = tuple(shapes)
  assert tuple(skip_places(config)) == places[:6]
  unet = UNet2DConditionModel(dataclasses.replace(config, addons=(ToyShift(places),)))
  apply = jax.jit(lambda toy: unet.apply({"params": s["pipe"].params["unet"]}, s["x"], s["t"],
                                         s["ctx"], {"toy": toy}))
  CALLED.clear()
  zero = apply(jnp.zeros(len(places) + 1))
  assert sorted(CALLED, key=str) == sorted([("time", (config.time_embed_dim,))]
                                           + list(shapes.items()), key=str)
  # Zeros add nothing (up to the other program's rounding); no stream: the base bit for bit.
  assert compare("zeros", zero, s["base"]).max_rel < 1e-5
  no_stream = jax.jit(lambda p: unet.apply({"params": p}, s["x"], s["t"], s["ctx"]))
  assert jnp.array_equal(no_stream(s["pipe"].params["unet"]), s["base"])
  outputs = []
  for k, place in enumerate(places + ("time",)):
    out = apply(jnp.zeros(len(places) + 1).at[k].set(0.5))
    assert compare(str(place), out, s["base"]).max_rel > 1e-4, place
    outputs.append(out)
  # Each place has its own effect (no two places are the same point of the network).
  for i in range(len(outputs)):
    for j in range(i):
      assert not jnp.allclose(outputs[i], outputs[j]), (i, j)
