"""Pieces shared by the Pallas-Triton attention kernels (forward and backward).

Inside kernels: tile positions, row-masked loads, ALiBi, masks and scores. Around them: the
loop bounds and segment-block ranges that decide which tiles a program visits, and the
launch order of query blocks.

Kernels work on score tiles in log2 units, ``s = log2(e) * (scale * q.k + ALiBi)``, so the
softmax needs only ``exp2`` (one MUFU instruction on NVIDIA GPUs), as the FlashAttention-2
kernels and the Triton fused-attention tutorial do. The ALiBi bias and the masks are
``masks.alibi_bias`` / ``masks.keep_mask`` evaluated on the tile's positions, the same
functions the XLA reference evaluates on the whole [T, S] grid; causal ALiBi is split into a
per-key and a per-query term (``alibi_key_term``) so it costs no extra work per score.
"""

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.attention import masks

LOG2E = math.log2(math.e)


def positions(start, size: int):
  """Positions start .. start + size - 1 of one tile, as float32.

  Float, so the ALiBi distance is one subtraction per score; exact below 2**24.
  """
  return (start + jnp.arange(size, dtype=jnp.int32)).astype(jnp.float32)


def load(ref, valid=None):
  """Reads a tile; rows where ``valid`` is False (past the sequence end) read as zeros."""
  if valid is None:
    return plgpu.load(ref)
  return plgpu.load(ref, mask=_rows(valid, ref.ndim), other=0)


def store(ref, value, valid=None):
  """Writes a tile in the ref's dtype, skipping rows where ``valid`` is False."""
  mask = None if valid is None else _rows(valid, ref.ndim)
  plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def _rows(valid, ndim: int):
  return valid if ndim == 1 else valid[:, None]


def dot(a, b, *, trans_b: bool = False):
  """``a @ b`` (``a @ b.T``) accumulated in float32; HIGHEST keeps float32 inputs off TF32."""
  return plgpu.dot(a, b, trans_b=trans_b, precision=lax.Precision.HIGHEST)


def alibi_key_term(slope, q_pos, k_pos, *, origin, causal: bool):
  """The ALiBi a kernel adds to every score of a tile, in log2 units.

  Causal ALiBi is linear, ``slope*(k - q) = slope*(k - o) + slope*(o - q)`` for any origin
  o: a kernel adds the key term, a vector broadcast across the tile that fuses with the
  scaling into one multiply-add per score, and moves the query term (``alibi_query_term``),
  constant along each softmax row, into the row's logsumexp. With o at the tile's first
  query (or key) both terms stay small where the weights are large, so rounding matches the
  direct form. Non-causal ALiBi, ``-slope*|k - q|``, does not split: the key term is then
  the whole tile and the query term zero.
  """
  if causal:
    return masks.alibi_bias(slope * LOG2E, origin, k_pos, causal=True)
  return masks.alibi_bias(slope * LOG2E, q_pos, k_pos, causal=False)


def alibi_query_term(slope, q_pos, *, origin, causal: bool):
  """The per-query rest of the ALiBi (log2 units) that ``alibi_key_term`` leaves out."""
  if causal:
    return masks.alibi_bias(slope * LOG2E, q_pos, origin, causal=True)
  return jnp.zeros_like(q_pos)


def keep_mask(q_pos, k_pos, q_segment, k_segment, *, causal: bool, seq_len: int | None):
  """Where a tile's scores count, or None if they all do.

  ``masks.keep_mask`` on the tile's positions and segments; ``causal`` False for tiles wholly
  below the diagonal; ``seq_len`` (or None) also masks the padded part of a ragged last tile.
  """
  keep = None
  if causal or q_segment is not None:
    keep = masks.keep_mask(q_pos, k_pos, q_segment, k_segment, causal=causal)
  if seq_len is not None:
    in_bounds = (q_pos < seq_len) & (k_pos < seq_len)
    keep = in_bounds if keep is None else keep & in_bounds
  return keep


def scores(qk, *, bias, keep, scale: float):
  """Log2-unit scores of one tile from its raw q.k products, the ALiBi key term and the mask."""
  s = qk * (scale * LOG2E) + bias
  return s if keep is None else jnp.where(keep, s, masks.MASK_VALUE)


class QueryTile(NamedTuple):
  """One program's block of queries, as the forward and dQ kernels hold it across key blocks."""

  start: jax.Array  # first query position
  pos: jax.Array  # [block_q] float32 positions
  valid: jax.Array | None  # [block_q] rows inside the sequence; None if the length is a block multiple
  q: jax.Array  # [block_q, H]
  segment: jax.Array | None  # [block_q, 1] segment ids, or None unpacked
  slope: jax.Array  # this head's ALiBi slope
  origin: jax.Array  # the ALiBi origin (alibi_key_term): the tile's first query position


def query_tile(q_ref, segment_ids_ref, slope_ref, *, seq_len: int, ragged: bool) -> QueryTile:
  """Loads this program's query block; programs take query blocks heaviest first."""
  block_q = q_ref.shape[0]
  start = heaviest_first(pl.program_id(0), num_blocks=pl.num_programs(0)) * block_q
  pos = positions(start, block_q)
  valid = pos < seq_len if ragged else None
  segment = None
  if segment_ids_ref is not None:
    segment = load(segment_ids_ref.at[pl.ds(start, block_q)], valid)[:, None]
  return QueryTile(start, pos, valid, load(q_ref, valid), segment, slope_ref[...], start.astype(jnp.float32))


def key_tile_scores(
  query: QueryTile,
  k_ref,
  v_ref,
  segment_ids_ref,
  k_block,
  *,
  block_k: int,
  seq_len: int,
  ragged: bool,
  masked: bool,
  causal: bool,
  scale: float,
):
  """Loads key block ``k_block`` and scores the query tile against it: (s [block_q, block_k], k, v).

  ``masked`` blocks (on the diagonal, or the ragged last one) apply the causal and bounds
  masks; the segment mask applies whenever there are segments.
  """
  k_start = k_block * block_k
  k_pos = positions(k_start, block_k)
  k_valid = k_pos < seq_len if masked and ragged else None
  k = load(k_ref.at[pl.ds(k_start, block_k)], k_valid)
  v = load(v_ref.at[pl.ds(k_start, block_k)], k_valid)
  k_segment = None
  if segment_ids_ref is not None:
    k_segment = load(segment_ids_ref.at[pl.ds(k_start, block_k)], k_valid)[None, :]
  s = scores(
    dot(query.q, k, trans_b=True),
    bias=alibi_key_term(query.slope, query.pos[:, None], k_pos[None, :], origin=query.origin, causal=causal),
    keep=keep_mask(
      query.pos[:, None],
      k_pos[None, :],
      query.segment,
      k_segment,
      causal=masked and causal,
      seq_len=seq_len if masked and ragged else None,
    ),
    scale=scale,
  )
  return s, k, v


def key_blocks(q_start, *, block_q: int, block_k: int, seq_len: int, causal: bool):
  """Key blocks one query block visits: ``[start, split)`` unmasked, ``[split, end)`` masked.

  Causal: blocks wholly before the query block need no mask; blocks past the diagonal are
  outside the loop bounds, so they are never loaded. Non-causal: only a ragged last block
  needs a mask.
  """
  if not causal:
    return 0, seq_len // block_k, pl.cdiv(seq_len, block_k)
  end = pl.cdiv(jnp.minimum(q_start + block_q, seq_len), block_k)
  return 0, lax.div(q_start, block_k), end


def query_blocks(k_start, *, block_q: int, block_k: int, seq_len: int, causal: bool):
  """Query blocks one key block visits: ``[start, split)`` masked, ``[split, end)`` unmasked.

  Causal: queries before the key block never see it (loop bounds), the diagonal blocks need
  the mask, the rest see the whole key block. A ragged length masks every block, since the
  ragged query block is the last one.
  """
  end = pl.cdiv(seq_len, block_q)
  start = lax.div(k_start, block_q) if causal else 0
  if seq_len % block_q or seq_len % block_k:
    return start, end, end
  if not causal:
    return start, start, end
  return start, jnp.minimum(pl.cdiv(k_start + block_k, block_q), end), end


def clip_blocks(start, split, end, lo, hi):
  """Narrows a block loop ``[start, split) + [split, end)`` to the blocks in ``[lo, hi)``."""
  start = jnp.maximum(start, lo)
  split = jnp.maximum(jnp.minimum(split, hi), start)
  return start, split, jnp.maximum(jnp.minimum(end, hi), split)


def segment_block_ranges(segment_ids, *, block_q: int, block_k: int):
  """The blocks that can share a segment: ``(k_lo, k_hi)`` [B, query blocks], ``(q_lo, q_hi)`` [B, key blocks].

  Query block i and key block j can hold tokens of one segment only if their segment-id
  ranges ``[min, max]`` meet; every other pair is wholly masked, so kernels skip it (packed
  documents then cost work only within documents). Query block i's partners are the key
  blocks ``[k_lo[b, i], k_hi[b, i])``, key block j's the query blocks ``[q_lo[b, j], q_hi[b,
  j])``. Both describe one set of tiles, a staircase (all four bounds non-decreasing), so a
  kernel over query blocks and one over key blocks visit the same tiles, and a program's
  range over several consecutive blocks is its first block's lo to its last block's hi.
  Exact for sorted ids (packing), a safe superset for any ids.
  """
  batch, seq_len = segment_ids.shape

  def block_min_max(block):
    num_blocks = pl.cdiv(seq_len, block)
    # Edge padding repeats the last id, so a ragged last block's range does not grow.
    padded = jnp.pad(segment_ids, ((0, 0), (0, num_blocks * block - seq_len)), mode="edge")
    padded = padded.reshape(batch, num_blocks, block)
    return padded.min(axis=-1), padded.max(axis=-1)

  q_min, q_max = block_min_max(block_q)
  k_min, k_max = block_min_max(block_k)
  meets = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])  # [B, nq, nk]
  num_k = meets.shape[-1]
  k_lo, k_hi = jnp.argmax(meets, axis=-1), num_k - jnp.argmax(meets[..., ::-1], axis=-1)
  # Widened to a staircase: lo the minimum over this and later query blocks, hi the maximum
  # over this and earlier ones (no change for sorted ids, whose ranges already rise).
  k_lo = lax.cummin(k_lo, axis=1, reverse=True)
  k_hi = lax.cummax(k_hi, axis=1)
  # Key block j partners query block i iff k_lo[i] <= j < k_hi[i]: with both rising, a run of i.
  key_block = jnp.arange(num_k)[None, :, None]
  q_lo = jnp.sum(k_hi[:, None, :] <= key_block, axis=-1)
  q_hi = jnp.maximum(jnp.sum(k_lo[:, None, :] <= key_block, axis=-1), q_lo)
  return tuple(x.astype(jnp.int32) for x in (k_lo, k_hi)), tuple(x.astype(jnp.int32) for x in (q_lo, q_hi))


def segment_operands(segment_ids, *, block_q: int, block_k: int, grid_over: Literal["q", "k"], block_index=lambda i: i):
  """In-specs and operands for a kernel's segment ids and the range of partner blocks of its block.

  ``grid_over``: "q" for a grid over query blocks (ranges of key blocks), "k" for one over
  key blocks; ``block_index`` maps the grid index to the block. Three Nones without segments.
  """
  if segment_ids is None:
    return [None] * 3, [None] * 3
  k_range, q_range = segment_block_ranges(segment_ids, block_q=block_q, block_k=block_k)
  range_spec = pl.BlockSpec((None, None), lambda i, b, h: (b, block_index(i)))
  row_spec = pl.BlockSpec((None, segment_ids.shape[1]), lambda i, b, h: (b, 0))
  return [row_spec, range_spec, range_spec], [segment_ids, *(k_range if grid_over == "q" else q_range)]


def heaviest_first(i, *, num_blocks):
  """Grid index -> query block, last block first.

  Programs launch in grid order and, under the causal mask, later query blocks visit more
  key blocks: starting them first leaves short programs for the tail of the launch (longest
  processing time first).
  """
  return num_blocks - 1 - i
