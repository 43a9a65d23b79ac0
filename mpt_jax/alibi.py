"""ALiBi (Press et al., 2022) slopes and bias, as MPT computes them.

Slopes are per-head constants; the bias a query at position i gives a key at position j
is ``slope * (j - i)`` (<= 0 under the causal mask). MosaicGPT v0.0.4 stores the
key-only form ``slope * (j - (S - 1))``, which differs from ours by a per-row constant
that softmax cancels (docs/model.md, ALiBi); the relative form is the one that stays
right for packed documents and cached decoding, so every implementation here uses it.
"""

from typing import Literal

import numpy as np

SlopeRule = Literal["mosaic_gpt", "mpt"]


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0, rule: SlopeRule = "mosaic_gpt") -> np.ndarray:
  """Per-head ALiBi slopes, float32 [n_heads].

  Args:
    n_heads: number of attention heads.
    alibi_bias_max: the exponent range; slopes are 2^(-alibi_bias_max * h / n) .
    rule: "mosaic_gpt" is examples v0.0.4 (the released 1B): ``m_h = h * max / n`` for
      h = 1..n, whatever n is. "mpt" is llm-foundry / transformers: slopes for the next
      power of two n', then ``concat(s[1::2], s[::2])[:n]``. Both agree when n is a
      power of two (docs/model.md, ALiBi).
  """
  if n_heads < 1:
    raise ValueError(f"alibi_slopes needs n_heads >= 1, got {n_heads=}")
  if rule == "mosaic_gpt":
    m = np.arange(1, n_heads + 1, dtype=np.float64) * alibi_bias_max / n_heads
    return (1.0 / 2.0**m).astype(np.float32)
  if rule == "mpt":
    padded = 1 << (n_heads - 1).bit_length()
    m = np.arange(1, padded + 1, dtype=np.float64) * alibi_bias_max / padded
    slopes = 1.0 / 2.0**m
    if padded != n_heads:
      slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)
  raise ValueError(f"unknown ALiBi slope rule {rule!r}; expected 'mosaic_gpt' or 'mpt'")
