"""Backward pass of the Pallas-Triton ALiBi flash attention (FlashAttention-2, Algorithm 2).

Two kernels, each recomputing the probabilities from the saved logsumexp: dK/dV with one
key block per program looping over query blocks, dQ with one query block per program
looping over key blocks. FlashAttention-2 (§3.2) computes dQ inside the dK/dV loop with
atomic adds to float32; the split (as in the Triton fused-attention tutorial) recomputes
q.k and dO.v once more instead, with no atomics and no float32 dQ buffer. No gradient flows
to the ALiBi slopes.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.attention import pallas_tiles as tiles


def backward(
  q, k, v, slopes, segment_ids, out, lse, d_out, *, causal: bool, scale: float, block_sizes, interpret: bool
):
  """dq, dk, dv of ``pallas_triton.flash_attention``.

  Args:
    q, k, v, slopes, segment_ids: the forward's inputs.
    out: the forward's output; lse: its logsumexp in log2 units, [B, N, T].
    d_out: the output cotangent, [B, T, N, H].
    causal, scale: as in the forward.
    block_sizes: a ``pallas_triton.BlockSizes`` already fitted to the sequence.
    interpret: run the kernels in the Pallas interpreter.
  """
  seq_len = q.shape[1]
  # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-gradient term (FlashAttention-2
  # §3.2); one fused XLA reduction.
  delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
  # Pad the row statistics to whole query blocks so kernels read them without masks. Padded
  # rows only reach dQ rows that are never stored; a ragged length masks every dK/dV tile.
  padded_len = pl.cdiv(seq_len, max(block_sizes.block_q_dq, block_sizes.block_q_dkv))
  padded_len *= max(block_sizes.block_q_dq, block_sizes.block_q_dkv)
  lse, delta = (jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - seq_len))) for x in (lse, delta))
  common = dict(causal=causal, scale=scale, interpret=interpret)
  dq = _dq(
    q,
    k,
    v,
    slopes,
    segment_ids,
    d_out,
    lse,
    delta,
    block_q=block_sizes.block_q_dq,
    block_k=block_sizes.block_k_dq,
    num_warps=block_sizes.num_warps_dq,
    num_stages=block_sizes.num_stages_dq,
    **common,
  )
  dk, dv = _dkdv(
    q,
    k,
    v,
    slopes,
    segment_ids,
    d_out,
    lse,
    delta,
    block_q=block_sizes.block_q_dkv,
    block_k=block_sizes.block_k_dkv,
    num_warps=block_sizes.num_warps_dkv,
    num_stages=block_sizes.num_stages_dkv,
    **common,
  )
  return dq, dk, dv


def _dq(
  q, k, v, slopes, segment_ids, d_out, lse, delta, *, causal, scale, block_q, block_k, num_warps, num_stages, interpret
):
  batch, seq_len, heads, head_dim = q.shape
  num_q_blocks = pl.cdiv(seq_len, block_q)
  q_block = functools.partial(tiles.heaviest_first, num_blocks=num_q_blocks)
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, q_block(i), h, 0))
  kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))
  segment_specs, segment_args = tiles.segment_operands(
    segment_ids, block_q=block_q, block_k=block_k, grid_over="q", block_index=q_block
  )
  return pl.pallas_call(
    functools.partial(_dq_kernel, causal=causal, scale=scale, block_k=block_k),
    grid=(num_q_blocks, batch, heads),
    in_specs=[
      q_spec,
      kv_spec,
      kv_spec,
      pl.BlockSpec((None,), lambda i, b, h: (h,)),
      *segment_specs,
      q_spec,
      row_spec,
      row_spec,
    ],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="alibi_flash_backward_dq",
  )(q, k, v, slopes, *segment_args, d_out, lse, delta)


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  slope_ref,
  segment_ids_ref,
  k_lo_ref,
  k_hi_ref,
  d_out_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  causal: bool,
  scale: float,
  block_k: int,
):
  block_q, head_dim = q_ref.shape
  seq_len = k_ref.shape[0]
  ragged = bool(seq_len % block_q or seq_len % block_k)
  query = tiles.query_tile(q_ref, segment_ids_ref, slope_ref, seq_len=seq_len, ragged=ragged)
  d_out = tiles.load(d_out_ref, query.valid)
  # The scores below leave out the ALiBi query term, so the logsumexp does too.
  lse = (lse_ref[...] - tiles.alibi_query_term(query.slope, query.pos, origin=query.origin, causal=causal))[:, None]
  delta = delta_ref[...][:, None]

  def visit(k_block, dq, *, masked: bool):
    s, k, v = tiles.key_tile_scores(
      query,
      k_ref,
      v_ref,
      segment_ids_ref,
      k_block,
      block_k=block_k,
      seq_len=seq_len,
      ragged=ragged,
      masked=masked,
      causal=causal,
      scale=scale,
    )  # [block_q, block_k]
    p = jnp.exp2(s - lse)
    ds = p * (tiles.dot(d_out, v, trans_b=True) - delta)
    return dq + tiles.dot(ds.astype(k.dtype), k)

  start, split, end = tiles.key_blocks(query.start, block_q=block_q, block_k=block_k, seq_len=seq_len, causal=causal)
  if segment_ids_ref is not None:
    start, split, end = tiles.clip_blocks(start, split, end, k_lo_ref[...], k_hi_ref[...])
  dq = jnp.zeros((block_q, head_dim), jnp.float32)
  dq = lax.fori_loop(start, split, functools.partial(visit, masked=False), dq)
  dq = lax.fori_loop(split, end, functools.partial(visit, masked=True), dq)
  tiles.store(dq_ref, dq * scale, query.valid)


def _dkdv(
  q, k, v, slopes, segment_ids, d_out, lse, delta, *, causal, scale, block_q, block_k, num_warps, num_stages, interpret
):
  batch, seq_len, heads, head_dim = q.shape
  q_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda j, b, h: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  row_spec = pl.BlockSpec((None, None, lse.shape[-1]), lambda j, b, h: (b, h, 0))
  segment_specs, segment_args = tiles.segment_operands(segment_ids, block_q=block_q, block_k=block_k, grid_over="k")
  return pl.pallas_call(
    functools.partial(_dkdv_kernel, causal=causal, scale=scale, block_q=block_q),
    # Key blocks in order: under the causal mask the first ones see the most query blocks.
    grid=(pl.cdiv(seq_len, block_k), batch, heads),
    in_specs=[
      q_spec,
      kv_spec,
      kv_spec,
      pl.BlockSpec((None,), lambda j, b, h: (h,)),
      *segment_specs,
      q_spec,
      row_spec,
      row_spec,
    ],
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="alibi_flash_backward_dkdv",
  )(q, k, v, slopes, *segment_args, d_out, lse, delta)


def _dkdv_kernel(
  q_ref,
  k_ref,
  v_ref,
  slope_ref,
  segment_ids_ref,
  q_lo_ref,
  q_hi_ref,
  d_out_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  causal: bool,
  scale: float,
  block_q: int,
):
  block_k, head_dim = k_ref.shape
  seq_len = q_ref.shape[0]
  ragged = bool(seq_len % block_q or seq_len % block_k)
  k_start = pl.program_id(0) * block_k
  k_pos = tiles.positions(k_start, block_k)
  k_valid = k_pos < seq_len if ragged else None
  k = tiles.load(k_ref, k_valid)
  v = tiles.load(v_ref, k_valid)
  k_segment = None
  if segment_ids_ref is not None:
    k_segment = tiles.load(segment_ids_ref.at[pl.ds(k_start, block_k)], k_valid)[:, None]
  slope = slope_ref[...]
  origin = k_start.astype(jnp.float32)

  # Tiles are transposed, [block_k, block_q], so every dot takes its register operand (P^T,
  # dS^T) on the left as is, and only loaded tiles are transposed (the tutorial's layout).
  def visit(q_block, carry, *, masked: bool):
    dk, dv = carry
    q_start = q_block * block_q
    q_pos = tiles.positions(q_start, block_q)
    q_valid = q_pos < seq_len if masked and ragged else None
    q = tiles.load(q_ref.at[pl.ds(q_start, block_q)], q_valid)
    d_out = tiles.load(d_out_ref.at[pl.ds(q_start, block_q)], q_valid)
    # The scores below leave out the ALiBi query term, so the logsumexp does too.
    lse = lse_ref[pl.ds(q_start, block_q)] - tiles.alibi_query_term(slope, q_pos, origin=origin, causal=causal)
    delta = delta_ref[pl.ds(q_start, block_q)]
    q_segment = None
    if segment_ids_ref is not None:
      q_segment = tiles.load(segment_ids_ref.at[pl.ds(q_start, block_q)], q_valid)[None, :]
    s_t = tiles.scores(
      tiles.dot(k, q, trans_b=True),
      bias=tiles.alibi_key_term(slope, q_pos[None, :], k_pos[:, None], origin=origin, causal=causal),
      keep=tiles.keep_mask(
        q_pos[None, :],
        k_pos[:, None],
        q_segment,
        k_segment,
        causal=masked and causal,
        seq_len=seq_len if masked and ragged else None,
      ),
      scale=scale,
    )  # [block_k, block_q]
    p_t = jnp.exp2(s_t - lse[None, :])
    dv = dv + tiles.dot(p_t.astype(d_out.dtype), d_out)
    ds_t = p_t * (tiles.dot(v, d_out, trans_b=True) - delta[None, :])
    dk = dk + tiles.dot(ds_t.astype(q.dtype), q)
    return dk, dv

  start, split, end = tiles.query_blocks(k_start, block_q=block_q, block_k=block_k, seq_len=seq_len, causal=causal)
  if segment_ids_ref is not None:
    start, split, end = tiles.clip_blocks(start, split, end, q_lo_ref[...], q_hi_ref[...])
  carry = (jnp.zeros((block_k, head_dim), jnp.float32), jnp.zeros((block_k, head_dim), jnp.float32))
  carry = lax.fori_loop(start, split, functools.partial(visit, masked=True), carry)
  dk, dv = lax.fori_loop(split, end, functools.partial(visit, masked=False), carry)
  tiles.store(dk_ref, dk * scale, k_valid)
  tiles.store(dv_ref, dv, k_valid)
