"""Position-wise pieces of attention scores shared by every implementation.

Each function takes query and key positions (and segment ids) that broadcast against each
other, so the XLA reference calls them on whole [T, S] grids and a kernel on one tile.
"""

import jax.numpy as jnp

# Finite, so a fully masked row gives a uniform softmax instead of NaN; torch uses finfo.min.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def alibi_bias(slope, q_pos, k_pos, *, causal: bool):
  """ALiBi bias ``slope * (k - q)``; non-causal attention uses ``-slope * |k - q|``."""
  distance = (k_pos - q_pos).astype(jnp.float32)
  if not causal:
    distance = -jnp.abs(distance)
  return slope * distance


def keep_mask(q_pos, k_pos, q_segment=None, k_segment=None, *, causal: bool):
  """True where a query may attend to a key: causal order and the same packed document."""
  keep = k_pos <= q_pos if causal else jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
  if q_segment is not None:
    keep = keep & (q_segment == k_segment)
  return keep
