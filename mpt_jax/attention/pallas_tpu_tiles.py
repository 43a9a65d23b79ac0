"""Pieces shared by the Pallas-TPU (Mosaic) attention kernels, forward and backward.

Around the kernels: the block plan, computed by XLA before each ``pallas_call``, that says
for every pair of a query block and a key block whether the pair is skipped (wholly masked:
above the causal diagonal, past the sequence end, or pairing two different packed
documents), computed without a mask, or computed with the element mask; and, per outer
block, the first and last inner block visited, so index maps clamp to that range and the
pipeline issues no DMA for skipped blocks (it elides a copy whose block index is unchanged).
Inside the kernels: one score tile with ALiBi and masks from ``masks``, the same functions
the XLA reference evaluates on the whole [T, S] grid.

TPU layout: tiles' last two dimensions are (sublanes, lanes) = (8, 128). Per-row statistics
of a [rows, cols] tile live as columns, so they are kept broadcast across 128 lanes
([.., T, 128], as jax's TPU flash attention does) where a kernel needs a column and as
rows ([.., 1, T]) where it needs a row; segment ids likewise as [B, T, 128] (columns) and
[B, 8, T] (rows).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.attention import masks

LANES = 128
SUBLANES = 8

SKIP, FULL, MASKED = 0, 1, 2


class Plan(NamedTuple):
  """Which inner blocks each outer block visits; flat int32 arrays, prefetched to SMEM.

  codes[(b * outer + o) * inner + i]: SKIP, FULL or MASKED; lo/hi[b * outer + o]: the first
  and last inner block visited (0 and 0 when none is).
  """

  codes: jax.Array
  lo: jax.Array
  hi: jax.Array


def plan(
  segment_ids, *, batch: int, padded_len: int, seq_len: int, block_q: int, block_k: int, causal: bool, outer: str
) -> Plan:
  """The block plan for a grid whose outer block axis is queries (``outer="q"``) or keys ("k").

  Args:
    segment_ids: int32 [B, padded_len] or None (padding rows repeat the last id).
    seq_len: the unpadded length; keys and queries past it are never visited or are masked.
  """
  num_q, num_k = padded_len // block_q, padded_len // block_k
  q_first = jnp.arange(num_q)[:, None] * block_q  # [Q, 1]
  k_first = jnp.arange(num_k)[None, :] * block_k  # [1, K]
  q_last, k_last = q_first + block_q - 1, k_first + block_k - 1
  visit = (k_first < seq_len) & (q_first < seq_len)
  masked = k_last >= seq_len
  if causal:
    visit &= k_first <= q_last
    masked |= k_last > q_first
  visit, masked = (jnp.broadcast_to(x, (batch, num_q, num_k)) for x in (visit, masked))
  if segment_ids is not None:
    q_seg = segment_ids.reshape(batch, num_q, block_q)
    k_seg = segment_ids.reshape(batch, num_k, block_k)
    q_min, q_max = q_seg.min(-1)[:, :, None], q_seg.max(-1)[:, :, None]  # [B, Q, 1]
    k_min, k_max = k_seg.min(-1)[:, None, :], k_seg.max(-1)[:, None, :]  # [B, 1, K]
    visit &= (q_min <= k_max) & (k_min <= q_max)
    masked |= ~((q_min == q_max) & (k_min == k_max) & (q_min == k_min))
  codes = jnp.where(visit, jnp.where(masked, MASKED, FULL), SKIP).astype(jnp.int32)  # [B, Q, K]
  if outer == "k":
    codes = codes.transpose(0, 2, 1)
  elif outer != "q":
    raise ValueError(f"outer must be 'q' or 'k', got {outer!r}")
  inner = codes.shape[-1]
  index = jnp.arange(inner, dtype=jnp.int32)
  any_visit = (codes != SKIP).any(-1)
  lo = jnp.where(any_visit, jnp.min(jnp.where(codes != SKIP, index, inner), -1), 0)
  hi = jnp.where(any_visit, jnp.max(jnp.where(codes != SKIP, index, -1), -1), 0)
  return Plan(codes.reshape(-1), lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32))


def segment_layouts(segment_ids):
  """int32 [B, T] -> columns [B, T, 128] (ids across the lanes) and rows [B, 8, T] (across the sublanes)."""
  batch, length = segment_ids.shape
  return (
    jnp.broadcast_to(segment_ids[:, :, None], (batch, length, LANES)),
    jnp.broadcast_to(segment_ids[:, None, :], (batch, SUBLANES, length)),
  )


def clamp(block, lo_ref, hi_ref, row):
  """The inner block an index map fetches: ``block`` held inside [lo, hi] of its outer block."""
  return jnp.minimum(jnp.maximum(block, lo_ref[row]), hi_ref[row])


def dot(a, b, *, trans_b: bool = False):
  """``a @ b`` (``a @ b.T``) accumulated in float32; float32 inputs at full precision."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scores(
  qk,
  *,
  slope,
  q_start,
  k_start,
  q_segment,
  k_segment,
  scale: float,
  causal: bool,
  masked: bool,
  seq_len: int,
  transposed: bool = False,
):
  """``scale * q.k + ALiBi``, masked to MASK_VALUE where ``masked``; a [rows, cols] tile.

  ``transposed``: the tile is [keys, queries] (the dK/dV kernel), else [queries, keys].
  q_segment/k_segment broadcast against the tile (a column and a row, or the reverse).
  """
  shape = qk.shape
  q_axis, k_axis = (1, 0) if transposed else (0, 1)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
  s = qk * scale + masks.alibi_bias(slope, q_pos, k_pos, causal=causal)
  if masked:
    keep = masks.keep_mask(q_pos, k_pos, q_segment, k_segment, causal=causal) & (k_pos < seq_len)
    s = jnp.where(keep, s, masks.MASK_VALUE)
  return s


def interpret_params(interpret: bool):
  """What each pallas_call takes as ``interpret``: the TPU interpreter (on CPU) or compiled."""
  return pltpu.InterpretParams() if interpret else False


def compiler_params(num_parallel: int):
  """Outer grid axes parallel (split across a megacore's two TensorCores), the inner loop sequential."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_parallel + ("arbitrary",))
