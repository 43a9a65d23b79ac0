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
  batch, seq_len, heads, head_dim = k.shape
  offsets = jnp.broadcast_to(jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1,)), (batch,))
  scale = head_dim**-0.5 if scale is None else scale
  row_spec = pl.BlockSpec((None, None, None, head_dim), lambda b, h: (b, 0, h, 0))
  cache_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h: (b, 0, h, 0))
  return pl.pallas_call(
    functools.partial(_kernel, scale=scale, block_k=min(BLOCK_K, pl.next_power_of_2(seq_len))),
    grid=(batch, heads),
    in_specs=[
      row_spec,
      cache_spec,
      cache_spec,
      pl.BlockSpec((None,), lambda b, h: (h,)),
      pl.BlockSpec((None,), lambda b, h: (b,)),
    ],
    out_specs=row_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="alibi_decode_attention",
  )(q, k, v, jnp.asarray(slopes, jnp.float32), offsets)


def _kernel(q_ref, k_ref, v_ref, slope_ref, offset_ref, out_ref, *, scale: float, block_k: int):
  """One (row, head): q_ref [H]; k_ref, v_ref [S, H]; the slope and the query position as scalars."""
  q = q_ref[...].astype(jnp.float32) * (scale * tiles.LOG2E)
  q_pos = offset_ref[...]
  slope = slope_ref[...] * tiles.LOG2E

  def visit(block, carry):
    acc, row_max, row_sum = carry
    start = block * block_k
    k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
    keep = masks.keep_mask(q_pos, k_pos, causal=True)  # also keeps loads inside the cache
    k = tiles.load(k_ref.at[pl.ds(start, block_k)], keep)
    bias = masks.alibi_bias(slope, q_pos, k_pos, causal=True)
    s = jnp.where(keep, jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1) + bias, masks.MASK_VALUE)
    new_max = jnp.maximum(row_max, s.max())
    rescale = jnp.exp2(row_max - new_max)
    p = jnp.exp2(s - new_max)
    v = tiles.load(v_ref.at[pl.ds(start, block_k)], keep)
    weighted = p.astype(v.dtype).astype(jnp.float32)[:, None] * v.astype(jnp.float32)
    return acc * rescale + jnp.sum(weighted, axis=0), new_max, row_sum * rescale + p.sum()

  init = (jnp.zeros(q.shape, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0))
  acc, _, row_sum = lax.fori_loop(0, lax.div(q_pos, block_k) + 1, visit, init)
  out_ref[...] = (acc / row_sum).astype(out_ref.dtype)
