"""Sampling with LoRA files: the file format, merging several with per-block weights (traced:
no recompiles), block-weight strings, and `persona-jax sample --lora`."""


import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from persona_jax import ConfigError, PersonaError, tree
from persona_jax.cli import main
from persona_jax.convert.lora_formats import load_lora_file
from persona_jax.methods.lora_compose import LoRASpec, apply_loras, block_weights, merge_loras
from persona_jax.methods.base import ResultContext
from persona_jax.methods.registry import make_method
from persona_jax.models import block_names
from persona_jax.models.configs import UNetConfig
from persona_jax.text_to_image import SampleOptions, Sampling, text_to_image
from tests.runs import lora_config

# LoRA A: the method's result file (kohya set, LoCon, text encoder; MID: alpha 1, rank 2).
METHOD_A = dict(name="lora", rank=2, conv_rank=2, text_encoder=True, targets=("kohya",),
                block_alphas={"MID": 1.0})
# LoRA B, written by hand: rank 3, alpha 1.5, on some of A's targets (one per kind of block) and
# conv_in, which A does not target.
TARGETS_B = ("unet/conv_in",                                                           # IN00
             "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k",      # IN01
             "unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q",           # MID
             "unet/up_blocks_0/resnets_1/conv1",                                       # OUT01 (conv)
             "unet/up_blocks_1/attentions_2/proj_out",                                 # OUT05
             "text_encoder/encoder/layers_0/self_attn/q_proj")                        # BASE


@pytest.fixture(scope="module")
def pipe(pipes):
  return pipes["sd1"]


@pytest.fixture(scope="module")
def lora_a(pipe, model_dirs, tmp_path_factory):
  """(method, trainable with random non-zero factors, the file the method's save wrote)."""
  method = make_method("lora", {k: v for k, v in METHOD_A.items() if k != "name"}, pipe.params,
                       pipe.tokenizer_dir, pipe.unet_config)
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                           method.params.init(jax.random.PRNGKey(0), pipe.params))
  # What save reads of a run (loop.build would cost ~12 s of data and optimizer set-up).
  context = ResultContext(tmp_path_factory.mktemp("lora_a"), pipe, model_dirs["sd1"],
                          lora_config(model_dirs["sd1"], method=METHOD_A), None)
  [path] = method.save(trainable, context)
  return method, trainable, path


@pytest.fixture(scope="module")
def lora_b(pipe, tmp_path_factory):
  base = tree.flatten(pipe.params)
  rng = np.random.default_rng(1)
  tensors = {}
  for t in TARGETS_B:
    shape = base[f"{t}/kernel"].shape
    tensors[f"{t}/a"] = 0.1 * rng.standard_normal((int(np.prod(shape[:-1])), 3)).astype(np.float32)
    tensors[f"{t}/b"] = 0.1 * rng.standard_normal((3, shape[-1])).astype(np.float32)
    tensors[f"{t}/alpha"] = np.asarray(1.5, np.float32)
  path = tmp_path_factory.mktemp("lora_b") / "b.safetensors"
  save_file(tensors, str(path))
  return path


def numpy_merge(base_params, files, weights, unet_config):
  """W + sum_i weights[i, block(W)] * alpha_i / r_i * reshape(a_i @ b_i), from the raw files."""
  from safetensors.numpy import load_file
  flat = {p: np.asarray(v, np.float64) for p, v in tree.flatten(base_params).items()}
  blocks = block_names.all_blocks(unet_config)
  for i, f in enumerate(files):
    t = load_file(str(f))
    for key in [k[:-2] for k in t if k.endswith("/a")]:
      kernel = f"{key}/kernel"
      a, b = t[f"{key}/a"].astype(np.float64), t[f"{key}/b"].astype(np.float64)
      k = blocks.index(block_names.param_block(kernel, unet_config))
      scale = float(t[f"{key}/alpha"]) / b.shape[0]
      flat[kernel] = flat[kernel] + weights[i, k] * scale * (a @ b).reshape(flat[kernel].shape)
  return flat


def random_weights(n, unet_config, seed):
  shape = (n, len(block_names.all_blocks(unet_config)))
  return np.random.default_rng(seed).uniform(-1.0, 2.0, shape).astype(np.float32)


def test_file_holds_alpha_and_reads_back(pipe, lora_a):
  method, trainable, path = lora_a
  factors = load_lora_file(path, pipe.params)
  flat = tree.flatten(trainable)
  assert set(factors) == {k[len("lora/"):-len("/a")] + "/kernel" for k in flat if k.endswith("/a")}
  mid = "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  up = "unet/up_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  assert float(factors[mid].scale) == 0.5 and float(factors[up].scale) == 1.0
  np.testing.assert_array_equal(factors[mid].a, flat["lora/" + mid[:-len("/kernel")] + "/a"])


def test_one_lora_at_weight_one_is_the_method_transform(pipe, lora_a):
  method, trainable, path = lora_a
  ones = np.ones((1, len(block_names.all_blocks(pipe.unet_config))), np.float32)
  got = tree.flatten(apply_loras(pipe.params, [load_lora_file(path, pipe.params)], ones,
                                 pipe.unet_config))
  base = tree.flatten(pipe.params)
  want = {p: v for p, v in tree.flatten(method.params.apply(pipe.params, trainable)).items()
          if p in base}                   # the merged tree also holds the lora/ leaves
  assert set(got) == set(want)
  changed = 0
  for p, w in want.items():
    np.testing.assert_allclose(np.asarray(got[p]), np.asarray(w), rtol=1e-6, atol=1e-6, err_msg=p)
    if got[p] is base[p]:
      continue                            # untargeted leaves are the base's own arrays (no copy)
    changed += 1
  assert changed == len(load_lora_file(path))


def test_two_loras_with_block_weights_equal_a_numpy_merge(pipe, lora_a, lora_b):
  files = [lora_a[2], lora_b]
  weights = random_weights(2, pipe.unet_config, seed=0)
  got = tree.flatten(apply_loras(pipe.params, [load_lora_file(f, pipe.params) for f in files],
                                 weights, pipe.unet_config))
  want = numpy_merge(pipe.params, files, weights, pipe.unet_config)
  assert set(got) == set(want)
  for p in got:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=1e-5, atol=1e-5, err_msg=p)


def test_changing_weights_does_not_recompile(pipe, lora_a, lora_b):
  loras = [load_lora_file(f, pipe.params) for f in (lora_a[2], lora_b)]
  key = "unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
  first = apply_loras(pipe.params, loras, random_weights(2, pipe.unet_config, 1), pipe.unet_config)
  compiled = merge_loras._cache_size()
  outputs = [tree.flatten(first)[key]]
  for seed in (2, 3):
    params = apply_loras(pipe.params, loras, random_weights(2, pipe.unet_config, seed),
                         pipe.unet_config)
    outputs.append(tree.flatten(params)[key])
  assert merge_loras._cache_size() == compiled
  assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_block_weight_strings():
  sd15 = UNetConfig()                   # SD 1.x: the 26 and 17 presets of the extension
  blocks = block_names.all_blocks(sd15)
  assert len(blocks) == 26
  w = dict(zip(blocks, block_weights("IN01=0, out03=0.5,M00=2,BASE=-1", sd15)))
  assert (w["IN01"], w["OUT03"], w["MID"], w["BASE"]) == (0.0, 0.5, 2.0, -1.0)
  assert all(v == 1.0 for b, v in w.items() if b not in ("IN01", "OUT03", "MID", "BASE"))
  # The extension's OUTD preset (17 values): blocks outside the 17 get 0, as its to26() fills them.
  w = dict(zip(blocks, block_weights("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", sd15)))
  assert [b for b, v in w.items() if v == 1] == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
  np.testing.assert_array_equal(block_weights("outd", sd15), list(w.values()))   # by name
  values = [i / 10 for i in range(26)]
  np.testing.assert_allclose(block_weights(",".join(map(str, values)), sd15), values, rtol=1e-6)


# sd-webui-lora-block-weight (scripts/lora_block_weight.py): its block ids and to26(), which
# places a 17-value list in the 26 blocks and leaves the others at 0.
BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
             "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def extension_to26(ratios):
  if len(ratios) == 26:
    return ratios
  output = [0] * 26
  for i, block in enumerate(BLOCKID17):
    output[BLOCKID26.index(block)] = ratios[i]
  return output


@pytest.mark.parametrize("preset", sorted(block_names.LBW_PRESETS) + ["random17"])
def test_17_block_weights_are_the_extensions_to26(preset):
  """17 values (a preset's or the user's) weigh the 26 blocks as the extension does: the 9 blocks
  outside the 17 (IN00, IN03, IN06, IN09-11, OUT00-02) are off, which shows with LoCon."""
  sd15 = UNetConfig()
  if preset == "random17":
    values = [round(float(v), 3) for v in np.random.default_rng(0).uniform(-1, 2, 17)]
    spec = ",".join(map(str, values))
  else:
    values, spec = block_names.LBW_PRESETS[preset], preset
  np.testing.assert_allclose(block_weights(spec, sd15), extension_to26(list(values)), rtol=1e-6)
  # The same blocks gate which blocks a LoRA trains (method.blocks).
  trained = {b for b, v in block_names.block_values(spec, sd15, "method.blocks").items() if v}
  assert trained == {BLOCKID26[i].replace("M00", "MID") for i, v in
                     enumerate(extension_to26(list(values))) if v}


@pytest.mark.parametrize("spec, message", [
    ("IN01=x", r"blocks: 'IN01=x': 'x' is not a number"),
    ("IN01=0,0.5", r"blocks: '0.5' is not NAME=VALUE"),
    ("IN99=1", r"blocks: block 'IN99' does not exist"),
    ("IN01=1,in01=0", r"blocks: 'in01=0': block IN01 is given twice"),
    ("1,1,1", r"blocks: 3 numbers; give 26 .* or 17"),
    ("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,nan,0", r"blocks: 'nan': 'nan' is not a number"),
])
def test_bad_block_weight_string_names_the_entry(spec, message):
  with pytest.raises(ConfigError, match=message):
    block_weights(spec, UNetConfig())


def test_lora_argument_syntax(tmp_path):
  a, odd = tmp_path / "a.safetensors", tmp_path / "odd:0.5"
  a.touch()
  odd.touch()
  assert LoRASpec.parse(str(a)) == LoRASpec(a)
  assert LoRASpec.parse(str(odd)) == LoRASpec(odd)        # an existing file is taken whole
  assert LoRASpec.parse(f"{a}:0.8") == LoRASpec(a, 0.8)
  assert LoRASpec.parse(f"{a}:-1:IN01=0,MID=0.5") == LoRASpec(a, -1.0, "IN01=0,MID=0.5")
  with pytest.raises(ConfigError, match=":IN01=0: not a file, nor FILE:WEIGHT"):
    LoRASpec.parse(f"{a}:IN01=0")
  with pytest.raises(PersonaError, match=r"--lora .*b.safetensors:2: .*b.safetensors: no such file"):
    LoRASpec.parse(f"{tmp_path}/b.safetensors:2")


def write_bad(folder, tensors, name="bad.safetensors"):
  path = folder / name
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
  return path


Q = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"   # kernel [32, 32]


@pytest.mark.parametrize("tensors, message", [
    ({f"{Q}/a": np.ones((32, 2))}, f"'{Q}/b' is missing"),
    ({f"{Q}/a": np.ones((32, 2)), f"{Q}/b": np.ones((3, 32))},
     rf"'{Q}/a' \[32, 2\] and '{Q}/b' \[3, 32\] are not \[fan_in, r\] and \[r, out\]"),
    ({f"{Q}/a": np.ones((16, 2)), f"{Q}/b": np.ones((2, 32))},
     rf"'{Q}/a' @ '{Q}/b' is \[16, 32\]; the base kernel \[32, 32\] needs \[32, 32\]"),
    ({"unet/nowhere/a": np.ones((4, 2)), "unet/nowhere/b": np.ones((2, 4))},
     "'unet/nowhere/a': the base model has no kernel unet/nowhere/kernel"),
    ({f"{Q}/a": np.ones((32, 2)), f"{Q}/b": np.ones((2, 32)), f"{Q}/alpha": np.ones(2)},
     f"'{Q}/alpha' must be a finite scalar"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((2, 32)),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.ones(())},
     "key 'lora_unet_down_blocks_0_attentions_0_proj_in.alpha' is not a persona_jax LoRA key"),
])
def test_malformed_file_is_a_clear_error(pipe, tmp_path, tensors, message):
  path = write_bad(tmp_path, tensors)
  with pytest.raises(PersonaError, match=f"{tmp_path}/bad.safetensors: {message}"):
    load_lora_file(path, pipe.params)


def test_pickle_and_missing_files_are_refused(tmp_path):
  (tmp_path / "a.pt").write_bytes(b"not read")
  with pytest.raises(PersonaError, match=r"a.pt: LoRA files are read as .safetensors only"):
    load_lora_file(tmp_path / "a.pt")
  with pytest.raises(PersonaError, match=r"b.safetensors: LoRA file not found"):
    load_lora_file(tmp_path / "b.safetensors")


def test_sample_command_with_two_loras(pipe, model_dirs, lora_a, lora_b, tmp_path, capsys):
  out = tmp_path / "s"
  args = ["sample", "--model", str(model_dirs["sd1"]), "--prompt", "a red ball", "--steps", "2",
          "--out", str(out), "--lora", str(lora_a[2]), "--lora", f"{lora_b}:0.5:IN01=0,BASE=0"]
  assert main(args) == 0
  got = np.asarray(Image.open(out / "0000_0000.png"))
  blocks = block_names.all_blocks(pipe.unet_config)
  weights = np.ones((2, len(blocks)), np.float32)
  weights[1] = [0.0 if b in ("IN01", "BASE") else 0.5 for b in blocks]
  merged = tree.unflatten({p: np.asarray(v, np.float32) for p, v in
                           numpy_merge(pipe.params, [lora_a[2], lora_b], weights,
                                       pipe.unet_config).items()})
  options = SampleOptions(steps=2)
  want = text_to_image(pipe, "a red ball", options=options, sampling=Sampling(merged))[0]
  assert np.abs(got.astype(int) - want).max() <= 1
  from persona_jax.diffusion.sampling import generate
  compiled = generate._cache_size()
  base = text_to_image(pipe, "a red ball", options=options)[0]
  assert generate._cache_size() == compiled           # other weights: the sampler is reused too
  assert np.abs(got.astype(int) - base).mean() > 5


def test_sample_command_bad_lora_is_a_clear_error(pipe, model_dirs, lora_a, tmp_path, capsys):
  sample = ["sample", "--model", str(model_dirs["sd1"]), "--prompt", "x", "--steps", "2",
            "--out", str(tmp_path)]
  assert main(sample + ["--lora", f"{tmp_path}/missing.safetensors:1"]) == 2
  assert "missing.safetensors: no such file" in capsys.readouterr().err
  assert main(sample + ["--lora", f"{lora_a[2]}:1:IN99=0"]) == 2
  assert "blocks: block 'IN99' does not exist in this UNet" in capsys.readouterr().err
