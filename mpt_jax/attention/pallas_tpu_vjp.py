"""Backward pass of the Pallas-TPU ALiBi flash attention (FlashAttention-2, Algorithm 2).

Two kernels, each recomputing the probabilities from the saved logsumexp: dK/dV with a grid
(batch, head, key block, query block) accumulating over query blocks, dQ with a grid
(batch, head, query block, key block) accumulating over key blocks. A TPU has no atomic
adds for FlashAttention-2's fused dQ, so dQ recomputes q.k and dO.v once more, as the
Triton backward (pallas_triton_vjp.py) does. The dK/dV kernel works on transposed tiles,
[block_k, block_q], so its row statistics (logsumexp, delta) are lane-dense rows and every
matmul is a plain or right-transposed product. No gradient flows to the ALiBi slopes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.attention import pallas_tpu_tiles as tiles


def backward(
  q,
  k,
  v,
  slopes,
  segment_ids,
  out,
  lse,
  d_out,
  *,
  causal: bool,
  scale: float,
  block_sizes,
  seq_len: int,
  interpret: bool,
):
  """dq, dk, dv of ``pallas_tpu.flash_attention``, all on padded [B, N, T, H].

  Args:
    q, k, v, slopes, segment_ids: the forward's (padded) inputs.
    out: the forward's output; lse: its logsumexp [B, N, T] (+inf on rows that saw no key).
    d_out: the output cotangent, [B, N, T, H] (zero on padded rows: the pad's transpose).
    causal, scale: as in the forward; seq_len: the unpadded length.
    block_sizes: a ``pallas_tpu.BlockSizes`` already fitted to the sequence.
    interpret: run the kernels in the Pallas TPU interpreter.
  """
  # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-gradient term (FlashAttention-2
  # §3.2); one fused XLA reduction.
  delta = jnp.einsum("BNTH,BNTH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
  common = dict(causal=causal, scale=scale, seq_len=seq_len, interpret=interpret)
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
    **common,
  )
  return dq, dk, dv


def _dq(q, k, v, slopes, segment_ids, d_out, lse, delta, *, causal, scale, seq_len, block_q, block_k, interpret):
  batch, heads, padded_len, head_dim = q.shape
  num_q, num_k = padded_len // block_q, padded_len // block_k
  block_plan = tiles.plan(
    segment_ids,
    batch=batch,
    padded_len=padded_len,
    seq_len=seq_len,
    block_q=block_q,
    block_k=block_k,
    causal=causal,
    outer="q",
  )

  def kv_block(b, n, i, j, codes, lo, hi):
    return b, n, tiles.clamp(j, lo, hi, b * num_q + i), 0

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j, *_: (b, n, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_block)
  stats_spec = pl.BlockSpec((None, None, block_q, tiles.LANES), lambda b, n, i, j, *_: (b, n, i, 0))
  # Row statistics as columns: broadcast across lanes (transient, this kernel's input only).
  lse, delta = (jnp.broadcast_to(x[..., None], (*x.shape, tiles.LANES)) for x in (lse, delta))
  in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, stats_spec, stats_spec]
  args = [q, k, v, slopes, d_out, lse, delta]
  if segment_ids is not None:
    in_specs += [
      pl.BlockSpec((None, block_q, tiles.LANES), lambda b, n, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, tiles.SUBLANES, block_k), lambda b, n, i, j, *p: (b, 0, kv_block(b, n, i, j, *p)[2])),
    ]
    args += tiles.segment_layouts(segment_ids)
  return pl.pallas_call(
    functools.partial(
      _dq_kernel, causal=causal, scale=scale, seq_len=seq_len, num_q_blocks=num_q, has_segments=segment_ids is not None
    ),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, num_q, num_k),
      in_specs=in_specs,
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=tiles.compiler_params(3),
    interpret=tiles.interpret_params(interpret),
    name="alibi_flash_backward_dq_tpu",
  )(*block_plan, *args)


def _dq_kernel(
  codes_ref,
  lo_ref,
  hi_ref,
  q_ref,
  k_ref,
  v_ref,
  slopes_ref,
  d_out_ref,
  lse_ref,
  delta_ref,
  *refs,
  causal: bool,
  scale: float,
  seq_len: int,
  num_q_blocks: int,
  has_segments: bool,
):
  if has_segments:
    q_segment_ref, k_segment_ref, dq_ref, acc_ref = refs
  else:
    (dq_ref, acc_ref), q_segment_ref, k_segment_ref = refs, None, None
  b, n, i, j = (pl.program_id(axis) for axis in range(4))
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  code = codes_ref[(b * num_q_blocks + i) * pl.num_programs(3) + j]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], d_out_ref[...]
    s = tiles.scores(
      tiles.dot(q, k, trans_b=True),
      slope=slopes_ref[n],
      q_start=i * block_q,
      k_start=j * block_k,
      q_segment=q_segment_ref[:, :1] if has_segments else None,
      k_segment=k_segment_ref[:1, :] if has_segments else None,
      scale=scale,
      causal=causal,
      masked=masked,
      seq_len=seq_len,
    )  # [block_q, block_k]
    p = jnp.exp(s - lse_ref[:, :1])
    ds = p * (tiles.dot(d_out, v, trans_b=True) - delta_ref[:, :1])
    acc_ref[...] += tiles.dot(ds.astype(k.dtype), k)

  pl.when(code == tiles.FULL)(lambda: visit(masked=False))
  pl.when(code == tiles.MASKED)(lambda: visit(masked=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkdv(q, k, v, slopes, segment_ids, d_out, lse, delta, *, causal, scale, seq_len, block_q, block_k, interpret):
  batch, heads, padded_len, head_dim = q.shape
  num_q, num_k = padded_len // block_q, padded_len // block_k
  block_plan = tiles.plan(
    segment_ids,
    batch=batch,
    padded_len=padded_len,
    seq_len=seq_len,
    block_q=block_q,
    block_k=block_k,
    causal=causal,
    outer="k",
  )

  def q_block(b, n, j, i, codes, lo, hi):
    return b, n, tiles.clamp(i, lo, hi, b * num_k + j), 0

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_block)
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, n, j, i, *_: (b, n, j, 0))
  # Row statistics as rows, [B, N, 1, T]: the tiles here are [block_k, block_q].
  stats_spec = pl.BlockSpec((None, None, 1, block_q), lambda b, n, j, i, *p: (b, n, 0, q_block(b, n, j, i, *p)[2]))
  lse, delta = (x[:, :, None, :] for x in (lse, delta))
  in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, stats_spec, stats_spec]
  args = [q, k, v, slopes, d_out, lse, delta]
  if segment_ids is not None:
    in_specs += [
      pl.BlockSpec((None, block_k, tiles.LANES), lambda b, n, j, i, *_: (b, j, 0)),  # key ids as columns
      pl.BlockSpec((None, tiles.SUBLANES, block_q), lambda b, n, j, i, *p: (b, 0, q_block(b, n, j, i, *p)[2])),
    ]
    args += tiles.segment_layouts(segment_ids)
  return pl.pallas_call(
    functools.partial(
      _dkdv_kernel,
      causal=causal,
      scale=scale,
      seq_len=seq_len,
      num_k_blocks=num_k,
      has_segments=segment_ids is not None,
    ),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, num_k, num_q),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=tiles.compiler_params(3),
    interpret=tiles.interpret_params(interpret),
    name="alibi_flash_backward_dkdv_tpu",
  )(*block_plan, *args)


def _dkdv_kernel(
  codes_ref,
  lo_ref,
  hi_ref,
  q_ref,
  k_ref,
  v_ref,
  slopes_ref,
  d_out_ref,
  lse_ref,
  delta_ref,
  *refs,
  causal: bool,
  scale: float,
  seq_len: int,
  num_k_blocks: int,
  has_segments: bool,
):
  if has_segments:
    k_segment_ref, q_segment_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
  else:
    (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref), k_segment_ref, q_segment_ref = refs, None, None
  b, n, j, i = (pl.program_id(axis) for axis in range(4))
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  code = codes_ref[(b * num_k_blocks + j) * pl.num_programs(3) + i]

  @pl.when(i == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], d_out_ref[...]
    s_t = tiles.scores(
      tiles.dot(k, q, trans_b=True),
      slope=slopes_ref[n],
      q_start=i * block_q,
      k_start=j * block_k,
      q_segment=q_segment_ref[:1, :] if has_segments else None,
      k_segment=k_segment_ref[:, :1] if has_segments else None,
      scale=scale,
      causal=causal,
      masked=masked,
      seq_len=seq_len,
      transposed=True,
    )  # [block_k, block_q]
    p_t = jnp.exp(s_t - lse_ref[...])
    dv_acc_ref[...] += tiles.dot(p_t.astype(d_out.dtype), d_out)
    ds_t = p_t * (tiles.dot(v, d_out, trans_b=True) - delta_ref[...])
    dk_acc_ref[...] += tiles.dot(ds_t.astype(q.dtype), q)

  pl.when(code == tiles.FULL)(lambda: visit(masked=False))
  pl.when(code == tiles.MASKED)(lambda: visit(masked=True))

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)
