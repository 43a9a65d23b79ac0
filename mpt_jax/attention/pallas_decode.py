"""One new query per row against a KV cache as a single Pallas kernel (Triton backend).

On a GPU, decode.py's multiply-and-reduce compiles to four XLA kernels per layer, ~20 us at
batch 1 for a 0.5 MB cache, one of them a reduction on only N thread blocks
(benchmarks/RESULTS.md, "Generation"). Here one program per (row, head) reads that row's
keys and values once, block by block up to the query's position (later cache entries are
never loaded), with FlashAttention's online softmax in float32 and log2-unit scores as in
pallas_tiles.py. A single query has no matrix to multiply, so scores and the output are
elementwise products reduced on the CUDA cores. Same function as ``decode.attention``.
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


def supports(q, k) -> bool:
  """Whether ``attention`` takes these shapes: one query per row, a power-of-two head_dim >= 16."""
  head_dim = q.shape[-1]
  return q.shape[1] == 1 and head_dim >= 16 and not head_dim & (head_dim - 1)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def attention(q, k, v, *, slopes, q_offset, scale=None, interpret=False):
  """Causal ALiBi attention of q at position q_offset over the cache positions <= q_offset.

  Args: as ``decode.attention``: q [B, 1, N, H]; k, v [B, S, N, H]; slopes [N]; q_offset a
  scalar or int [B] (may be traced); scale defaults to 1/sqrt(H). ``interpret``: run in the
  Pallas interpreter (any backend, slow).

  Returns:
    [B, 1, N, H] in q's dtype.
  """
  decode.check_shapes(q, k, v)
  return _call([(q, _row_spec(q.shape[-1]))], k, v, slopes, q_offset, scale=scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def write_and_attend(qkv, k_cache, v_cache, *, slopes, q_offset, scale=None, interpret=False):
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
  rows = [(qkv, _part_spec(part, qkv.shape[-1])) for part in range(3)]
  return _call(rows, k_cache, v_cache, slopes, q_offset, scale=scale, interpret=interpret)


def _row_spec(head_dim: int) -> pl.BlockSpec:
  """The BlockSpec of one (row, head)'s [H] vector in a [B, 1, N, H] array."""
  return pl.BlockSpec((None, None, None, head_dim), lambda b, h: (b, 0, h, 0))


def _part_spec(part: int, head_dim: int) -> pl.BlockSpec:
  """The BlockSpec of one (row, head)'s [H] vector in part ``part`` of a [B, 1, 3, N, H] array."""
  return pl.BlockSpec((None, None, None, None, head_dim), lambda b, h: (b, 0, part, h, 0))


def _call(rows, k, v, slopes, q_offset, *, scale, interpret):
  """The pallas_call of ``attention`` (rows: the query) or ``write_and_attend`` (rows: the
  query, the new key and the new value); each row operand comes with the BlockSpec that
  picks one (row, head)'s [H] vector out of it.
  """
  batch, seq_len, heads, head_dim = k.shape
  (q, row_spec), *new = rows
  offsets = jnp.broadcast_to(jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1,)), (batch,))
  scale = head_dim**-0.5 if scale is None else scale
  out_spec = _row_spec(head_dim)
  cache_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h: (b, 0, h, 0))
  out_shape = jax.ShapeDtypeStruct((batch, 1, heads, head_dim), q.dtype)
  operands = [q, k, v, jnp.asarray(slopes, jnp.float32), offsets]
  in_specs = [
    row_spec,
    cache_spec,
    cache_spec,
    pl.BlockSpec((None,), lambda b, h: (h,)),
    pl.BlockSpec((None,), lambda b, h: (b,)),
  ]
  out_shapes, out_specs, aliases = out_shape, out_spec, {}
  if new:
    operands += [array for array, _ in new]
    in_specs += [spec for _, spec in new]
    out_shapes, out_specs = (out_shape, k, v), (out_spec, cache_spec, cache_spec)
    aliases = {1: 1, 2: 2}  # k, v -> the written caches
  return pl.pallas_call(
    functools.partial(_kernel, scale=scale, block_k=min(BLOCK_K, pl.next_power_of_2(seq_len))),
    grid=(batch, heads),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shapes,
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="alibi_decode_attention",
  )(*operands)


def _kernel(q_ref, k_ref, v_ref, slope_ref, offset_ref, *refs, scale: float, block_k: int):
  """One (row, head): q_ref [H]; k_ref, v_ref [S, H]; the slope and the query position as scalars.

  ``refs``: out_ref [H]; or k_new_ref, v_new_ref [H], then out_ref and the written caches
  k_out_ref, v_out_ref [S, H] (the same buffers as k_ref, v_ref).
  """
  new = None
  if len(refs) == 1:
    (out_ref,) = refs
  else:
    k_new_ref, v_new_ref, out_ref, k_out_ref, v_out_ref = refs
    new = k_new_ref[...].astype(k_ref.dtype), v_new_ref[...].astype(v_ref.dtype)
  q = q_ref[...].astype(jnp.float32) * (scale * tiles.LOG2E)
  q_pos = offset_ref[...]
  slope = slope_ref[...] * tiles.LOG2E
  if new is not None:
    # As a dynamic_update_slice, a position past the cache writes its last entry.
    at = jnp.minimum(q_pos, k_ref.shape[0] - 1)
    for cache_out, value in zip((k_out_ref, v_out_ref), new):
      tiles.store(cache_out.at[pl.ds(at, 1)], value[None, :])

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
  acc, _, row_sum = lax.fori_loop(0, lax.div(q_pos, block_k) + 1, visit, init)
  out_ref[...] = (acc / row_sum).astype(out_ref.dtype)
