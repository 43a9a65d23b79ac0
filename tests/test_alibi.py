"""ALiBi slopes: the v0.0.4 rule, the HF / llm-foundry interleave rule, and where they agree."""

import numpy as np
import pytest
from transformers.models.mpt import modeling_mpt

from mpt_jax.alibi import alibi_slopes

# docs/model.md, ALiBi: the 16 slopes of the released model, 2^(-h/2).
MPT_1B_SLOPES = [
  0.70710678,
  0.5,
  0.35355339,
  0.25,
  0.17677670,
  0.125,
  0.08838835,
  0.0625,
  0.04419417,
  0.03125,
  0.02209709,
  0.015625,
  0.01104854,
  0.0078125,
  0.00552427,
  0.00390625,
]


@pytest.mark.parametrize("rule", ["mosaic_gpt", "mpt"])
def test_mpt_1b_slopes_match_the_spec(rule):
  np.testing.assert_allclose(alibi_slopes(16, 8, rule), MPT_1B_SLOPES, rtol=0, atol=5e-8)  # 8 decimals, float32


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 12, 16, 24])
def test_mpt_rule_matches_transformers(n_heads):
  """transformers' build_mpt_alibi_tensor is an independent implementation of the interleave rule."""
  hf = modeling_mpt.build_mpt_alibi_tensor(n_heads, 2)  # [N, 1, 2]: columns -slope, 0
  np.testing.assert_allclose(alibi_slopes(n_heads, 8, "mpt"), -hf[:, 0, 0].numpy(), rtol=1e-7)


@pytest.mark.parametrize("n_heads", [3, 6, 12])
def test_mosaic_gpt_rule_is_the_plain_formula_for_any_head_count(n_heads):
  expected = [2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)]
  np.testing.assert_allclose(alibi_slopes(n_heads, 8, "mosaic_gpt"), expected, rtol=1e-7)
  assert not np.allclose(alibi_slopes(n_heads, 8, "mosaic_gpt"), alibi_slopes(n_heads, 8, "mpt"))


def test_alibi_bias_max_sets_the_exponent_range():
  np.testing.assert_allclose(alibi_slopes(4, 4, "mosaic_gpt"), [2**-1, 2**-2, 2**-3, 2**-4], rtol=1e-7)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="n_heads"):
    alibi_slopes(0)
  with pytest.raises(ValueError, match="rule"):
    alibi_slopes(4, rule="bloom")
