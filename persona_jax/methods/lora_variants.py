"""The LoRA method's weight updates: plain LoRA, DoRA, LoKr and LoHa, one factor type each.

A factor is a pytree (NamedTuple: under jit every array is traced) for one kernel W, with
`update(w, strength)`: the change it makes to W (float32, our layout: [in, out] or HWIO), so a
merge is `W + update(W, strength)` whatever the variant (strength: a LoRA's weight times its
block weight; strength 1 gives the variant's own merged weight).

  lora  Factor(a [fan_in, r], b [r, out], scale)              scale * a @ b
  dora  DoRAFactor(a, b, scale, magnitude [out])              (Liu et al. 2024; PEFT's use_dora)
        V = W + scale * a @ b, W' = magnitude * V / ||V||, the norm per output feature (over
        fan_in) and detached from gradients, as PEFT detaches it; update = strength * (W' - W),
        ComfyUI's rule for strength != 1 (LyCORIS scales m / ||V|| - 1 instead: the same at 1).
        The magnitude starts at the norm of W, so W' = W at step 0.
  lokr  LoKrFactor(w1 | w1_a @ w1_b, w2 | w2_a @ w2_b, scale)  (LyCORIS lokr)
        PyTorch layout [out, in(, kh, kw)]: dW = scale * kron(w1, w2), w1 [out_l, in_m], w2
        [out_k, in_n(, kh, kw)] with out = out_l * out_k, in = in_m * in_n from `factorization`;
        w2 (a conv's: [r, in_n * kh * kw]) is low rank when the rank is below half its larger
        side, w1 too with `decompose_both`; scale = alpha / r, 1 when both halves are full.
  loha  LoHaFactor(w1_a [out, r], w1_b [r, in*kh*kw], w2_a, w2_b, scale)   (LyCORIS loha)
        dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product), PyTorch layout.

LoKr and LoHa factors keep LyCORIS's orientation (PyTorch [out, in]) everywhere: in the trainable
tree, our result file and the kohya/LyCORIS file (`lokr_w1`, `hada_w1_a`, ... are LyCORIS's
own names). LoRA and DoRA factors are in our orientation (the kernel's fan_in first).
Tucker decompositions (LyCORIS use_tucker: lokr_t2, hada_t1/t2) are not made nor read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import ModelFileError

VARIANTS = ("lora", "dora", "lokr", "loha")
# The leaves of one target in the trainable tree and in our result file (besides `alpha`).
LEAVES = {"lora": ("a", "b"), "dora": ("a", "b", "magnitude"),
          "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
          "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
LEAF_NAMES = tuple(dict.fromkeys(n for names in LEAVES.values() for n in names))


def to_kernel_layout(delta, kernel_shape):
  """A PyTorch-layout update [out, in * kh * kw] (or [out, in, kh, kw]) in our kernel layout."""
  if len(kernel_shape) == 2:
    return delta.reshape(kernel_shape[1], kernel_shape[0]).T
  kh, kw, cin, cout = kernel_shape
  return delta.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)


def output_norm(w):
  """||W[..., j]|| per output feature j of a kernel in our layout (over fan_in): [out]."""
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1))))


class Factor(NamedTuple):
  """Plain LoRA: W' = W + scale * reshape(a @ b)."""
  a: np.ndarray       # [fan_in, r] float32
  b: np.ndarray       # [r, out] float32
  scale: np.ndarray   # [] float32: alpha / r

  def update(self, w, strength=1.0):
    return strength * self.scale * (self.a @ self.b).reshape(w.shape)


class DoRAFactor(NamedTuple):
  """DoRA: W' = magnitude * V / ||V||, V = W + scale * reshape(a @ b) (norm per output)."""
  a: np.ndarray          # [fan_in, r]
  b: np.ndarray          # [r, out]
  scale: np.ndarray      # []
  magnitude: np.ndarray  # [out]

  def update(self, w, strength=1.0):
    v = w + self.scale * (self.a @ self.b).reshape(w.shape)
    norm = jax.lax.stop_gradient(output_norm(v))
    ratio = (self.magnitude / norm).reshape((1,) * (v.ndim - 1) + (-1,))
    return strength * (v * ratio - w)


class LoKrFactor(NamedTuple):
  """LoKr: dW = scale * kron(w1, w2) in PyTorch layout; each half full or a product of two."""
  w1: np.ndarray | None     # [out_l, in_m]
  w1_a: np.ndarray | None   # [out_l, r]
  w1_b: np.ndarray | None   # [r, in_m]
  w2: np.ndarray | None     # [out_k, in_n(, kh, kw)]
  w2_a: np.ndarray | None   # [out_k, r]
  w2_b: np.ndarray | None   # [r, in_n * kh * kw]
  scale: np.ndarray

  def halves(self):
    """(w1 [a, c], w2 [b, d * kh * kw]): the two Kronecker halves, built."""
    w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
    w2 = self.w2 if self.w2 is not None else self.w2_a @ self.w2_b
    return w1, w2.reshape(w2.shape[0], -1)

  def update(self, w, strength=1.0):
    w1, w2 = self.halves()
    kron = jnp.einsum("ij,pq->ipjq", w1, w2).reshape(w1.shape[0] * w2.shape[0], -1)
    return strength * to_kernel_layout(self.scale * kron, w.shape)


class LoHaFactor(NamedTuple):
  """LoHa: dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b) in PyTorch layout [out, in * kh * kw]."""
  w1_a: np.ndarray   # [out, r]
  w1_b: np.ndarray   # [r, in * kh * kw]
  w2_a: np.ndarray   # [out, r]
  w2_b: np.ndarray   # [r, in * kh * kw]
  scale: np.ndarray

  def update(self, w, strength=1.0):
    hadamard = (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)
    return strength * to_kernel_layout(self.scale * hadamard, w.shape)


AnyFactor = Factor | DoRAFactor | LoKrFactor | LoHaFactor


def variant_of(factor) -> str:
  return {Factor: "lora", DoRAFactor: "dora", LoKrFactor: "lokr", LoHaFactor: "loha"}[type(factor)]


# ---------------------------------------------------------------------------------------------
# Shapes, ranks and scales.


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """LyCORIS's split of a dimension into (m, n), m <= n, m * n = dimension: m = `factor` when it
  divides the dimension, else the largest divisor pair with m <= factor (factor < 0: the most
  balanced one), e.g. 128 -> (8, 16), 320 -> (16, 20), 127 -> (1, 127)."""
  if 0 < factor and dimension % factor == 0:
    m, n = factor, dimension // factor
    return (n, m) if m > n else (m, n)
  factor = dimension if factor < 0 else factor
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > m + n or new_m > factor:
      break
    m, n = new_m, new_n
  return (n, m) if m > n else (m, n)


def torch_dims(kernel_shape) -> tuple[int, int, tuple[int, ...]]:
  """(out, in, (kh, kw) or ()) of a kernel in our layout."""
  *k, cin, cout = kernel_shape
  return cout, cin, tuple(k)


def lokr_shapes(kernel_shape, rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False) -> dict[str, tuple[int, ...]]:
  """LyCORIS LokrModule's factor shapes for a kernel (our layout), use_tucker off."""
  out_dim, in_dim, k = torch_dims(kernel_shape)
  in_m, in_n = factorization(in_dim, factor)
  out_l, out_k = factorization(out_dim, factor)
  if decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix:
    shapes = {"lokr_w1_a": (out_l, rank), "lokr_w1_b": (rank, in_m)}
  else:
    shapes = {"lokr_w1": (out_l, in_m)}
  if rank < max(out_k, in_n) / 2 and not full_matrix:
    shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n * math.prod(k)))
  else:
    shapes["lokr_w2"] = (out_k, in_n, *k)
  return shapes


def rank_of(leaves) -> int | None:
  """The rank alpha divides by: a/b's, LoHa's, LoKr's low-rank half's (None: LoKr with both
  halves full, whose scale is 1 whatever its alpha, as LyCORIS sets it)."""
  for name, axis in (("b", 0), ("hada_w1_b", 0), ("lokr_w1_a", 1), ("lokr_w2_a", 1)):
    if leaves.get(name) is not None:
      return int(np.shape(leaves[name])[axis])
  return None


def scale_of(leaves, alpha: float) -> float:
  rank = rank_of(leaves)
  return 1.0 if rank is None else float(alpha) / rank


def alpha_of(factor) -> float:
  """The alpha a file stores for a factor (scale * rank; LoKr with both halves full: 1)."""
  return float(np.float32(factor.scale) * (rank_of(leaves_of(factor)) or 1))


def leaves_of(factor) -> dict[str, np.ndarray]:
  """A factor's arrays under our file's leaf names (LEAVES), absent halves left out."""
  fields = factor._asdict()
  fields.pop("scale")
  prefix = {"lokr": "lokr_", "loha": "hada_"}.get(variant_of(factor), "")
  return {prefix + k: v for k, v in fields.items() if v is not None}


def make_factor(leaves: dict, alpha: float, kernel_shape, where: str) -> AnyFactor:
  """The factor of one target from its leaves (LEAVES names, float32) and alpha, checked
  against the kernel (our layout) it changes; errors name `where`."""
  names = set(leaves)
  variant = ("lokr" if names & set(LEAVES["lokr"]) else "loha" if names & set(LEAVES["loha"])
             else "dora" if "magnitude" in names else "lora")
  if not (names <= set(LEAVES[variant]) and (variant not in ("lora", "dora")
                                              or names == set(LEAVES[variant]))):
    raise ModelFileError(f"{where}: leaves {sorted(names)} are no LoRA variant's (LoRA a, b; DoRA a, "
                         "b, magnitude; LoKr lokr_w1 or lokr_w1_a/_b and lokr_w2 or lokr_w2_a/_b; "
                         "LoHa hada_w1_a/_b, hada_w2_a/_b)")
  leaves = {k: np.asarray(v, np.float32) for k, v in leaves.items()}
  if "lokr_w2_b" in leaves:                  # [r, in_n * kh * kw] (some writers keep kh, kw apart)
    leaves["lokr_w2_b"] = leaves["lokr_w2_b"].reshape(leaves["lokr_w2_b"].shape[0], -1)
  scale = np.asarray(scale_of(leaves, alpha), np.float32)
  out_dim, in_dim, k = torch_dims(kernel_shape)
  flat_in = in_dim * math.prod(k)

  def check(ok, what):
    if not ok:
      shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in sorted(leaves.items()))
      raise ModelFileError(f"{where}: {variant} factors ({shapes}) {what} the base kernel "
                           f"[out {out_dim}, in {in_dim}{', kernel ' + 'x'.join(map(str, k)) if k else ''}]")

  if variant in ("lora", "dora"):
    a, b = leaves["a"], leaves["b"]
    check(a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0] >= 1, "are not [fan_in, r], [r, out]; for")
    check((a.shape[0], b.shape[1]) == (flat_in, out_dim), "do not fit")
    if variant == "lora":
      return Factor(a, b, scale)
    magnitude = leaves["magnitude"].reshape(-1)
    check(magnitude.shape == (out_dim,), "have a magnitude that does not fit")
    return DoRAFactor(a, b, scale, magnitude)
  if variant == "loha":
    check(names == set(LEAVES["loha"]), "miss a hada_ leaf for")
    w1_a, w1_b, w2_a, w2_b = (leaves[n].reshape(leaves[n].shape[0], -1) for n in LEAVES["loha"])
    check(w1_a.shape[1] == w1_b.shape[0] and w2_a.shape == w1_a.shape and w2_b.shape == w1_b.shape
          and (w1_a.shape[0], w1_b.shape[1]) == (out_dim, flat_in), "do not fit")
    return LoHaFactor(w1_a, w1_b, w2_a, w2_b, scale)
  get = leaves.get
  check((("lokr_w1" in names) != ("lokr_w1_a" in names)) and ("lokr_w1_a" in names) == ("lokr_w1_b" in names)
        and (("lokr_w2" in names) != ("lokr_w2_a" in names))
        and ("lokr_w2_a" in names) == ("lokr_w2_b" in names), "are not one w1 and one w2 half for")
  if get("lokr_w1_a") is not None:
    check(get("lokr_w1_a").shape[1] == get("lokr_w1_b").shape[0], "do not share a rank for")
  w2 = get("lokr_w2")
  if w2 is not None:
    check(w2.shape[2:] == k, "have a w2 whose kernel size does not fit")
  else:
    check(get("lokr_w2_a").shape[1] == get("lokr_w2_b").shape[0], "do not share a rank for")
  factor = LoKrFactor(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), w2, get("lokr_w2_a"),
                      get("lokr_w2_b"), scale)
  w1, w2 = (np.asarray(h) for h in factor.halves())
  check((w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) == (out_dim, flat_in)
        and in_dim % w1.shape[1] == 0, "do not fit")
  return factor


# ---------------------------------------------------------------------------------------------
# Initialization (the trainable leaves of one target), so that step 0 is the base model.


def _kaiming_uniform(key, shape):
  """torch.nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
  shape[1] * prod(shape[2:])."""
  bound = 1.0 / math.sqrt(math.prod(shape[1:]))
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_leaves(variant: str, kernel_shape, rank: int, key, w=None, *, factor: int = -1,
                decompose_both: bool = False, full_matrix: bool = False) -> dict:
  """The trainable leaves of one target. lora / dora: a Gaussian with std 1/r (PEFT's "gaussian"),
  b zeros, DoRA's magnitude the norm of W (`w`, the base kernel) per output; lokr: LyCORIS's
  kaiming-uniform w1 (or w1_a, w1_b) and w2_a, w2 (or w2_b) zeros; loha: LyCORIS's w1_b, w2_b
  ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a zeros."""
  keys = jax.random.split(key, 4)
  out_dim, in_dim, k = torch_dims(kernel_shape)
  fan_in = in_dim * math.prod(k)
  if variant in ("lora", "dora"):
    leaves = {"a": jax.random.normal(key, (fan_in, rank), jnp.float32) / rank,
              "b": jnp.zeros((rank, out_dim), jnp.float32)}
    if variant == "dora":
      leaves["magnitude"] = output_norm(jnp.asarray(w, jnp.float32))
    return leaves
  if variant == "loha":
    return {"hada_w1_a": 0.1 * jax.random.normal(keys[0], (out_dim, rank), jnp.float32),
            "hada_w1_b": jax.random.normal(keys[1], (rank, fan_in), jnp.float32),
            "hada_w2_a": jnp.zeros((out_dim, rank), jnp.float32),
            "hada_w2_b": jax.random.normal(keys[2], (rank, fan_in), jnp.float32)}
  if variant != "lokr":
    raise ValueError(f"unknown LoRA variant {variant}")
  shapes = lokr_shapes(kernel_shape, rank, factor, decompose_both, full_matrix)
  zero = {"lokr_w2", "lokr_w2_b"}
  return {name: (jnp.zeros(shape, jnp.float32) if name in zero
                 else _kaiming_uniform(keys[i], shape))
          for i, (name, shape) in enumerate(sorted(shapes.items()))}
