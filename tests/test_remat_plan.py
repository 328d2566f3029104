"""Remat policies on a tiny UNet compiled or traced from shapes only: what autodiff keeps for the
backward under each policy, and XLA's buffer plan (benchmark/jax_cases.py `plan_remat`, the
model of `persona-jax bench --memory-plan --memory-plan-remat ...`)."""

import dataclasses
import importlib.util

import pytest

from persona_jax.benchmark import jax_cases
from persona_jax.errors import ConfigError
from persona_jax.models.configs import UNetConfig
from tests.markers import slow

# One level, no mid block: a transformer and resnets, the two kinds of remat-ed block.
TINY = UNetConfig.from_dict(dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"],
    up_block_types=["UpBlock2D"], mid_block_type=None, block_out_channels=[32],
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2))


def test_remat_keeps_less_for_the_backward():
  """`blocks` keeps only each block's inputs, `dots` also the matmul outputs (not convolutions
  or attention's batched products): both far less than keeping every activation."""
  kept = jax_cases.remat_residuals_mb(TINY, batch_size=2, latent=32, context_len=8)
  assert kept["blocks"] < kept["dots"] < kept["none"] / 2, kept


def test_plan_targets():
  assert jax_cases.plan_target("cpu", TINY)[1] is TINY
  with pytest.raises(ConfigError, match="use cpu or tpu:TOPOLOGY"):
    jax_cases.plan_target("gpu:h100", TINY)
  if importlib.util.find_spec("libtpu") is None:
    with pytest.raises(ConfigError, match=r"needs libtpu: pip install \"jax\[tpu\]\""):
      jax_cases.plan_target("tpu:v5e:2x2", TINY)


@slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")
def test_remat_lowers_a_tpu_plan():
  """The TPU compiler's plan (libtpu, no TPU needed; minutes of compilation): both policies
  cut the temporaries. (XLA:CPU's default scheduler runs the recomputation early and plans
  about the same for all three.)"""
  # With a mid block and attention in the up block (TINY's plan fits on chip: no temporaries).
  config = dataclasses.replace(TINY, up_block_types=("CrossAttnUpBlock2D",),
                               mid_block_type="UNetMidBlock2DCrossAttn")
  plans = jax_cases.plan_remat(config, batch_size=2, latent=32, context_len=8, target="tpu:v5e:2x2")
  none = plans["none"]["temporaries"]
  assert plans["blocks"]["temporaries"] < none / 2 and plans["dots"]["temporaries"] < none / 2, plans
