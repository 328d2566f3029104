"""Helpers for tests that compare against diffusers/transformers PyTorch (skipped without torch)."""

import pytest


def require_torch():
  """Imports torch, diffusers and transformers, skipping the test when the extra is missing."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")
  torch.set_num_threads(2)
  return torch


def randomize_affine_(module, seed: int = 0):
  """Gives every norm weight and every bias of a torch module random values, in place."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      is_norm = "norm" in name or "layrnorm" in name or "layernorm" in name
      if leaf == "bias":
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif leaf == "weight" and is_norm and p.ndim == 1:
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
