"""LoRA variants (`method.variant`: DoRA, LoKr, LoHa; methods/lora_variants.py) on the sd1 random
model: literal trainable leaves, step 0 is the base bit for bit, the training bar (one run whose
targets mix the three variants by block, on the real train step), round trips through our file
and the exports, and outside loaders: diffusers' `load_lora_weights` for DoRA in the PEFT layout,
LyCORIS's own kohya loader for DoRA, LoKr and LoHa (their outputs against ours). SDXL: the
per-layer updates against LyCORIS's functions through the SDXL kohya names."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from persona_jax import ConfigError, tree
from persona_jax.convert import lora_formats as lf
from persona_jax.methods import lora, lora_variants as lv
from persona_jax.methods.base import Method
from persona_jax.train import loop
from tests.convert.test_lora_formats import inputs, merged, outputs_ours, outputs_torch
from tests.markers import slow
from tests.runs import fixed_batch_trajectory, lora_config, one_device_mesh
from tests.torch_reference import require_torch

VARIANTS = ("dora", "lokr", "loha")
Q = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"      # [32, 32]
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


@pytest.fixture(scope="module")
def pipe(pipes):
  return pipes["sd1"]


def chosen(pipe, variant, **options):
  config = lora.LoRAConfig(rank=2, conv_rank=2, variant=variant, **options)
  return lora.targets(config, pipe.params, pipe.unet_config)


@pytest.fixture(scope="module")
def inits(pipe):
  """{variant: (targets, initial trainable tree)}."""
  out = {}
  for variant in VARIANTS:
    targets = chosen(pipe, variant)
    out[variant] = targets, lora.param_spec(targets).init(jax.random.PRNGKey(0), pipe.params)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_leaves_are_literal(pipe, inits, variant):
  targets, trainable = inits[variant]
  flat = tree.flatten(trainable)
  plain = {t.kernel for t in chosen(pipe, "lora")}
  assert {f"{p.split('/', 1)[1].rsplit('/', 1)[0]}/kernel" for p in flat} == plain
  for target, leaves in LEAVES[variant].items():
    got = {p.rsplit("/", 1)[1]: v.shape for p, v in flat.items() if p.startswith(f"lora/{target}/")}
    assert got == leaves
    for name in leaves:
      value = np.asarray(flat[f"lora/{target}/{name}"])
      assert (not value.any()) == (name in ZERO[variant]), name
  names = {p.rsplit("/", 1)[1] for p in flat}
  assert names == {n for leaves in LEAVES[variant].values() for n in leaves}
  if variant == "dora":       # the magnitude starts at the norm of W per output feature
    w = np.asarray(tree.flatten(pipe.params)[f"{Q}/kernel"])
    np.testing.assert_allclose(flat[f"lora/{Q}/magnitude"], np.linalg.norm(w, axis=0), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_zero_reproduces_the_base(pipe, inits, variant):
  """LoKr and LoHa: bit for bit (a zero half). DoRA: W * m / ||W|| with m = ||W|| from the init,
  where the compiled step may sum the norm in another order: to an ulp of W."""
  targets, trainable = inits[variant]
  params = tree.flatten(jax.jit(lora.param_spec(targets).apply)(pipe.params, trainable))
  base = tree.flatten(pipe.params)
  for t in targets:
    got, want = np.asarray(params[t.kernel]), np.asarray(base[t.kernel])
    if variant == "dora":
      np.testing.assert_array_max_ulp(got, want, maxulp=2)
    else:
      assert np.array_equal(got, want), t.kernel


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
  second step); the loss falls; the frozen UNet stays bit-identical."""
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


@pytest.fixture(scope="module")
def trained(pipe, inits):
  """{variant: (targets, trainable tree with every leaf non-zero: a trained state)}."""
  out = {}
  rng = np.random.default_rng(0)
  for variant, (targets, trainable) in inits.items():
    def perturb(path, x):
      x = np.asarray(x)
      if path.endswith("magnitude"):
        return (x * (1 + 0.1 * rng.standard_normal(x.shape))).astype(np.float32)
      return (x + 0.1 * rng.standard_normal(x.shape) * max(np.abs(x).max(), 0.3)).astype(np.float32)
    out[variant] = targets, tree.unflatten({p: perturb(p, v) for p, v in tree.flatten(trainable).items()})
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
    params = tree.flatten(lora.param_spec(targets).apply(pipe.params, trainable))
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


@pytest.mark.parametrize("variant", [pytest.param("dora", marks=slow), "lokr",
                                     pytest.param("loha", marks=slow)])
def test_lycoris_loads_our_kohya_file_and_matches_us(pipe, results, torch_unet, variant):
  """The kohya/LyCORIS file read by lycoris.kohya.create_network_from_weights onto diffusers' UNet
  of the same random model (LoCon+DoRA, LoKr, LoHa modules, each on every target), against our
  UNet with the file merged."""
  import torch
  from lycoris import create_lycoris_from_weights
  from lycoris.wrapper import LycorisNetwork
  _, params, factors = results[variant]
  tensors, _ = lf.kohya_state_dict(factors, pipe.params, base_version="sd_v1")
  unet = torch_unet()
  ids, x, t = inputs(pipe)
  ctx = np.asarray(pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids).last_hidden_state)
  base_eps = unet_outputs(unet, pipe, ctx)
  # LyCORIS's generic loader names modules `<LORA_PREFIX>_<module path>`: kohya's lora_unet_.
  prefix = f"{LycorisNetwork.LORA_PREFIX}_"
  weights = {prefix + k[len("lora_unet_"):]: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
  network, _ = create_lycoris_from_weights(1.0, None, unet, weights_sd=weights)
  kinds = {"dora": "LoConModule", "lokr": "LokrModule", "loha": "LohaModule"}
  assert [type(m).__name__ for m in network.loras] == [kinds[variant]] * len(factors)
  network.apply_to()
  eps = unet_outputs(unet, pipe, ctx)
  with jax.default_matmul_precision("highest"):
    our_eps = np.asarray(pipe.unet.apply({"params": merged(pipe, factors)["unet"]}, x, t, jnp.asarray(ctx)))
  from persona_jax.verify import nchw
  our_eps = nchw(our_eps)
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


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_sdxl_updates_match_lycoris_functions(sdxl_pipe, tmp_path, variant):
  """On SDXL (kohya's SGM names, lora_te1_/lora_te2_): random factors on attention, LoCon convs and
  both text encoders go through the kohya file and back, and each layer's update equals
  LyCORIS's functional diff_weight of the file's own tensors."""
  require_torch()
  import torch
  from lycoris.functional import loha as lyco_loha, lokr as lyco_lokr
  pipe = sdxl_pipe
  targets = lora.targets(lora.LoRAConfig(rank=2, conv_rank=2, variant=variant, text_encoder=True,
                                         alpha=3.0), pipe.params, pipe.unet_config)
  trainable = lora.param_spec(targets).init(jax.random.PRNGKey(2), pipe.params)
  rng = np.random.default_rng(1)
  flat = {p: (np.asarray(v) + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
          for p, v in tree.flatten(trainable).items()}
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
    ours = np.asarray(f.update(jnp.zeros(shapes[path], jnp.float32)))
    out, cin = shapes[path][-1], shapes[path][-2]
    torch_ours = ours.T if ours.ndim == 2 else ours.transpose(3, 2, 0, 1).reshape(out, -1)
    np.testing.assert_allclose(torch_ours, want.reshape(out, -1).numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=path)
    assert cin * np.prod(shapes[path][:-2], dtype=int) == torch_ours.shape[1]
