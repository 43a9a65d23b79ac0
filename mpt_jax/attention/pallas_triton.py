"""Flash attention with in-kernel ALiBi: Pallas kernels on the Triton backend (A100, H100).

FlashAttention-2 (Dao, 2023, arXiv:2307.08691): the forward streams key/value blocks through
an online softmax in float32 and saves the logsumexp; the backward (pallas_triton_vjp.py)
recomputes the probabilities from it. ALiBi is computed on each tile from the head's slope
and the tile's positions, never stored as a [T, T] array. Tiles that are wholly masked are
never loaded: the loop bounds skip those above the causal diagonal and, with segment ids,
those pairing two different packed documents. Semantics are exactly those of
``reference.attention`` with T == S, for any sequence length.

JAX 0.11 deprecates the Pallas Triton backend in favour of Mosaic GPU; it ships, and these
kernels run, in jax 0.10.2 and 0.11.2.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.attention import flash, pallas_triton_vjp
from mpt_jax.attention import pallas_tiles as tiles

# Triton tiles are powers of two, and tensor-core dots need every side >= 16.
MIN_BLOCK = 16
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters of the three kernels.

  Defaults: the best of ``benchmarks/attention.py --sweep`` on an H100 at B=8, T=2048, N=16,
  H=128, bf16 (benchmarks/RESULTS.md).

  ``block_q``/``block_k`` tile the forward; ``*_dkv`` the dK/dV kernel (a key block per
  program, looping over query blocks) and ``*_dq`` the dQ kernel (a query block per
  program, looping over key blocks). Blocks are powers of two >= 16; a block longer than
  the sequence is shortened to it.
  """

  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps_dq: int = 8
  num_stages_dq: int = 3

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")
      if field.name.startswith("block") and (value < MIN_BLOCK or value & (value - 1)):
        raise ValueError(f"BlockSizes.{field.name} must be a power of two >= {MIN_BLOCK}, got {value}")
      if field.name.startswith("num_warps") and value & (value - 1):
        raise ValueError(f"BlockSizes.{field.name} must be a power of two, got {value}")

  def fit(self, seq_len: int) -> "BlockSizes":
    """These sizes with every block shortened to the sequence (rounded up to a power of two)."""
    longest = max(MIN_BLOCK, pl.next_power_of_2(seq_len))
    return dataclasses.replace(
      self,
      **{f.name: min(getattr(self, f.name), longest) for f in dataclasses.fields(self) if f.name.startswith("block")},
    )


def supports(q, k) -> bool:
  """Whether flash_attention takes these shapes: self-attention with a power-of-two head_dim in [16, 256]."""
  head_dim = q.shape[-1]
  return q.shape[1] == k.shape[1] and MIN_BLOCK <= head_dim <= MAX_HEAD_DIM and not head_dim & (head_dim - 1)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, block_sizes=None, interpret=False):
  """ALiBi flash attention; the same function as ``reference.attention`` with T == S.

  Args:
    q, k, v: [B, T, N, H], all float32 or all bfloat16; H a power of two in [16, 256].
    slopes: [N] ALiBi slopes.
    segment_ids: optional int [B, T]; tokens attend only within their own segment.
    causal: mask keys after the query (and use the causal ALiBi form).
    scale: softmax scale, a Python float; defaults to 1/sqrt(H).
    block_sizes: a ``BlockSizes``; None for the defaults.
    interpret: run the kernels in the Pallas interpreter (any backend, slow).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  flash.check_inputs(
    q,
    k,
    v,
    slopes,
    segment_ids,
    scale,
    block_sizes,
    block_sizes_type=BlockSizes,
    head_dim_ok=lambda h: MIN_BLOCK <= h <= MAX_HEAD_DIM and not h & (h - 1),
    head_dim_rule=f"a power of two in [{MIN_BLOCK}, {MAX_HEAD_DIM}]",
  )
  head_dim, seq_len = q.shape[3], q.shape[1]
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  statics = _Statics(
    causal=causal,
    scale=head_dim**-0.5 if scale is None else float(scale),
    block_sizes=(block_sizes or BlockSizes()).fit(seq_len),
    interpret=interpret,
  )
  return _attention(q, k, v, jnp.asarray(slopes, jnp.float32), segment_ids, statics=statics)


@dataclasses.dataclass(frozen=True)
class _Statics:
  """Everything static about one call: the forward takes it whole, the backward its fields by name."""

  causal: bool
  scale: float
  block_sizes: BlockSizes
  interpret: bool


def _forward(q, k, v, slopes, segment_ids, statics: _Statics):
  """Runs the forward kernel; returns the output and the logsumexp (log2 units) [B, N, T]."""
  batch, seq_len, heads, head_dim = q.shape
  blocks = statics.block_sizes
  block_q = blocks.block_q
  num_q_blocks = pl.cdiv(seq_len, block_q)
  q_block = functools.partial(tiles.heaviest_first, num_blocks=num_q_blocks)
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, q_block(i), h, 0))
  kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  segment_specs, segment_args = tiles.segment_operands(
    segment_ids, block_q=block_q, block_k=blocks.block_k, grid_over="q", block_index=q_block
  )
  out, lse = pl.pallas_call(
    functools.partial(_forward_kernel, causal=statics.causal, scale=statics.scale, block_k=blocks.block_k),
    # Query blocks vary fastest, so the programs running together share one head's keys
    # and values in L2.
    grid=(num_q_blocks, batch, heads),
    in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None,), lambda i, b, h: (h,)), *segment_specs],
    out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      # Padded to whole blocks, so the kernel stores the logsumexp without a mask.
      jax.ShapeDtypeStruct((batch, heads, num_q_blocks * block_q), jnp.float32),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
    interpret=statics.interpret,
    name="alibi_flash_forward",
  )(q, k, v, slopes, *segment_args)
  return out, lse[:, :, :seq_len]


def _forward_kernel(
  q_ref,
  k_ref,
  v_ref,
  slope_ref,
  segment_ids_ref,
  k_lo_ref,
  k_hi_ref,
  out_ref,
  lse_ref,
  *,
  causal: bool,
  scale: float,
  block_k: int,
):
  block_q, head_dim = q_ref.shape
  seq_len = k_ref.shape[0]
  ragged = bool(seq_len % block_q or seq_len % block_k)
  query = tiles.query_tile(q_ref, segment_ids_ref, slope_ref, seq_len=seq_len, ragged=ragged)

  def visit(k_block, carry, *, masked: bool):
    acc, row_max, row_sum = carry
    s, _, v = tiles.key_tile_scores(
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
    )  # less the ALiBi query term
    # Online softmax (FlashAttention-2 §3.1.1): keep the output unnormalised and rescale the
    # running sums whenever the row maximum grows.
    new_max = jnp.maximum(row_max, s.max(axis=1))
    rescale = jnp.exp2(row_max - new_max)
    p = jnp.exp2(s - new_max[:, None])
    row_sum = row_sum * rescale + p.sum(axis=1)
    acc = acc * rescale[:, None] + tiles.dot(p.astype(v.dtype), v)
    return acc, new_max, row_sum

  start, split, end = tiles.key_blocks(query.start, block_q=block_q, block_k=block_k, seq_len=seq_len, causal=causal)
  if segment_ids_ref is not None:
    start, split, end = tiles.clip_blocks(start, split, end, k_lo_ref[...], k_hi_ref[...])
  carry = (
    jnp.zeros((block_q, head_dim), jnp.float32),
    jnp.full((block_q,), -jnp.inf, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  carry = lax.fori_loop(start, split, functools.partial(visit, masked=False), carry)
  acc, row_max, row_sum = lax.fori_loop(split, end, functools.partial(visit, masked=True), carry)
  # One division per row at the end instead of one per block (FlashAttention-2 §3.1.1).
  tiles.store(out_ref, acc / row_sum[:, None], query.valid)
  query_term = tiles.alibi_query_term(query.slope, query.pos, origin=query.origin, causal=causal)
  lse_ref[...] = row_max + jnp.log2(row_sum) + query_term


_attention = flash.attention_with_vjp(_forward, pallas_triton_vjp.backward)
