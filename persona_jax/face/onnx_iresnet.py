"""insightface's ArcFace recognition files (`w600k_r50.onnx` of buffalo_l, `glintr100.onnx` of
antelopev2) read into `face.iresnet.IResNet`, by walking the ONNX graph.

The released files come from `torch.onnx.export` of an eval-mode IResNet (arcface_torch's
`torch2onnx.py`, opset 11): every batch norm that follows a convolution is folded into it, and
weights are numbered ("685") rather than named, so nothing is found by name. The walk starts at
the graph's input and follows the data: optional Sub/Mul/Add/Div by constants (MXNet
conversions normalize inside the graph), the stem Conv -> PRelu, then IBasicBlocks (the tensor
feeds a BatchNormalization and either the Add or a 1x1 downsample Conv; BN -> Conv -> PRelu ->
Conv -> Add), then BatchNormalization -> Flatten (or Reshape) -> Gemm -> BatchNormalization.
A Conv still followed by its BatchNormalization (an unfolded export) is folded here. Each weight
lands in the Flax parameter of its place in that walk.

Input normalization is insightface's own (`model_zoo/arcface_onnx.py`): pixels become
(x - 127.5) / 127.5, RGB (insightface swaps cv2's BGR), unless one of the graph's first 8 nodes is
named Sub/_minus and one Mul/_mul (an MXNet model normalizing itself): then they go in as 0..255.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.face import align
from persona_jax.face.extra import import_face_package
from persona_jax.face.iresnet import IResNetConfig, embed
from persona_jax.face.recognizer import Recognizer, padded_batches

EXPECTED = ("expected insightface's ArcFace recognition network (an IResNet such as "
            "w600k_r50.onnx of buffalo_l or glintr100.onnx of antelopev2)")


class _NotIResNet(Exception):
  """Where the walk left the IResNet pattern (one line)."""


@dataclasses.dataclass(frozen=True)
class _Node:
  op: str
  name: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: dict


def insightface_input_norm(node_names) -> tuple[float, float]:
  """(mean, std) insightface's ArcFaceONNX feeds a graph whose first node names are these:
  (0, 1) for an MXNet conversion that normalizes inside (Sub and Mul among the first 8), else
  (127.5, 127.5)."""
  names = list(node_names)[:8]
  sub = any(n.startswith(("Sub", "_minus")) for n in names)
  mul = any(n.startswith(("Mul", "_mul")) for n in names)
  return (0.0, 1.0) if sub and mul else (127.5, 127.5)


class _Graph:
  """The graph's compute nodes with Identity/Dropout passed through and constants resolved."""

  def __init__(self, graph, onnx, numpy_helper):
    self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias: dict[str, str] = {}

    def resolve(name):
      while name in alias:
        name = alias[name]
      return name
    self.nodes = []
    for proto in graph.node:
      attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
      if proto.op_type == "Constant":
        value = attrs.get("value")
        self.consts[proto.output[0]] = (numpy_helper.to_array(value) if value is not None else
                                        np.asarray(next(iter(attrs.values()))))
        continue
      inputs = tuple(resolve(i) for i in proto.input)
      if proto.op_type in ("Identity", "Dropout"):          # eval-mode dropout passes through
        if inputs[0] in self.consts:
          self.consts[proto.output[0]] = self.consts[inputs[0]]
        else:
          alias[proto.output[0]] = inputs[0]
        continue
      self.nodes.append(_Node(proto.op_type, proto.name, inputs, tuple(proto.output), attrs))
    self.consumers = defaultdict(list)
    for node in self.nodes:
      for name in node.inputs:
        self.consumers[name].append(node)
    self.inputs = [i for i in graph.input if i.name not in self.consts]
    self.outputs = [resolve(o.name) for o in graph.output]

  def const(self, name, what) -> np.ndarray:
    if name not in self.consts:
      raise _NotIResNet(f"{what} is computed, not a constant")
    return np.asarray(self.consts[name], np.float64)

  def only(self, tensor, *ops) -> _Node:
    """The single node consuming `tensor`, which must be one of `ops`."""
    users = self.consumers.get(tensor, [])
    if len(users) != 1 or users[0].op not in ops:
      found = ", ".join(f"{n.op} {n.name!r}" for n in users) or "nothing"
      raise _NotIResNet(f"tensor {tensor!r} feeds {found} where one {'/'.join(ops)} was expected")
    return users[0]


class _Walk:
  """Follows the data from the input; collects the Flax variables and the sizes."""

  def __init__(self, graph: _Graph):
    self.g = graph
    self.epsilons: list[float] = []

  def norm(self, node: _Node):
    """A BatchNormalization node -> (params, batch_stats)."""
    if node.attrs.get("training_mode", 0) or len(node.inputs) != 5:
      raise _NotIResNet(f"BatchNormalization {node.name!r} is not an inference batch norm")
    if any(self.g.consumers.get(o) for o in node.outputs[1:]):
      raise _NotIResNet(f"BatchNormalization {node.name!r} uses its training outputs")
    gamma, beta, mean, var = (self.g.const(i, f"{node.name!r} input") for i in node.inputs[1:])
    self.epsilons.append(float(node.attrs.get("epsilon", 1e-5)))
    return {"scale": gamma, "bias": beta}, {"mean": mean, "var": var}

  def conv(self, node: _Node, kernel: int):
    """A Conv node (kernel x kernel, padding kernel // 2), folding a BatchNormalization that
    alone follows it -> (output tensor, params, stride, out channels)."""
    if node.op != "Conv":
      raise _NotIResNet(f"{node.op} {node.name!r} where a Conv was expected")
    w = self.g.const(node.inputs[1], f"Conv {node.name!r} weight")
    bias = (self.g.const(node.inputs[2], f"Conv {node.name!r} bias")
            if len(node.inputs) > 2 and node.inputs[2] else np.zeros(w.shape[0]))
    a = node.attrs
    strides = list(a.get("strides", [1, 1]))
    if (w.ndim != 4 or tuple(w.shape[2:]) != (kernel, kernel) or a.get("group", 1) != 1
        or any(d != 1 for d in a.get("dilations", [1, 1]))
        or list(a.get("pads", [0] * 4)) != [kernel // 2] * 4 or len(set(strides)) != 1
        or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
      raise _NotIResNet(f"Conv {node.name!r} is not a {kernel}x{kernel} convolution padded by "
                        f"{kernel // 2} (weight {list(w.shape)}, attributes {a})")
    out = node.outputs[0]
    users = self.g.consumers.get(out, [])
    if len(users) == 1 and users[0].op == "BatchNormalization":      # not folded at export
      params, stats = self.norm(users[0])
      scale = params["scale"] / np.sqrt(stats["var"] + self.epsilons.pop())
      w = w * scale[:, None, None, None]
      bias = (bias - stats["mean"]) * scale + params["bias"]
      out = users[0].outputs[0]
    return out, {"kernel": w.transpose(2, 3, 1, 0), "bias": bias}, strides[0], w.shape[0]

  def prelu(self, tensor, channels):
    node = self.g.only(tensor, "PRelu")
    slope = self.g.const(node.inputs[1], f"PRelu {node.name!r} slope").reshape(-1)
    if slope.size not in (1, channels):
      raise _NotIResNet(f"PRelu {node.name!r} has {slope.size} slopes for {channels} channels")
    return node.outputs[0], {"slope": np.broadcast_to(slope, (channels,))}

  def input_affine(self, tensor):
    """Elementwise Sub/Mul/Add/Div by constants (scalars or per channel) at the input ->
    (tensor after them, scale [3], shift [3])."""
    scale, shift = np.ones(3), np.zeros(3)
    while True:
      users = self.g.consumers.get(tensor, [])
      if len(users) != 1 or users[0].op not in ("Sub", "Mul", "Add", "Div"):
        return tensor, scale, shift
      node = users[0]
      if node.inputs[0] != tensor and node.op in ("Sub", "Div"):
        raise _NotIResNet(f"{node.op} {node.name!r} takes the input as its second operand")
      c = self.g.const(node.inputs[1] if node.inputs[0] == tensor else node.inputs[0],
                       f"{node.op} {node.name!r} operand")
      if c.size == 1:
        c = np.full(3, c.reshape(()))
      elif c.shape in ((1, 3, 1, 1), (3, 1, 1)):
        c = c.reshape(3)
      else:
        raise _NotIResNet(f"{node.op} {node.name!r} has a constant of shape {list(c.shape)}")
      if node.op == "Sub":
        shift = shift - c
      elif node.op == "Add":
        shift = shift + c
      elif node.op == "Mul":
        scale, shift = scale * c, shift * c
      else:
        scale, shift = scale / c, shift / c
      tensor = node.outputs[0]

  def block(self, tensor, channels):
    """An IBasicBlock whose input is `tensor` -> (output, params, stats, width, stride, downsample)."""
    users = self.g.consumers.get(tensor, [])
    norms = [n for n in users if n.op == "BatchNormalization"]
    if len(users) != 2 or len(norms) != 1:
      raise _NotIResNet(f"tensor {tensor!r} feeds {[n.op for n in users]} where a block's "
                        "BatchNormalization and its shortcut were expected")
    shortcut_node = users[0] if users[1] is norms[0] else users[1]
    params, stats = {}, {}
    params["bn1"], stats["bn1"] = self.norm(norms[0])
    out, params["conv1"], stride1, width = self.conv(
        self.g.only(norms[0].outputs[0], "Conv"), 3)
    out, params["prelu"] = self.prelu(out, width)
    out, params["conv2"], stride, _ = self.conv(self.g.only(out, "Conv"), 3)
    add = self.g.only(out, "Add")
    if stride1 != 1 or out not in add.inputs or len(add.inputs) != 2:
      raise _NotIResNet(f"block at {tensor!r} is not bn1 -> conv1 -> prelu -> conv2 -> add")
    shortcut = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
    downsample = shortcut_node.op == "Conv"
    if downsample:
      out_ds, params["downsample"], stride_ds, _ = self.conv(shortcut_node, 1)
      if out_ds != shortcut or stride_ds != stride:
        raise _NotIResNet(f"the downsample of the block at {tensor!r} does not meet its Add")
    elif shortcut_node is not add or shortcut != tensor or stride != 1 or width != channels:
      raise _NotIResNet(f"the block at {tensor!r} has neither an identity shortcut nor a "
                        "1x1 downsample")
    return add.outputs[0], params, stats, width, stride, downsample

  def run(self, input_mean: float, input_std: float):
    g = self.g
    if len(g.inputs) != 1 or len(g.outputs) != 1:
      raise _NotIResNet(f"{len(g.inputs)} inputs and {len(g.outputs)} outputs, not 1 and 1")
    dims = [d.dim_value or None for d in g.inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3]:
      raise _NotIResNet(f"input {g.inputs[0].name!r} has shape {dims}, not [N, 3, S, S]")
    params, stats = {}, {}
    tensor, in_scale, in_shift = self.input_affine(g.inputs[0].name)
    tensor, params["conv1"], stem_stride, stem = self.conv(g.only(tensor, "Conv"), 3)
    if stem_stride != 1:
      raise _NotIResNet(f"the stem convolution has stride {stem_stride}, not 1")
    tensor, params["prelu"] = self.prelu(tensor, stem)
    widths, layers, strides, channels = [], [], [], stem
    while len(g.consumers.get(tensor, [])) == 2:
      tensor, p, s, width, stride, downsample = self.block(tensor, channels)
      if downsample:
        widths.append(width), layers.append(0), strides.append(stride)
      elif not layers:
        raise _NotIResNet("the first block has no 1x1 downsample")
      name = f"layer{len(layers)}_{layers[-1]}"
      layers[-1] += 1
      params[name], stats[name] = p, s
      channels = width
    if not layers:
      raise _NotIResNet("no IBasicBlock after the stem")
    norm = g.only(tensor, "BatchNormalization")
    params["bn2"], stats["bn2"] = self.norm(norm)
    flat = g.only(norm.outputs[0], "Flatten", "Reshape")
    if (flat.op == "Flatten" and flat.attrs.get("axis", 1) != 1) or (
        flat.op == "Reshape" and g.const(flat.inputs[1], "Reshape shape").size != 2):
      raise _NotIResNet(f"{flat.op} {flat.name!r} does not flatten to [N, C * H * W]")
    gemm = g.only(flat.outputs[0], "Gemm")
    a = gemm.attrs
    w = g.const(gemm.inputs[1], f"Gemm {gemm.name!r} weight")
    if a.get("transA", 0) or w.ndim != 2:
      raise _NotIResNet(f"Gemm {gemm.name!r} is not x @ W + b")
    w = a.get("alpha", 1.0) * (w.T if a.get("transB", 0) else w)            # [in, out]
    bias = (a.get("beta", 1.0) * g.const(gemm.inputs[2], f"Gemm {gemm.name!r} bias").reshape(-1)
            if len(gemm.inputs) > 2 and gemm.inputs[2] else np.zeros(w.shape[1]))
    side = math.isqrt(w.shape[0] // channels)
    if side * side * channels != w.shape[0]:
      raise _NotIResNet(f"fc takes {w.shape[0]} numbers, not {channels} x H x W")
    # torch flattens NCHW (c, h, w); the Flax network flattens NHWC (h, w, c)
    w = w.reshape(channels, side, side, -1).transpose(1, 2, 0, 3).reshape(w.shape[0], -1)
    params["fc"] = {"kernel": w, "bias": bias}
    tensor = gemm.outputs[0]
    users = g.consumers.get(tensor, [])
    features_norm = len(users) == 1 and users[0].op == "BatchNormalization"
    if features_norm:
      params["features"], stats["features"] = self.norm(users[0])
      tensor = users[0].outputs[0]
    if tensor != g.outputs[0] or g.consumers.get(tensor):
      raise _NotIResNet(f"the embedding {tensor!r} is not the graph's only output")
    if max(self.epsilons) - min(self.epsilons) > 1e-3 * max(self.epsilons):
      raise _NotIResNet(f"batch norms with different epsilons {sorted(set(self.epsilons))}")
    size = dims[2] or side * math.prod(strides)
    config = IResNetConfig(
        stem=stem, widths=tuple(widths), layers=tuple(layers), strides=tuple(strides),
        embedding=int(w.shape[1]), input_size=int(size), features_norm=features_norm,
        epsilon=self.epsilons[0],
        input_scale=tuple(float(v) for v in in_scale / input_std),
        input_shift=tuple(float(v) for v in in_shift - in_scale * input_mean / input_std))
    if config.final_size != side:
      raise _NotIResNet(f"a {size}x{size} input ends at {config.final_size}x{config.final_size}, "
                        f"but fc expects {side}x{side}")
    variables = {"params": params, "batch_stats": stats}
    return config, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)


def read_iresnet(path) -> tuple[IResNetConfig, dict]:
  """(config, Flax variables {"params", "batch_stats"}) of the IResNet in ONNX file `path`."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"{path}: no such ONNX file; {EXPECTED}")
  onnx = import_face_package("onnx")
  numpy_helper = import_face_package("onnx.numpy_helper")
  try:
    model = onnx.load(str(path))
  except Exception as e:  # noqa: BLE001  (protobuf and onnx raise several kinds)
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"{path}: not a readable ONNX file ({reason}); {EXPECTED}") from None
  mean, std = insightface_input_norm(n.name for n in model.graph.node)
  try:
    return _Walk(_Graph(model.graph, onnx, numpy_helper)).run(mean, std)
  except _NotIResNet as e:
    raise ConfigError(f"{path}: not a face-recognition IResNet ({e}); {EXPECTED}") from None


def load(path, chunk: int = 32) -> Recognizer:
  """The ONNX file's network as a `Recognizer` (named by the file, insightface's arcface
  template for its input size, no threshold); crops embed in batches of up to `chunk`."""
  config, variables = read_iresnet(path)
  embed_fn = padded_batches(lambda x: embed(config, variables, jnp.asarray(x)), chunk)
  return Recognizer(Path(path).stem, config.input_size, align.arcface_template(config.input_size),
                    embed_fn, None, {"architecture": "iresnet", "file": str(path),
                                     "embedding": config.embedding, "layers": list(config.layers),
                                     "widths": list(config.widths)})


__all__ = ["read_iresnet", "load", "insightface_input_norm", "EXPECTED"]
