"""Low-rank paths beside frozen layers: y = layer(x) + scale * (x @ a) @ b, rounded once.

A LoRA update merged into a bf16 kernel is rounded to the kernel's bf16 grid: every change below
half a bf16 ulp of W (2^-9 relative) is lost, which early in training is most of it. A method
may instead leave the kernel as it is and put its factors beside it, in the layer's own params:

  <layer>/lora_a      [fan_in, r]   (fan_in = kh * kw * in for an HWIO conv kernel)
  <layer>/lora_b      [r, out]
  <layer>/lora_scale  []            (alpha / r, times any block weight)

While a model runs under `low_rank_paths()` (the UNet and the text encoder always do), an
nn.Dense or nn.Conv holding them computes its frozen product and the low-rank product with
float32 accumulation from its operands and rounds their sum once to its dtype, so the update
survives in the output as it would with a float32 merge, up to that one rounding. (diffusers and
kohya add a separately rounded LoRA output in bf16, which loses updates below half an ulp of
the activations; this keeps them.) A layer without factors runs as it always does.

The LoRA variants whose update is not a product of two factors (DoRA, LoKr, LoHa:
methods/lora_variants.py) put their whole update there instead, computed in float32 from the
kernel and rounded to its dtype once:

  <layer>/lora_delta  [kernel shape]  y = x @ W + x @ delta, summed in float32, rounded once

which costs a second product of the kernel's size (an update rounded to bf16 keeps 8 bits of
itself, where merged into W it would lose every bit below W's ulp).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

FACTORS = ("lora_a", "lora_b", "lora_scale")
DELTA = "lora_delta"


def _conv(x, kernel, module: nn.Conv):
  strides = module.strides or 1
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  padding = module.padding
  padding = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)


def _dense(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _with_factors(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
      or not (module.has_variable("params", "lora_a") or module.has_variable("params", DELTA))):
    return next_fun(*args, **kwargs)
  get = lambda name: module.get_variable("params", name)        # noqa: E731
  dtype = module.dtype or jnp.float32
  x = args[0].astype(dtype)
  kernel = get("kernel").astype(dtype)
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1 or module.kernel_dilation not in (None, 1, (1, 1)):
      raise NotImplementedError(f"low-rank path on {module.path}: grouped or dilated conv")
    y = _conv(x, kernel, module)
  else:
    y = _dense(x, kernel)
  if module.has_variable("params", DELTA):
    delta = get(DELTA).astype(dtype)
    y = y + (_conv(x, delta, module) if isinstance(module, nn.Conv) else _dense(x, delta))
  else:
    a, b = get("lora_a").astype(dtype), get("lora_b").astype(dtype)
    if isinstance(module, nn.Conv):
      low = _conv(x, a.reshape(kernel.shape[:-1] + a.shape[-1:]), module)    # [B, H, W, r]
    else:
      low = _dense(x, a)                                                     # [..., r]
    y = y + get("lora_scale").astype(jnp.float32) * _dense(low.astype(dtype), b)
  if module.use_bias:
    y = y + get("bias").astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(dtype)


@contextlib.contextmanager
def low_rank_paths():
  """Dense and Conv layers with factors in their params add their low-rank path (see above)."""
  with nn.intercept_methods(_with_factors):
    yield


def attach(flat: dict, kernel_path: str, a, b, scale) -> None:
  """Puts factors beside the kernel at `kernel_path` (`.../to_q/kernel`) in a flat param dict."""
  layer = kernel_path.rsplit("/", 1)[0]
  flat[f"{layer}/lora_a"], flat[f"{layer}/lora_b"] = a, b
  flat[f"{layer}/lora_scale"] = jnp.asarray(scale, jnp.float32)


def attach_delta(flat: dict, kernel_path: str, delta) -> None:
  """Puts a whole update (float32, the kernel's shape) beside the kernel at `kernel_path`."""
  flat[f"{kernel_path.rsplit('/', 1)[0]}/{DELTA}"] = delta


def with_low_rank_paths(call):
  """Decorates a model's `__call__` to run under `low_rank_paths()`."""
  @functools.wraps(call)
  def wrapped(*args, **kwargs):
    with low_rank_paths():
      return call(*args, **kwargs)
  return wrapped
