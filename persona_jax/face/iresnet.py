"""insightface's IResNet (ArcFace's backbone: `recognition/arcface_torch/backbones/iresnet.py`) in
Flax linen, NHWC, in the form its released ONNX files take: every batch norm that follows a
convolution is folded into that convolution's bias, the others (each block's `bn1`, the final
`bn2`, the `features` norm of the embedding) stay batch norms.

  crops [N, S, S, 3] -> x * input_scale + input_shift -> conv1 (3x3) -> prelu
    -> stages of IBasicBlocks: bn1 -> conv1 (3x3) -> prelu -> conv2 (3x3, stride) (+ downsample 1x1)
    -> bn2 -> flatten -> fc -> features (batch norm) -> [N, embedding] raw embeddings

Parameter names follow insightface's modules (`layer3_0/conv2`), less the folded norms. The
flatten runs in NHWC order: `fc`'s kernel rows are permuted from torch's NCHW order on load
(`face.onnx_iresnet`).
"""

from __future__ import annotations

import dataclasses

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class IResNetConfig:
  """Sizes of an IResNet (hashable: a static argument of jitted functions). insightface's r50:
  stem 64, widths (64, 128, 256, 512), layers (3, 4, 14, 3), strides (2, 2, 2, 2)."""
  stem: int = 64
  widths: tuple[int, ...] = (64, 128, 256, 512)
  layers: tuple[int, ...] = (3, 4, 14, 3)
  strides: tuple[int, ...] = (2, 2, 2, 2)
  embedding: int = 512
  input_size: int = 112
  features_norm: bool = True        # the batch norm after fc (insightface's `features`)
  epsilon: float = 1e-5             # of every remaining batch norm
  # the input affine, per RGB channel, from 0..255 crops: insightface's (x - 127.5) / 127.5
  # composed with any Sub/Mul the graph itself starts with
  input_scale: tuple[float, float, float] = (1 / 127.5,) * 3
  input_shift: tuple[float, float, float] = (-1.0,) * 3

  @property
  def final_size(self) -> int:
    """Side of the last stage's feature map."""
    size = self.input_size
    for s in self.strides:
      size = -(-size // s)
    return size


class PReLU(nn.Module):
  """x where x >= 0, slope * x elsewhere; one learned slope per channel (last axis)."""

  @nn.compact
  def __call__(self, x):
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope.reshape((1,) * (x.ndim - 1) + (-1,)) * x)


def _conv(features, kernel, stride, name, precision):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=True, precision=precision, name=name)


def _norm(epsilon, name):
  return nn.BatchNorm(use_running_average=True, epsilon=epsilon, name=name)


class IBasicBlock(nn.Module):
  """[N, H, W, Cin] -> [N, H / stride, W / stride, width]."""
  width: int
  stride: int
  downsample: bool
  epsilon: float
  precision: str | None = "highest"

  @nn.compact
  def __call__(self, x):
    out = _norm(self.epsilon, "bn1")(x)
    out = _conv(self.width, 3, 1, "conv1", self.precision)(out)          # bn2 folded in
    out = PReLU(name="prelu")(out)
    out = _conv(self.width, 3, self.stride, "conv2", self.precision)(out)  # bn3 folded in
    shortcut = _conv(self.width, 1, self.stride, "downsample", self.precision)(x) \
        if self.downsample else x
    return out + shortcut


class IResNet(nn.Module):
  """Aligned RGB crops [N, S, S, 3] (float, 0..255) -> raw embeddings [N, embedding].
  `precision` "highest" keeps float32 convolutions on accelerators (GPU TF32, TPU bf16 passes
  otherwise), so embeddings match onnxruntime's."""
  config: IResNetConfig = IResNetConfig()
  precision: str | None = "highest"

  @nn.compact
  def __call__(self, images):
    c = self.config
    scale, shift = (jnp.asarray(v, jnp.float32).reshape(1, 1, 1, 3)
                    for v in (c.input_scale, c.input_shift))
    x = images.astype(jnp.float32) * scale + shift
    x = PReLU(name="prelu")(_conv(c.stem, 3, 1, "conv1", self.precision)(x))   # bn1 folded in
    for i, (width, blocks, stride) in enumerate(zip(c.widths, c.layers, c.strides)):
      for j in range(blocks):
        x = IBasicBlock(width, stride if j == 0 else 1, j == 0, c.epsilon, self.precision,
                        name=f"layer{i + 1}_{j}")(x)
    x = _norm(c.epsilon, "bn2")(x)
    x = nn.Dense(c.embedding, precision=self.precision, name="fc")(x.reshape(x.shape[0], -1))
    return _norm(c.epsilon, "features")(x) if c.features_norm else x


@functools.partial(jax.jit, static_argnums=0)
def embed(config: IResNetConfig, variables, images):
  """Raw embeddings [N, embedding] of RGB crops [N, S, S, 3] (0..255); one compile per config
  and batch shape, shared by every network of that config."""
  return IResNet(config).apply(variables, images)


__all__ = ["IResNetConfig", "IResNet", "embed", "IBasicBlock", "PReLU"]
