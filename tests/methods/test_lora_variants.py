"""LoRA variants (`method.variant`: DoRA, LoKr, LoHa; methods/lora_variants.py) on the sd1 random
model: literal trainable leaves, step 0 is the base, the loss falls (Adam through the method's
transform on the first layer of down block 0), the bf16 path (the float32 update beside the bf16
kernel, models/low_rank.py `lora_delta`), round trips through our file and the exports, and
outside loaders: diffusers' `load_lora_weights` for DoRA in the PEFT layout, LyCORIS's own kohya
loader for DoRA, LoKr and LoHa (diffusers' UNet under LyCORIS against the same UNet holding our
merge). SDXL: the per-layer updates against LyCORIS's functions through the SDXL kohya names.
Slow tests (tests/markers.py) go over ground a default test covers; each names it."""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from persona_jax import ConfigError, tree
from persona_jax.convert import lora_formats as lf
from persona_jax.methods import lora, lora_variants as lv
from persona_jax.methods.base import Method
from persona_jax.models import low_rank
from persona_jax.models.unet_blocks import UNetDownBlock, conv
from persona_jax.train import loop
from tests.convert.test_lora_formats import inputs, merged, outputs_ours, outputs_torch
from tests.markers import slow
from tests.runs import fixed_batch_trajectory, lora_config, one_device_mesh
from tests.torch_reference import require_torch

VARIANTS = ("dora", "lokr", "loha")
Q = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"      # [32, 32], no bias
CONV = "unet/down_blocks_0/resnets_0/conv1"                                 # 3x3, 32 -> 32
# Rank 2: LoKr splits 32 into (4, 8) (LyCORIS's factorization); 2 < 8 / 2, so w2 is low rank.
LEAVES = {
    "dora": {Q: {"a": (32, 2), "b": (2, 32), "magnitude": (32,)},
             CONV: {"a": (288, 2), "b": (2, 32), "magnitude": (32,)}},
    "lokr": {Q: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
             CONV: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72)}},
    "loha": {Q: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)},
             CONV: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 288), "hada_w2_a": (32, 2),
                    "hada_w2_b": (2, 288)}},
}
ZERO = {"dora": {"b"}, "lokr": {"lokr_w2_b"}, "loha": {"hada_w2_a"}}
# Down block 0's first layer (resnet, transformer, downsampler): 11 of the 81 targets, Q and
# CONV among them; the cheap checks run the method's init and transform there.
FIRST_LAYER = ("resnets_0", "attentions_0", "downsamplers_0")


@pytest.fixture(scope="module")
def pipe(pipes):
  return pipes["sd1"]


def chosen(pipe, variant, **options):
  config = lora.LoRAConfig(rank=2, conv_rank=2, variant=variant, **options)
  return lora.targets(config, pipe.params, pipe.unet_config)


def abstract_init(targets, pipe):
  """The method's trainable tree for `targets` as shapes (traced, nothing computed): flat."""
  return tree.flatten(jax.eval_shape(lora.param_spec(targets).init, jax.random.PRNGKey(0), pipe.params))


def layer_base(pipe):
  """The first layer's params under their full paths ({"unet": {"down_blocks_0": ...}})."""
  block = pipe.params["unet"]["down_blocks_0"]
  return {"unet": {"down_blocks_0": {k: block[k] for k in FIRST_LAYER}}}


@pytest.fixture(scope="module")
def inits(pipe):
  """{variant: (the first layer's targets, the method's init of their leaves)} (eager: the init
  of all 81 targets is ~6 s of op-by-op compiles; every target's leaves come from the same
  per-target code)."""
  out = {}
  for variant in VARIANTS:
    targets = tuple(t for t in chosen(pipe, variant)
                    if t.kernel.split("/")[1] == "down_blocks_0" and t.kernel.split("/")[2] in FIRST_LAYER)
    out[variant] = targets, lora.param_spec(targets).init(jax.random.PRNGKey(0), pipe.params)
  return out


@pytest.fixture(scope="module")
def layer_params(inits):
  """{variant: jitted (first-layer base, trainable) -> the first layer's params the network sees
  (the method's transform)}."""
  def merge(spec):
    return jax.jit(lambda base, trainable: spec.apply(base, trainable)["unet"]["down_blocks_0"])
  return {variant: merge(lora.param_spec(targets)) for variant, (targets, _) in inits.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_leaves_are_literal(pipe, inits, variant):
  """Every target's leaves (names, shapes) on all 81 targets; values at Q and CONV: the zero half
  zero, DoRA's magnitude the norm of W per output feature."""
  shapes = abstract_init(chosen(pipe, variant), pipe)
  plain = {t.kernel for t in chosen(pipe, "lora")}
  assert {f"{p.split('/', 1)[1].rsplit('/', 1)[0]}/kernel" for p in shapes} == plain
  names = {n for leaves in LEAVES[variant].values() for n in leaves}
  assert {p.rsplit("/", 1)[1] for p in shapes} == names
  flat = tree.flatten(inits[variant][1])
  for target, leaves in LEAVES[variant].items():
    got = {p.rsplit("/", 1)[1]: v.shape for p, v in shapes.items() if p.startswith(f"lora/{target}/")}
    assert got == leaves
    for name in leaves:
      value = np.asarray(flat[f"lora/{target}/{name}"])
      assert value.shape == leaves[name] and (not value.any()) == (name in ZERO[variant]), name
  if variant == "dora":       # the magnitude starts at the norm of W per output feature
    w = np.asarray(tree.flatten(pipe.params)[f"{Q}/kernel"])
    np.testing.assert_allclose(flat[f"lora/{Q}/magnitude"], np.linalg.norm(w, axis=0), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_zero_reproduces_the_base(pipe, inits, layer_params, variant):
  """The first layer's params through the transform at init: LoKr and LoHa bit for bit (a zero
  half). DoRA: W * m / ||W|| with m = ||W|| from the init, where the compiled transform may sum
  the norm in another order: to an ulp of W. Every other leaf bit for bit."""
  targets, trainable = inits[variant]
  base = layer_base(pipe)
  got = tree.flatten(layer_params[variant](base, trainable))
  want = tree.flatten(base["unet"]["down_blocks_0"])
  assert got.keys() == want.keys()
  kernels = {t.kernel.split("/", 2)[2] for t in targets}
  assert len(kernels) == 11 and Q.split("/", 2)[2] + "/kernel" in kernels
  for p in want:
    if variant == "dora" and p in kernels:
      np.testing.assert_array_max_ulp(np.asarray(got[p]), np.asarray(want[p]), maxulp=2)
    else:
      assert np.array_equal(np.asarray(got[p]), np.asarray(want[p])), p


@pytest.fixture(scope="module")
def layer_loss(pipe):
  """(loss, gradient) of the first layer of down block 0 (UNetDownBlock with one layer: resnet,
  transformer, downsampler) as a function of its params: mean((layer(x, temb, ctx) - y)^2) on
  fixed random x, temb, ctx and y. Jitted once for the three variants: their transforms give
  params of the base's shapes."""
  c = dataclasses.replace(pipe.unet_config, layers_per_block=1)
  layer = UNetDownBlock(c, 0)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (1, 8, 8, c.block_out_channels[0]))
  temb = jax.random.normal(keys[1], (1, c.time_embed_dim))
  ctx = jax.random.normal(keys[2], (1, 8, c.cross_attention_dim))
  y = jax.random.normal(keys[3], (1, 4, 4, c.block_out_channels[0]))

  def loss(params):
    out, _ = layer.apply({"params": params}, x, temb, ctx)
    return jnp.mean(jnp.square(out - y))
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_falls(pipe, inits, layer_params, layer_loss, variant):
  """Adam on the variant's leaves only, the network's gradient pulled back through the method's
  transform: the loss falls at every one of 3 steps, every leaf moves (the zero half at the
  first step, the rest from the second) and the frozen params stay bit-identical."""
  _, trainable = inits[variant]
  base = layer_base(pipe)
  frozen_before = jax.tree.map(np.array, base)
  merge, tx = layer_params[variant], optax.adam(1e-2)

  @jax.jit
  def update(base, trainable, state, grads):   # grads: of the loss by the merged params
    pull = jax.vjp(lambda t: merge(base, t), trainable)[1]
    updates, state = tx.update(pull(grads)[0], state, trainable)
    return optax.apply_updates(trainable, updates), state

  current, state, losses = trainable, tx.init(trainable), []
  for _ in range(3):
    loss, grads = layer_loss(merge(base, current))
    losses.append(float(loss))
    current, state = update(base, current, state, grads)
  losses.append(float(layer_loss(merge(base, current))[0]))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  init, trained = tree.flatten(trainable), tree.flatten(current)
  still = [p for p in init if np.array_equal(np.asarray(trained[p]), np.asarray(init[p]))]
  assert not still, f"{len(still)} leaves never moved, e.g. {still[:3]}"
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(base)):
    assert np.array_equal(a, np.asarray(b))


# ---------------------------------------------------------------------------------------------
# bf16 (mixed_precision="bf16"): the frozen kernels are bf16 and the transform puts the variant's
# float32 update beside them (`lora_delta`), which Dense and Conv add before their one rounding.


def two_layers(dtype):
  """Q's Dense and CONV's Conv, as the UNet builds them, in `dtype`: {path: module}."""
  return {Q: nn.Dense(32, use_bias=False, dtype=dtype), CONV: conv(32, 3, dtype=dtype)}


def run_layers(params, dtype, xs):
  """{path: float32 output} of Q and CONV under low_rank_paths (params: flat, full paths)."""
  out = {}
  for path, layer in two_layers(dtype).items():
    p = {k.rsplit("/", 1)[1]: v for k, v in params.items() if k.rsplit("/", 1)[0] == path}
    with low_rank.low_rank_paths(), jax.default_matmul_precision("highest"):
      out[path] = np.asarray(layer.apply({"params": p}, xs[path]), np.float32)
  return out


def bf16_case(pipe, targets, trainable):
  """(params the bf16 step sees, the float32 merge of the same update on the bf16 kernels, the
  bf16 base, inputs): Q and CONV only, flat, full paths; inputs bf16-exact float32."""
  picked = tuple(t for t in targets if t.kernel in (f"{Q}/kernel", f"{CONV}/kernel"))
  flat = tree.flatten(pipe.params)
  base16 = {p: flat[p].astype(jnp.bfloat16) for p in flat if p.rsplit("/", 1)[0] in (Q, CONV)}
  spec = lora.param_spec(picked)
  leaves = {p: v for p, v in tree.flatten(trainable).items() if p.rsplit("/", 1)[0] in
            {t.key for t in picked}}
  seen = tree.flatten(spec.apply(tree.unflatten(base16), tree.unflatten(leaves)))
  base32 = jax.tree.map(lambda v: v.astype(jnp.float32), tree.unflatten(base16))
  merged32 = tree.flatten(spec.apply(base32, tree.unflatten(leaves)))
  rng = np.random.default_rng(4)
  xs = {Q: rng.standard_normal((64, 64, 32)), CONV: rng.standard_normal((32, 16, 16, 32))}
  xs = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in xs.items()}
  return seen, merged32, base16, xs


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_update_beside_the_kernel_equals_the_float32_merge(pipe, trained, variant):
  """A trained state's update (about a tenth of W): the bf16 kernel untouched, the update beside
  it in float32 and the kernel's shape; Q's and CONV's outputs on that path equal the float32
  layers on the float32 merge W + dW within one bf16 rounding of the output."""
  targets, trainable = trained[variant]
  seen, merged32, base16, xs = bf16_case(pipe, targets, trainable)
  for path in (Q, CONV):
    kernel, delta = seen[f"{path}/kernel"], seen[f"{path}/{low_rank.DELTA}"]
    assert kernel.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(kernel), np.asarray(base16[f"{path}/kernel"]))
    assert delta.dtype == jnp.float32 and delta.shape == kernel.shape
    assert np.abs(np.asarray(delta)).max() > 0.05 * np.abs(np.asarray(kernel, np.float32)).max()
  got, want = run_layers(seen, jnp.bfloat16, xs), run_layers(merged32, jnp.float32, xs)
  for path in (Q, CONV):
    np.testing.assert_allclose(got[path], want[path], rtol=2 ** -8,
                               atol=2 ** -9 * np.abs(want[path]).max(), err_msg=path)


def slope(change, reference):
  """Least-squares slope of an output change against the float32 change (1: kept on average)."""
  return float((change * reference).sum() / (reference * reference).sum())


def test_bf16_keeps_an_update_below_half_an_ulp(pipe, inits):
  """Step 0 with the zero half set to a tiny random value: an update of 3e-5 of |W| (what early
  steps make), below half a bf16 ulp of W in > 95% of its elements. Merged into the bf16 kernel
  it rounds away (the output change ~0 of the float32 merge's); beside the kernel the output
  change is the float32 merge's on average (slope 1), rounded once: the reason the path exists.
  The path is the same `lora_delta` for every variant: DoRA here, whose update is computed from
  the (bf16) kernel itself (LoKr's and LoHa's pass too, at slopes 0.95-1.05)."""
  variant = "dora"
  targets, trainable = inits[variant]
  flat = tree.flatten(trainable)
  rng = np.random.default_rng(5)
  zero = {f"lora/{p}/{n}": p for p in (Q, CONV) for n in ZERO[variant]}
  for path in zero:
    flat[path] = jnp.asarray(rng.standard_normal(flat[path].shape), jnp.float32)
  _, merged32, base16, _ = bf16_case(pipe, targets, tree.unflatten(flat))
  for path, layer in zero.items():     # the update is linear in the zero half (DoRA: to first order)
    w = np.asarray(base16[f"{layer}/kernel"], np.float32)
    size = np.linalg.norm(merged32[f"{layer}/kernel"] - w) / np.linalg.norm(w)
    flat[path] = flat[path] * 3e-5 / size
  seen, merged32, base16, xs = bf16_case(pipe, targets, tree.unflatten(flat))
  base32 = {p: np.asarray(v, np.float32) for p, v in base16.items()}
  no_update = {**seen, **{f"{p}/{low_rank.DELTA}": jnp.zeros_like(seen[f"{p}/{low_rank.DELTA}"])
                          for p in (Q, CONV)}}
  merged16 = {p: (jnp.asarray(v).astype(jnp.bfloat16) if p.endswith("kernel") else v)
              for p, v in merged32.items()}
  reference = {p: a - b for (p, a), b in zip(run_layers(merged32, jnp.float32, xs).items(),
                                            run_layers(base32, jnp.float32, xs).values())}
  beside = {p: a - b for (p, a), b in zip(run_layers(seen, jnp.bfloat16, xs).items(),
                                         run_layers(no_update, jnp.bfloat16, xs).values())}
  merge = {p: a - b for (p, a), b in zip(run_layers(merged16, jnp.bfloat16, xs).items(),
                                        run_layers(base16, jnp.bfloat16, xs).values())}
  for path in (Q, CONV):
    kernel = np.asarray(base16[f"{path}/kernel"])
    assert np.mean(np.asarray(merged16[f"{path}/kernel"]) == kernel) > 0.95, path
    assert abs(slope(merge[path], reference[path])) < 0.2, path
    assert 0.9 < slope(beside[path], reference[path]) < 1.1, path


@slow
def test_lokr_options_match_lycoris_modules(pipe):
  """factor, decompose_both and full_matrix give LyCORIS LokrModule's parameter shapes (a linear
  96 -> 160 and a 3x3 conv)."""
  require_torch()
  import torch
  from lycoris.modules.lokr import LokrModule
  for layer, ours in ((torch.nn.Linear(96, 160), (96, 160)),
                      (torch.nn.Conv2d(96, 160, 3), (3, 3, 96, 160))):
    for options in (dict(), dict(factor=8), dict(decompose_both=True), dict(full_matrix=True),
                    dict(factor=4, decompose_both=True)):
      for rank in (1, 2, 8):
        module = LokrModule("x", layer, lora_dim=rank, alpha=1, **options)
        want = {n: tuple(p.shape) for n, p in module.named_parameters() if n.startswith("lokr_")}
        assert lv.lokr_shapes(ours, rank, **options) == want, (ours, options, rank)


def test_variant_options_are_checked(pipe):
  with pytest.raises(ConfigError, match="method.variant: 'lycoris' is not one of lora, dora, lokr, loha"):
    chosen(pipe, "lycoris")
  with pytest.raises(ConfigError, match="method.factor / decompose_both / full_matrix are LoKr's"):
    chosen(pipe, "loha", factor=4)


# ---------------------------------------------------------------------------------------------
# The training bar: one run, its targets' variants mixed by block (down: DoRA, mid: LoKr, up: LoHa).


@pytest.fixture(scope="module")
def run(model_dirs):
  from persona_jax.train.optim import make_optimizer
  base = loop.build(lora_config(model_dirs["sd1"], method=dict(name="lora", rank=2, conv_rank=2,
                                                               variant="lokr")),
                    mesh=one_device_mesh())
  variant = lambda k: "dora" if "down_blocks" in k else "loha" if "up_blocks" in k else "lokr"  # noqa: E731
  targets = lora.targets(lora.LoRAConfig(rank=2, conv_rank=2, variant="lokr"), base.pipe.params,
                         base.pipe.unet_config)
  mixed = tuple(dataclasses.replace(t, variant=variant(t.kernel), lokr=t.lokr if variant(t.kernel) == "lokr"
                                    else ()) for t in targets)
  method = Method(name="lora", params=lora.param_spec(mixed))
  trainable = method.params.init(jax.random.PRNGKey(1), base.pipe.params)
  tx, schedule = make_optimizer(base.config.optim, trainable, total_steps=base.config.steps,
                                batch_size=base.config.batch_size, class_rows=False)
  return dataclasses.replace(base, method=method, trainable=trainable, tx=tx, schedule=schedule)


@slow
def test_training_bar_on_mixed_variants(run):
  """lr 0 moves nothing; every leaf of every variant moves (gets a gradient: zero halves from the
  second step); the loss falls; the frozen UNet stays bit-identical. The default suite covers this
  per variant on the first layer of down block 0 (test_loss_falls, test_step_zero_reproduces_the_base)."""
  trajectory = fixed_batch_trajectory(run, steps=4)
  names = {p.rsplit("/", 1)[1] for p in tree.flatten(run.trainable)}
  assert names == {"a", "b", "magnitude", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "hada_w1_a",
                   "hada_w1_b", "hada_w2_a", "hada_w2_b"}
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]),
                                                  jax.tree.leaves(run.trainable)))
  init = tree.flatten(run.trainable)
  still = [p for p, v in tree.flatten(trajectory["trained"]).items() if np.array_equal(v, init[p])]
  assert not still, f"{len(still)} leaves never got a gradient, e.g. {still[:3]}"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Files.


# A trained state's scale per leaf: about the init's, the zero halves at 0.05.
TRAINED_STD = {"a": 0.5, "b": 0.05, "lokr_w1": 0.3, "lokr_w2_a": 0.3, "lokr_w2_b": 0.05,
               "hada_w1_a": 0.1, "hada_w1_b": 1.0, "hada_w2_a": 0.05, "hada_w2_b": 1.0}


@pytest.fixture(scope="module")
def trained(pipe):
  """{variant: (all 81 targets, a trained state: every leaf non-zero, N(0, TRAINED_STD), DoRA's
  magnitude ||W|| (1 + 0.1 N) per output feature)}; drawn with numpy on the init's shapes."""
  out = {}
  rng = np.random.default_rng(0)
  base = tree.flatten(pipe.params)
  for variant in VARIANTS:
    targets = chosen(pipe, variant)

    def draw(path, leaf):
      name = path.rsplit("/", 1)[1]
      if name == "magnitude":
        w = np.asarray(base[f"{path[len('lora/'):].rsplit('/', 1)[0]}/kernel"])
        norm = np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0)
        return (norm * (1 + 0.1 * rng.standard_normal(leaf.shape))).astype(np.float32)
      return (TRAINED_STD[name] * rng.standard_normal(leaf.shape)).astype(np.float32)
    out[variant] = targets, tree.unflatten({p: draw(p, v) for p, v in abstract_init(targets, pipe).items()})
  return out


@pytest.fixture(scope="module")
def results(pipe, trained, tmp_path_factory):
  """{variant: (our result file, the training transform's merged params (flat), the file's
  factors read back)}."""
  out = {}
  for variant, (targets, trainable) in trained.items():
    flat = tree.flatten(trainable)
    factors = {t.key[len("lora/"):]: ({n: flat[f"{t.key}/{n}"] for n in lv.LEAVES[t.variant]
                                       if f"{t.key}/{n}" in flat}, t.alpha) for t in targets}
    path = lf.write_ours(tmp_path_factory.mktemp(variant) / lora.RESULT_FILE, factors, {})
    params = tree.flatten(jax.jit(lora.param_spec(targets).apply)(pipe.params, trainable))
    out[variant] = path, params, lf.load_lora_file(path, pipe.params)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_result_file_round_trip_merges_as_training_did(pipe, trained, results, variant):
  targets, _ = trained[variant]
  path, params, factors = results[variant]
  assert {type(f) for f in factors.values()} == {{"dora": lv.DoRAFactor, "lokr": lv.LoKrFactor,
                                                   "loha": lv.LoHaFactor}[variant]}
  got = tree.flatten(merged(pipe, factors))
  base = tree.flatten(pipe.params)
  for t in targets:
    np.testing.assert_allclose(np.asarray(got[t.kernel]), np.asarray(params[t.kernel]), rtol=1e-6,
                               atol=1e-7, err_msg=t.kernel)
    assert not np.allclose(np.asarray(got[t.kernel]), np.asarray(base[t.kernel]))


@pytest.mark.parametrize("fmt, variant", [("kohya", "dora"), ("kohya", "lokr"), ("kohya", "loha"),
                                          ("peft", "dora")])
def test_export_round_trip(pipe, results, tmp_path, fmt, variant):
  path, params, factors = results[variant]
  if fmt == "peft":
    tensors, metadata = lf.peft_state_dict(factors, pipe.params)
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == len(factors)
  else:
    tensors, metadata = lf.kohya_state_dict(factors, pipe.params, base_version="sd_v1")
    suffixes = {k.split(".", 1)[1] for k in tensors}
    assert suffixes == {"dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
                        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
                        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}[variant]
  save_file(tensors, str(tmp_path / "x.safetensors"), metadata=metadata)
  back = lf.read_lora_file(tmp_path / "x.safetensors", pipe.params)
  assert set(back) == set(factors)
  want, got = tree.flatten(merged(pipe, factors)), tree.flatten(merged(pipe, back))
  for p in factors:
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-6, atol=1e-6)
  if variant != "dora":
    with pytest.raises(ConfigError, match="export LoKr/LoHa with --format kohya"):
      lf.peft_state_dict(factors, pipe.params)


@pytest.fixture(scope="module")
def torch_unet(model_dirs):
  require_torch()
  from diffusers import UNet2DConditionModel
  return lambda: UNet2DConditionModel.from_pretrained(model_dirs["sd1"] / "unet")


def unet_outputs(unet, pipe, ctx):
  import torch
  _, x, t = inputs(pipe)
  from persona_jax.verify import nchw
  with torch.no_grad():
    return unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


@slow
def test_diffusers_loads_our_dora_and_matches_us(pipe, results, model_dirs, tmp_path):
  """DoRA in the PEFT layout through StableDiffusionPipeline.load_lora_weights (PEFT's DoRA layers
  on attention linears and LoCon convs), unfused and fused, against our merged UNet."""
  require_torch()
  from diffusers import StableDiffusionPipeline
  from peft.tuners.lora import LoraLayer
  _, params, factors = results["dora"]
  tensors, metadata = lf.peft_state_dict(factors, pipe.params)
  save_file(tensors, str(tmp_path / lf.PEFT_FILE), metadata=metadata)
  ref = StableDiffusionPipeline.from_pretrained(model_dirs["sd1"], safety_checker=None)
  ids, x, t = inputs(pipe)
  base_ctx, base_eps = outputs_torch(ref, ids, x, t)
  ref.load_lora_weights(str(tmp_path), weight_name=lf.PEFT_FILE)
  layers = [m for m in ref.unet.modules() if isinstance(m, LoraLayer)]
  assert len(layers) == len(factors) and all(m.use_dora["default_0"] for m in layers)
  _, eps = outputs_torch(ref, ids, x, t)
  ours = tree.unflatten({**tree.flatten(pipe.params), **{p: params[p] for p in factors}})
  _, our_eps = outputs_ours(pipe, ours, ids, x, t)
  assert np.abs(our_eps - base_eps).max() > 1e-2
  np.testing.assert_allclose(our_eps, eps, atol=2e-4, rtol=1e-3)
  ref.fuse_lora()
  _, eps = outputs_torch(ref, ids, x, t)
  np.testing.assert_allclose(our_eps, eps, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", [pytest.param("dora", marks=slow), pytest.param("lokr", marks=slow),
                                     "loha"])
def test_lycoris_loads_our_kohya_file_and_matches_us(pipe, results, torch_unet, variant):
  """The kohya/LyCORIS file read by lycoris.create_lycoris_from_weights onto diffusers' UNet of
  the same random model (LoCon+DoRA, LoKr, LoHa modules, each on every target), against a copy of
  that UNet holding our merge of the file (our UNet equals diffusers' on the same weights:
  tests/models/test_parity.py). LoHa runs by default; LoKr and DoRA are the same loader on other
  modules (LoKr's update against LyCORIS's runs by default on SDXL:
  test_sdxl_updates_match_lycoris_functions[lokr]; DoRA's outside loaders are both slow: here and
  test_diffusers_loads_our_dora_and_matches_us)."""
  import torch
  from lycoris import create_lycoris_from_weights
  from lycoris.wrapper import LycorisNetwork

  from persona_jax.convert.diffusers import params_to_state_dict
  _, _, factors = results[variant]
  tensors, _ = lf.kohya_state_dict(factors, pipe.params, base_version="sd_v1")
  unet = torch_unet()
  ours = copy.deepcopy(unet)
  ours.load_state_dict({k: torch.from_numpy(np.array(v))
                        for k, v in params_to_state_dict(merged(pipe, factors)["unet"]).items()})
  ctx = np.random.default_rng(6).standard_normal((1, 77, pipe.unet_config.cross_attention_dim))
  ctx = ctx.astype(np.float32)
  base_eps = unet_outputs(unet, pipe, ctx)
  # LyCORIS's generic loader names modules `<LORA_PREFIX>_<module path>`: kohya's lora_unet_.
  prefix = f"{LycorisNetwork.LORA_PREFIX}_"
  weights = {prefix + k[len("lora_unet_"):]: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
  network, _ = create_lycoris_from_weights(1.0, None, unet, weights_sd=weights)
  kinds = {"dora": "LoConModule", "lokr": "LokrModule", "loha": "LohaModule"}
  assert [type(m).__name__ for m in network.loras] == [kinds[variant]] * len(factors)
  network.apply_to()
  eps, our_eps = unet_outputs(unet, pipe, ctx), unet_outputs(ours, pipe, ctx)
  assert np.abs(our_eps - base_eps).max() > 1e-2
  np.testing.assert_allclose(our_eps, eps, atol=2e-4, rtol=1e-3)


def test_sample_reads_every_variant(pipe, results, tmp_path):
  """`sample --lora FILE` (lora_compose.with_loras) on our result files and the kohya exports,
  at weight 0.5: the variant's update halved (DoRA: W + 0.5 (W_dora - W), ComfyUI's rule)."""
  from persona_jax.methods.lora_compose import LoRASpec, with_loras
  base = tree.flatten(pipe.params)
  for variant in VARIANTS:
    path, params, factors = results[variant]
    got = tree.flatten(with_loras(pipe.params, [LoRASpec.parse(f"{path}:0.5")], pipe.unet_config))
    for p in factors:
      want = np.asarray(base[p]) + 0.5 * (np.asarray(params[p]) - np.asarray(base[p]))
      np.testing.assert_allclose(np.asarray(got[p]), want, rtol=1e-5, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("variant", ["lokr", pytest.param("loha", marks=slow)])
def test_sdxl_updates_match_lycoris_functions(sdxl_pipe, tmp_path, variant):
  """On SDXL (kohya's SGM names, lora_te1_/lora_te2_): random factors on attention, LoCon convs and
  both text encoders go through the kohya file and back, and each layer's update equals
  LyCORIS's functional diff_weight of the file's own tensors. LoKr runs by default; LoHa goes
  through the same name map, and its update against LyCORIS's runs by default on SD 1.x
  (test_lycoris_loads_our_kohya_file_and_matches_us[loha])."""
  require_torch()
  import torch
  from lycoris.functional import loha as lyco_loha, lokr as lyco_lokr
  pipe = sdxl_pipe
  targets = lora.targets(lora.LoRAConfig(rank=2, conv_rank=2, variant=variant, text_encoder=True,
                                         alpha=3.0), pipe.params, pipe.unet_config)
  rng = np.random.default_rng(1)
  flat = {p: (TRAINED_STD[p.rsplit("/", 1)[1]] * rng.standard_normal(v.shape)).astype(np.float32)
          for p, v in abstract_init(targets, pipe).items()}
  factors = {t.kernel: lv.make_factor({n: flat[f"{t.key}/{n}"] for n in lv.LEAVES[variant]
                                       if f"{t.key}/{n}" in flat}, t.alpha, t.shape, t.kernel)
             for t in targets}
  tensors, metadata = lf.kohya_state_dict(factors, pipe.params, base_version="sdxl_base_v1-0")
  assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
  assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
  save_file(tensors, str(tmp_path / "x.safetensors"), metadata=metadata)
  back = lf.read_lora_file(tmp_path / "x.safetensors", pipe.params)
  names, shapes = lf.kohya_names(pipe.params), {t.kernel: t.shape for t in targets}
  assert set(back) == set(factors)
  # Every layer's update in one compiled function (eager, the 153 layers' ops compile one by one).
  updates = jax.jit(lambda fs: {p: f.update(jnp.zeros(shapes[p], jnp.float32)) for p, f in fs.items()})(back)
  for path, f in back.items():
    name = names[path]
    get = lambda k: torch.from_numpy(tensors[f"{name}.{k}"]) if f"{name}.{k}" in tensors else None  # noqa: E731
    alpha = float(tensors[f"{name}.alpha"])
    if variant == "lokr":
      want = lyco_lokr.diff_weight(*(get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                      "lokr_w2_a", "lokr_w2_b")), None, gamma=alpha)
    else:
      rank = get("hada_w1_b").shape[0]
      want = lyco_loha.diff_weight(get("hada_w1_b"), get("hada_w1_a"), get("hada_w2_b"),
                                   get("hada_w2_a"), None, None, gamma=alpha / rank)
    ours = np.asarray(updates[path])
    out, cin = shapes[path][-1], shapes[path][-2]
    torch_ours = ours.T if ours.ndim == 2 else ours.transpose(3, 2, 0, 1).reshape(out, -1)
    np.testing.assert_allclose(torch_ours, want.reshape(out, -1).numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=path)
    assert cin * np.prod(shapes[path][:-2], dtype=int) == torch_ours.shape[1]
