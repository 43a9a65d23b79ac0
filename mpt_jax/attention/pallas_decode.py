"""One new query per row against a KV cache as a single Pallas kernel (Triton backend).

On a GPU, decode.py's multiply-and-reduce compiles to four XLA kernels per layer, ~20 us at
batch 1 for a 0.5 MB cache, one of them a reduction on only N thread blocks
(benchmarks/RESULTS.md, "Generation"). Here each program reads one (row, head)'s keys and
values once, block by block up to the query's position (later cache entries are never
loaded), with FlashAttention's online softmax in float32 and log2-unit scores as in
pallas_tiles.py. A single query has no matrix to multiply, so scores and the output are
elementwise products reduced on the CUDA cores. Same function as ``decode.attention``.

A program's blocks run one after another, each waiting on its loads, so with few (row,
head) pairs (batch 1: 16 programs on a 132-SM GPU) the kernel is latency-bound and grows
with the cache. Then the cache is split (flash-decoding): each (row, head) gets up to
``splits`` programs over consecutive parts of the cache, each writing its part's normalized
output and log2-sum-exp, and XLA combines the parts with softmax weights.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.attention import decode, masks
from mpt_jax.attention import pallas_tiles as tiles

BLOCK_K = 64  # cache positions per loop step
# About eight programs per SM of an H100 / H200 (132). Per layer on an H200: batch 1 with 2048
# cached positions, 32 parts per head took 6.1 us where 16 took 7.7 and 8 took 11.8; batch 16
# with 288 positions, 3 parts 10.0 us where the unsplit kernel took 11.1 (benchmarks/RESULTS.md).
TARGET_PROGRAMS = 1024


def supports(q, k) -> bool:
  """Whether ``attention`` takes these shapes: one query per row, a power-of-two head_dim >= 16."""
  head_dim = q.shape[-1]
  return q.shape[1] == 1 and head_dim >= 16 and not head_dim & (head_dim - 1)


@functools.partial(jax.jit, static_argnames=("scale", "splits", "interpret"))
def attention(q, k, v, *, slopes, q_offset, scale=None, splits=None, interpret=False):
  """Causal ALiBi attention of q at position q_offset over the cache positions <= q_offset.

  Args: as ``decode.attention``: q [B, 1, N, H]; k, v [B, S, N, H]; slopes [N]; q_offset a
  scalar or int [B] (may be traced); scale defaults to 1/sqrt(H). ``splits``: parts of the
  cache per (row, head), each its own program (default: enough for ~TARGET_PROGRAMS
  programs). ``interpret``: run in the Pallas interpreter (any backend, slow).

  Returns:
    [B, 1, N, H] in q's dtype.
  """
  decode.check_shapes(q, k, v)
  return _call([(q, None)], k, v, slopes, q_offset, scale=scale, splits=splits, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "splits", "interpret"))
def write_and_attend(qkv, k_cache, v_cache, *, slopes, q_offset, scale=None, splits=None, interpret=False):
  """``decode.write_cache`` of the step's key and value at q_offset, then ``attention``, in one kernel.

  Each program writes its (row, head)'s new key and value into the caches (aliased to the
  outputs, so in place inside a compiled decode loop) and uses them for the query's own
  position from registers, so no XLA scatter and select run beside the kernel. The query,
  key and value are read where they lie in the fused QKV product, not sliced out first.

  Args: qkv [B, 1, 3, N, H], the step's query, key and value; k_cache, v_cache [B, S, N, H];
    the rest as ``attention``.

  Returns:
    (out [B, 1, N, H] in qkv's dtype, k_cache, v_cache).
  """
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv must be [B, 1, 3, N, H], got {qkv.shape}")
  decode.check_shapes(qkv[:, :, 0], k_cache, v_cache)
  rows = [(qkv, part) for part in range(3)]
  return _call(rows, k_cache, v_cache, slopes, q_offset, scale=scale, splits=splits, interpret=interpret)


def _vector_spec(head_dim: int, part: int | None = None) -> pl.BlockSpec:
  """The BlockSpec of program (row b, head h, ...)'s [H] vector in a [B, 1, N, H] array, or in
  part ``part`` of a [B, 1, 3, N, H] one."""
  if part is None:
    return pl.BlockSpec((None, None, None, head_dim), lambda b, h, *split: (b, 0, h, 0))
  return pl.BlockSpec((None, None, None, None, head_dim), lambda b, h, *split: (b, 0, part, h, 0))


def _call(rows, k, v, slopes, q_offset, *, scale, splits, interpret):
  """The pallas_call of ``attention`` (rows: the query) or ``write_and_attend`` (rows: the
  query, the new key and the new value); each row operand comes with its part of the fused
  QKV product, or None for a [B, 1, N, H] query. ``splits`` as ``split_plan``.

  The grid is (B, N, splits), or (B, N) unsplit: the same kernel on a (B, N, 1) grid measured
  16% slower at batch 64 (29 -> 33 us per layer on an H200; not yet profiled), so unsplit it
  is the kernel as it was before splitting.
  """
  batch, seq_len, heads, head_dim = k.shape
  (q, q_part), *new = rows
  offsets = jnp.broadcast_to(jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1,)), (batch,))
  scale = head_dim**-0.5 if scale is None else scale
  block_k, splits, blocks_per_split = split_plan(batch * heads, seq_len, splits)
  cache_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, *split: (b, 0, h, 0))
  if splits == 1:
    out_specs = [_vector_spec(head_dim)]
    out_shapes = [jax.ShapeDtypeStruct((batch, 1, heads, head_dim), q.dtype)]
  else:  # each part's output [B, splits, N, H] and log2-sum-exp [B, splits, N]
    out_specs = [
      pl.BlockSpec((None, None, None, head_dim), lambda b, h, s: (b, s, h, 0)),
      pl.BlockSpec((None, None, None), lambda b, h, s: (b, s, h)),
    ]
    out_shapes = [
      jax.ShapeDtypeStruct((batch, splits, heads, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, splits, heads), jnp.float32),
    ]
  operands = [q, k, v, jnp.asarray(slopes, jnp.float32), offsets]
  in_specs = [
    _vector_spec(head_dim, q_part),
    cache_spec,
    cache_spec,
    pl.BlockSpec((None,), lambda b, h, *split: (h,)),
    pl.BlockSpec((None,), lambda b, h, *split: (b,)),
  ]
  aliases = {}
  if new:
    operands += [array for array, _ in new]
    in_specs += [_vector_spec(head_dim, part) for _, part in new]
    out_specs += [cache_spec, cache_spec]
    out_shapes += [k, v]
    aliases = {1: len(out_shapes) - 2, 2: len(out_shapes) - 1}  # k, v -> the written caches
  kernel = functools.partial(
    _kernel, scale=scale, block_k=block_k, blocks_per_split=blocks_per_split, splits=splits, write=bool(new)
  )
  outs = pl.pallas_call(
    kernel,
    grid=(batch, heads, splits) if splits > 1 else (batch, heads),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shapes,
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="alibi_decode_attention",
  )(*operands)
  if splits > 1:
    outs = [_combine(*outs[:2], q.dtype), *outs[2:]]
  return tuple(outs) if new else outs[0]


def split_plan(pairs: int, seq_len: int, splits: int | None = None) -> tuple[int, int, int]:
  """(block_k, parts, blocks per part) for ``pairs`` (row, head) pairs over a ``seq_len`` cache.

  ``splits`` None: enough parts for about TARGET_PROGRAMS programs, at most one per block.
  Parts are whole blocks, so fewer than asked may come back (none lies wholly past the cache).
  """
  block_k = min(BLOCK_K, pl.next_power_of_2(seq_len))
  blocks = pl.cdiv(seq_len, block_k)
  splits = splits or max(1, min(blocks, TARGET_PROGRAMS // pairs))
  blocks_per_split = pl.cdiv(blocks, splits)
  return block_k, pl.cdiv(blocks, blocks_per_split), blocks_per_split


def _combine(parts, lse, dtype):
  """parts [B, splits, N, H], each part's softmax output, and their log2-sum-exps [B, splits, N] -> [B, 1, N, H].

  Part 0 holds position 0, never masked, so every row's largest log2-sum-exp is finite.
  """
  weights = jnp.exp2(lse - lse.max(axis=1, keepdims=True))  # [B, splits, N]
  out = jnp.sum(parts * weights[..., None], axis=1) / jnp.sum(weights, axis=1)[..., None]
  return out[:, None].astype(dtype)


def _kernel(
  q_ref,
  k_ref,
  v_ref,
  slope_ref,
  offset_ref,
  *refs,
  scale: float,
  block_k: int,
  blocks_per_split: int,
  splits: int,
  write: bool,
):
  """One part of one (row, head)'s cache: q_ref [H]; k_ref, v_ref [S, H]; the slope and the query position as scalars.

  ``refs``: with ``write``, k_new_ref, v_new_ref [H] first; then out_ref [H] (or, split in
  parts, this part's output [H] and its log2-sum-exp, a scalar); then, with ``write``, the
  written caches k_out_ref, v_out_ref [S, H] (the same buffers as k_ref, v_ref).
  """
  new = None
  if write:
    k_new_ref, v_new_ref, *refs = refs
    new = k_new_ref[...].astype(k_ref.dtype), v_new_ref[...].astype(v_ref.dtype)
  split = splits > 1
  outputs = 2 if split else 1
  out_refs, cache_out_refs = refs[:outputs], refs[outputs:]
  q = q_ref[...].astype(jnp.float32) * (scale * tiles.LOG2E)
  q_pos = offset_ref[...]
  slope = slope_ref[...] * tiles.LOG2E
  first_block = pl.program_id(2) * blocks_per_split if split else 0
  if new is not None:
    # As a dynamic_update_slice, a position past the cache writes its last entry; the part holding it writes.
    at = jnp.minimum(q_pos, k_ref.shape[0] - 1)

    def write():
      for cache_out, value in zip(cache_out_refs, new):
        tiles.store(cache_out.at[pl.ds(at, 1)], value[None, :])

    if split:
      at_block = lax.div(at, block_k)
      pl.when((first_block <= at_block) & (at_block < first_block + blocks_per_split))(write)
    else:
      write()

  def cache_block(ref, start, keep, k_pos, new_value):
    """The cache rows [start, start + block_k) (masked rows read as zeros), with the new row at the query's position."""
    block = tiles.load(ref.at[pl.ds(start, block_k)], keep)
    if new is None:
      return block
    return jnp.where((k_pos == q_pos)[:, None], new_value[None, :], block)

  def visit(block, carry):
    acc, row_max, row_sum = carry
    start = block * block_k
    k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
    keep = masks.keep_mask(q_pos, k_pos, causal=True)  # also keeps loads inside the cache
    k = cache_block(k_ref, start, keep, k_pos, None if new is None else new[0])
    bias = masks.alibi_bias(slope, q_pos, k_pos, causal=True)
    s = jnp.where(keep, jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1) + bias, masks.MASK_VALUE)
    new_max = jnp.maximum(row_max, s.max())
    rescale = jnp.exp2(row_max - new_max)
    p = jnp.exp2(s - new_max)
    v = cache_block(v_ref, start, keep, k_pos, None if new is None else new[1])
    weighted = p.astype(v.dtype).astype(jnp.float32)[:, None] * v.astype(jnp.float32)
    return acc * rescale + jnp.sum(weighted, axis=0), new_max, row_sum * rescale + p.sum()

  init = (jnp.zeros(q.shape, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0))
  last_block = lax.div(q_pos, block_k) + 1  # the query's block is the last with keys to see
  if split:
    last_block = jnp.minimum(first_block + blocks_per_split, last_block)
  acc, row_max, row_sum = lax.fori_loop(first_block, last_block, visit, init)
  if not split:
    (out_ref,) = out_refs
    out_ref[...] = (acc / row_sum).astype(out_ref.dtype)
    return
  part_ref, lse_ref = out_refs
  visited = row_sum > 0  # parts past the query saw no key
  part_ref[...] = jnp.where(visited, acc / jnp.where(visited, row_sum, 1.0), 0.0)
  lse_ref[...] = jnp.where(visited, row_max + jnp.log2(jnp.where(visited, row_sum, 1.0)), -jnp.inf)
