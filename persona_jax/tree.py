"""Param trees by path: `a/b/c` path strings, regex rules, masks, split and merge.

Rules are data: a sequence of `(regex, value)` pairs, first full match wins (big_vision's
`config.schedule` / `sharding_strategy`). The same rule language selects trainable leaves,
assigns optimizer groups and weight shardings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax.traverse_util import flatten_dict, unflatten_dict

Rules = Sequence[tuple[str, Any]]


def path_str(path: tuple) -> str:
  """('unet', 'conv_in', 'kernel') -> 'unet/conv_in/kernel'."""
  return "/".join(str(getattr(p, "key", p)) for p in path)


def flatten(tree: Mapping) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return {path_str(k): v for k, v in flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def match(path: str, rules: Rules, default=None):
  """The value of the first rule whose regex fully matches `path`."""
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return value
  return default


def label(tree: Mapping, rules: Rules, default=None) -> dict:
  """A tree of the same structure whose leaves are the matching rule values."""
  return unflatten({p: match(p, rules, default) for p in flatten(tree)})


def select(tree: Mapping, rules: Rules) -> dict[str, bool]:
  """{path: True/False}: which leaves the rules select (unmatched: False)."""
  return {p: bool(match(p, rules, False)) for p in flatten(tree)}


def split(tree: Mapping, rules: Rules) -> tuple[dict, dict]:
  """(selected, rest): two disjoint trees whose `merge` is `tree`."""
  flat = flatten(tree)
  chosen = select(tree, rules)
  return (unflatten({p: v for p, v in flat.items() if chosen[p]}),
          unflatten({p: v for p, v in flat.items() if not chosen[p]}))


def merge(*trees: Mapping) -> dict:
  """Union of disjoint trees; a path present in two of them is an error."""
  out: dict[str, Any] = {}
  for t in trees:
    for p, v in flatten(t).items():
      if p in out:
        raise ValueError(f"param '{p}' is in two trees being merged")
      out[p] = v
  return unflatten(out)


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping) -> dict:
  """Applies fn(path, leaf) to every leaf."""
  return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def paths(tree: Mapping) -> list[str]:
  return sorted(flatten(tree))
