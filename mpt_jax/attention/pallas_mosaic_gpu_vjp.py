"""Backward of the Mosaic GPU ALiBi flash attention: a dK/dV kernel and a dQ kernel (Hopper).

FlashAttention-2's backward (arXiv:2307.08691, Algorithm 2) split in two kernels so that no
two programs write the same rows: the dK/dV kernel holds key blocks and streams queries,
output gradients, logsumexps and ``delta = rowsum(dO * O)``; it recomputes the probabilities
from the forward's logsumexp and works on transposed tiles (keys along the rows), so its
wgmma operands need no transposes in registers. dQ = scale * dS @ K needs the same dS: the
dK/dV kernel stores its bf16 dS tiles, and the dQ kernel holds query blocks and streams them
with the keys, one product per tile (``_dq_from_ds``). Where that workspace would not fit
(``BlockSizes.max_ds_bytes``) the dQ kernel streams keys and values instead and recomputes
the scores and dP, three products per tile (``_dq``). Structure and tiles as in
pallas_mosaic_gpu.py.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mpt_jax.attention import pallas_mosaic_gpu_tiles as tiles
from mpt_jax.attention import pallas_tiles


def backward(q, k, v, slopes, segment_ids, out, lse, d_out, *, causal, scale, block_sizes):
  """(dq, dk, dv) of padded inputs; ``lse`` [B, N, T] in log2 units with the ALiBi query term."""
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
  statics = dict(causal=causal, scale=scale)
  operands = (q, k, v, d_out, lse, delta, slopes)
  dkv_blocks = dict(block_q=block_sizes.block_q_dkv, block_k=block_sizes.block_k_dkv, stages=block_sizes.stages_dkv)
  layout = ds_layout(q.shape, block_sizes, causal=causal)
  if layout is not None:
    dk, dv, ds = _dkv(*operands, segment_ids, ds_layout=layout, **dkv_blocks, **statics)
    dq = _dq_from_ds(ds, k, segment_ids, layout=layout, stages=block_sizes.stages_dq_from_ds, **statics)
    return dq, dk, dv
  dq = _dq(
    *operands,
    segment_ids,
    block_q=block_sizes.block_q_dq,
    block_k=block_sizes.block_k_dq,
    stages=block_sizes.stages_dq,
    **statics,
  )
  dk, dv = _dkv(*operands, segment_ids, ds_layout=None, **dkv_blocks, **statics)
  return dq, dk, dv


@dataclasses.dataclass(frozen=True)
class DsLayout:
  """Where the dK/dV kernel stores each dS tile for the dQ kernel: a [tiles, block, block] buffer of dS^T tiles.

  Tiles are square, ``block`` keys by ``block`` queries (all four backward blocks equal). A
  dQ program holds COMPUTE_WARPGROUPS query blocks and reads, per key step, one "pair" of
  consecutive tiles, one per warpgroup. Pairs are numbered per (batch row, head), then by
  query program, then by key step from 0; causal programs keep only the key steps up to
  their diagonal, so the buffer holds about half the [T, T] grid.
  """

  batch: int
  seq_len: int  # padded
  heads: int
  block: int
  causal: bool

  @property
  def key_steps(self) -> int:
    return self.seq_len // self.block

  @property
  def programs(self) -> int:
    return self.seq_len // (tiles.COMPUTE_WARPGROUPS * self.block)

  def first_pair(self, program):
    """The pair of (query program, key step 0) within one (row, head): programs before it hold
    COMPUTE_WARPGROUPS * (p + 1) key steps each when causal, key_steps otherwise."""
    if self.causal:
      return tiles.COMPUTE_WARPGROUPS * program * (program + 1) // 2
    return program * self.key_steps

  def tile(self, batch, head, query_block, key_step):
    """Index of the dS^T tile of (query block, key step) in the buffer."""
    program, warpgroup = lax.div(query_block, tiles.COMPUTE_WARPGROUPS), lax.rem(query_block, tiles.COMPUTE_WARPGROUPS)
    pair = (batch * self.heads + head) * self.first_pair(self.programs) + self.first_pair(program) + key_step
    return pair * tiles.COMPUTE_WARPGROUPS + warpgroup

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.batch * self.heads * self.first_pair(self.programs) * tiles.COMPUTE_WARPGROUPS, self.block, self.block

  @property
  def nbytes(self) -> int:
    """Bytes of the buffer: bf16 or f16 tiles."""
    return 2 * math.prod(self.shape)


def ds_layout(shape, block_sizes, *, causal: bool) -> DsLayout | None:
  """The dS workspace of inputs of ``shape`` (padded), or None where the dQ kernel recomputes dS:
  backward blocks of different sizes, or a workspace above ``block_sizes.max_ds_bytes``."""
  blocks = {block_sizes.block_q_dq, block_sizes.block_k_dq, block_sizes.block_q_dkv, block_sizes.block_k_dkv}
  if len(blocks) != 1:
    return None
  batch, seq_len, heads, _ = shape
  layout = DsLayout(batch, seq_len, heads, blocks.pop(), causal)
  return layout if layout.nbytes <= block_sizes.max_ds_bytes else None


def _launch(kernel, out_type, scratch_types, *, programs, name: str):
  """plgpu.kernel over (heads, programs, batch) with the consumers and the producer."""
  return plgpu.kernel(
    kernel,
    out_type=out_type,
    scratch_types=scratch_types,
    grid=programs,
    grid_names=("heads", "programs", "batch"),
    num_threads=tiles.COMPUTE_WARPGROUPS + 1,
    thread_name=tiles.WARPGROUP_AXIS,
    compiler_params=tiles.compiler_params(),
    kernel_name=name,
  )


def _dq(q, k, v, d_out, lse, delta, slopes, segment_ids, *, block_q, block_k, stages, causal, scale):
  batch, seq_len, heads, head_dim = q.shape
  program_rows = tiles.COMPUTE_WARPGROUPS * block_q
  stages = min(stages, seq_len // block_k)
  segments = segment_ids is not None
  segment_operands = ()
  if segments:
    k_range, _ = pallas_tiles.segment_block_ranges(segment_ids, block_q=program_rows, block_k=block_k)
    segment_operands = (segment_ids, *k_range)
  stream_tiles = [tiles.matrix_buffer((stages, block_k, head_dim), q.dtype)] * 2
  if segments:
    stream_tiles.append(plgpu.SMEM((stages, block_k), jnp.int32))
  wgs = tiles.COMPUTE_WARPGROUPS
  query_buffers = (
    tiles.matrix_buffer((wgs, block_q, head_dim), q.dtype),  # q, then dq
    tiles.matrix_buffer((wgs, block_q, head_dim), q.dtype),  # d_out
    plgpu.SMEM((wgs, block_q), jnp.float32),  # lse
    plgpu.SMEM((wgs, block_q), jnp.float32),  # delta
    plgpu.SMEM((wgs, block_q), jnp.int32) if segments else None,
  )
  kernel = functools.partial(_dq_kernel, segments=segments, causal=causal, scale=scale, block_k=block_k)
  return _launch(
    kernel,
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    [query_buffers, tiles.held_barriers(5), tiles.Stream.scratch(stream_tiles)],
    programs=(heads, seq_len // program_rows, batch),
    name="alibi_flash_dq_mosaic_gpu",
  )(q, k, v, d_out, lse, delta, slopes, *segment_operands)


def _dq_kernel(*refs, segments: bool, causal: bool, scale: float, block_k: int):
  """One program: COMPUTE_WARPGROUPS query blocks; dQ = scale * dS @ K over the key steps."""
  q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, slopes_ref, *refs = refs
  segment_ids_ref = k_lo_ref = k_hi_ref = None
  if segments:
    segment_ids_ref, k_lo_ref, k_hi_ref, *refs = refs
  dq_ref, query_buffers, q_loaded, stream_scratch = refs
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  warpgroup = lax.axis_index(tiles.WARPGROUP_AXIS)
  q_buffers, d_out_buffers, lse_buffers, delta_buffers, q_segment_buffers = query_buffers
  stream = tiles.Stream(*stream_scratch)
  block_q, head_dim = q_buffers.shape[1:]
  num_programs = k_ref.shape[1] // (tiles.COMPUTE_WARPGROUPS * block_q)
  program_start, lo, hi = tiles.query_program(
    pallas_tiles.heaviest_first(lax.axis_index("programs"), num_blocks=num_programs),
    block_q=block_q,
    block_k=block_k,
    seq_len=k_ref.shape[1],
    causal=causal,
    segment_ranges=(k_lo_ref, k_hi_ref) if segments else None,
    batch=batch,
  )
  sources = tiles.key_sources(k_ref, v_ref, segment_ids_ref, batch=batch, head=head, block_k=block_k)
  tiles.as_producer(warpgroup, lambda: stream.produce(sources, lo, hi))

  def consume():
    q_start = program_start + warpgroup * block_q
    queries = (batch, pl.ds(q_start, block_q), head)
    vectors = (batch, head, pl.ds(q_start, block_q))
    q_smem, d_out_smem = q_buffers.at[warpgroup], d_out_buffers.at[warpgroup]
    copies = [
      (q_ref.at[queries], q_smem),
      (d_out_ref.at[queries], d_out_smem),
      (lse_ref.at[vectors], lse_buffers.at[warpgroup]),
      (delta_ref.at[vectors], delta_buffers.at[warpgroup]),
    ]
    if segments:
      copies.append((segment_ids_ref.at[batch, pl.ds(q_start, block_q)], q_segment_buffers.at[warpgroup]))
    tiles.copy_in(copies, q_loaded, warpgroup)
    q_segment = tiles.load_vector(q_segment_buffers.at[warpgroup], tiles.ROWS) if segments else None
    q_pos = tiles.positions(q_start, block_q, tiles.ROWS)
    origin = q_start.astype(jnp.float32)
    slope = slopes_ref[head]
    # p = exp2(s - lse): the scores lack the ALiBi query term, so it leaves the logsumexp too.
    lse = tiles.load_vector(lse_buffers.at[warpgroup], tiles.ROWS)
    row_offset = lse - pallas_tiles.alibi_query_term(slope, q_pos, origin=origin, causal=causal)
    delta = tiles.load_vector(delta_buffers.at[warpgroup], tiles.ROWS)

    def visit(step, dq, *, masked: bool):
      slot = stream.slot(step, lo)
      k_smem, v_smem = stream.slots[0].at[slot], stream.slots[1].at[slot]
      stream.wait(0, slot)
      stream.wait(1, slot)
      # Both products need only the streamed tiles: issued together, one wait.
      qk, dp = tiles.matmul(
        (q_smem, tiles.transposed(k_smem)), (d_out_smem, tiles.transposed(v_smem)), shape=(block_q, block_k)
      )
      stream.release(1, slot)
      frame = tiles.key_step_frame(
        stream, slot, step, block_k=block_k, q_pos=q_pos, q_segment=q_segment, slope=slope, origin=origin
      )
      s = frame.scores(qk, scale=scale, causal=causal, masked=masked)
      p = jnp.exp2(s - tiles.rows(row_offset, s.shape))
      ds = p * (dp - tiles.rows(delta, dp.shape))
      dq = tiles.accumulate(dq, (ds.astype(k_smem.dtype), k_smem))
      stream.release(0, slot)
      return dq

    split, stop = tiles.query_major_plan(
      q_start, block_q=block_q, block_k=block_k, lo=lo, hi=hi, causal=causal, segments=segments
    )
    dq = tiles.run_plan(
      [
        (lo, split, functools.partial(visit, masked=False)),
        (split, stop, functools.partial(visit, masked=True)),
        (stop, hi, stream.pass_over(lo)),
      ],
      tiles.zeros((block_q, head_dim)),
    )
    q_smem[...] = (dq * scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[queries])
    plgpu.wait_smem_to_gmem(0)

  tiles.as_consumer(warpgroup, consume)


def _dkv(q, k, v, d_out, lse, delta, slopes, segment_ids, *, block_q, block_k, stages, causal, scale, ds_layout):
  batch, seq_len, heads, head_dim = q.shape
  program_rows = tiles.COMPUTE_WARPGROUPS * block_k
  stages = min(stages, seq_len // block_q)
  segments = segment_ids is not None
  segment_operands = ()
  if segments:
    _, q_range = pallas_tiles.segment_block_ranges(segment_ids, block_q=block_q, block_k=block_k)
    segment_operands = (segment_ids, *q_range)
  stream_tiles = [
    tiles.matrix_buffer((stages, block_q, head_dim), q.dtype),  # q
    tiles.matrix_buffer((stages, block_q, head_dim), q.dtype),  # d_out
    plgpu.SMEM((stages, block_q), jnp.float32),  # lse
    plgpu.SMEM((stages, block_q), jnp.float32),  # delta
  ]
  if segments:
    stream_tiles.append(plgpu.SMEM((stages, block_q), jnp.int32))
  wgs = tiles.COMPUTE_WARPGROUPS
  key_buffers = (
    tiles.matrix_buffer((wgs, block_k, head_dim), q.dtype),  # k, then dk
    tiles.matrix_buffer((wgs, block_k, head_dim), q.dtype),  # v, then dv
    plgpu.SMEM((wgs, block_k), jnp.int32) if segments else None,
  )
  out_type = [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
  scratch_types = [key_buffers, tiles.held_barriers(3), tiles.Stream.scratch(stream_tiles)]
  if ds_layout is not None:
    out_type.append(jax.ShapeDtypeStruct(ds_layout.shape, q.dtype))
    # Two dS tiles per warpgroup: one fills while the last one's store reads the other.
    scratch_types.append(tiles.matrix_buffer((wgs, 2, block_k, block_q), q.dtype))
  kernel = functools.partial(
    _dkv_kernel, segments=segments, causal=causal, scale=scale, block_q=block_q, ds_layout=ds_layout
  )
  return _launch(
    kernel,
    out_type,
    scratch_types,
    programs=(heads, seq_len // program_rows, batch),
    name="alibi_flash_dkv_mosaic_gpu",
  )(q, k, v, d_out, lse, delta, slopes, *segment_operands)


def _dkv_kernel(*refs, segments: bool, causal: bool, scale: float, block_q: int, ds_layout: DsLayout | None):
  """One program: COMPUTE_WARPGROUPS key blocks; dV = P^T dO and dK = scale * dS^T Q over the
  query steps, and each dS^T tile stored at ``ds_layout`` when given."""
  q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, slopes_ref, *refs = refs
  segment_ids_ref = q_ranges = None
  if segments:
    segment_ids_ref, q_lo_ref, q_hi_ref, *refs = refs
    q_ranges = (q_lo_ref, q_hi_ref)
  dk_ref, dv_ref, *refs = refs
  ds_ref = ds_buffers = None
  if ds_layout is not None:
    ds_ref, key_buffers, k_loaded, stream_scratch, ds_buffers = refs
  else:
    key_buffers, k_loaded, stream_scratch = refs
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  warpgroup = lax.axis_index(tiles.WARPGROUP_AXIS)
  k_buffers, v_buffers, k_segment_buffers = key_buffers
  stream = tiles.Stream(*stream_scratch)
  block_k, head_dim = k_buffers.shape[1:]
  seq_len = q_ref.shape[1]
  program_start, lo, hi = tiles.key_program(
    block_q=block_q,
    block_k=block_k,
    seq_len=seq_len,
    causal=causal,
    segment_ranges=q_ranges,
    batch=batch,
  )

  def sources(step):
    queries = (batch, pl.ds(step * block_q, block_q), head)
    vectors = (batch, head, pl.ds(step * block_q, block_q))
    query_tiles = [q_ref.at[queries], d_out_ref.at[queries], lse_ref.at[vectors], delta_ref.at[vectors]]
    if segments:
      query_tiles.append(segment_ids_ref.at[batch, pl.ds(step * block_q, block_q)])
    return query_tiles

  tiles.as_producer(warpgroup, lambda: stream.produce(sources, lo, hi))

  def consume():
    k_start = program_start + warpgroup * block_k
    key_block = lax.div(k_start, jnp.int32(block_k))
    keys = (batch, pl.ds(k_start, block_k), head)
    k_smem, v_smem = k_buffers.at[warpgroup], v_buffers.at[warpgroup]
    copies = [(k_ref.at[keys], k_smem), (v_ref.at[keys], v_smem)]
    if segments:
      copies.append((segment_ids_ref.at[batch, pl.ds(k_start, block_k)], k_segment_buffers.at[warpgroup]))
    tiles.copy_in(copies, k_loaded, warpgroup)
    k_segment = tiles.load_vector(k_segment_buffers.at[warpgroup], tiles.ROWS) if segments else None
    k_pos = tiles.positions(k_start, block_k, tiles.ROWS)
    origin = k_start.astype(jnp.float32)
    slope = slopes_ref[head]
    q_tile, d_out_tile, lse_vector, delta_vector, segment_vector = range(5)

    def store_ds(step, ds_t):
      """Stores this step's dS^T tile for the dQ kernel (TMA, not awaited until the buffer's next use)."""
      buffer = ds_buffers.at[warpgroup, lax.rem(step, 2)]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      buffer[...] = ds_t
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buffer, ds_ref.at[ds_layout.tile(batch, head, step, key_block)])

    def visit(step, carry, *, masked: bool):
      dk, dv = carry
      slot = stream.slot(step, lo)
      q_smem, d_out_smem = stream.slots[q_tile].at[slot], stream.slots[d_out_tile].at[slot]
      stream.wait(q_tile, slot)
      stream.wait(d_out_tile, slot)
      # Both products need only the streamed and held tiles: issued together, one wait.
      qk_t, dp_t = tiles.matmul(
        (k_smem, tiles.transposed(q_smem)), (v_smem, tiles.transposed(d_out_smem)), shape=(block_k, block_q)
      )
      q_pos = tiles.positions(step * block_q, block_q, tiles.COLUMNS)
      q_segment = None
      if segments:
        stream.wait(segment_vector, slot)
        q_segment = tiles.load_vector(stream.slots[segment_vector].at[slot], tiles.COLUMNS)
        stream.release(segment_vector, slot)
      frame = tiles.TileFrame(k_pos, q_pos, k_segment, q_segment, slope, origin, False)
      s_t = frame.scores(qk_t, scale=scale, causal=causal, masked=masked)
      stream.wait(lse_vector, slot)
      lse = tiles.load_vector(stream.slots[lse_vector].at[slot], tiles.COLUMNS)
      stream.release(lse_vector, slot)
      stream.wait(delta_vector, slot)
      delta = tiles.load_vector(stream.slots[delta_vector].at[slot], tiles.COLUMNS)
      stream.release(delta_vector, slot)
      column_offset = lse - pallas_tiles.alibi_query_term(slope, q_pos, origin=origin, causal=causal)
      p_t = jnp.exp2(s_t - tiles.columns(column_offset, s_t.shape))
      ds_t = (p_t * (dp_t - tiles.columns(delta, dp_t.shape))).astype(q_smem.dtype)
      if ds_layout is not None:
        store_ds(step, ds_t)
      # dV += P^T dO and dK += dS^T Q, issued together.
      dv, dk = tiles.accumulate((dv, dk), (p_t.astype(q_smem.dtype), d_out_smem), (ds_t, q_smem))
      stream.release(d_out_tile, slot)
      stream.release(q_tile, slot)
      return dk, dv

    first, split, stop = tiles.key_major_plan(
      k_start,
      block_q=block_q,
      block_k=block_k,
      lo=lo,
      hi=hi,
      causal=causal,
      segment_span=(q_ranges[0][batch, key_block], q_ranges[1][batch, key_block]) if segments else None,
    )
    dk, dv = tiles.run_plan(
      [
        (lo, first, stream.pass_over(lo)),
        (first, split, functools.partial(visit, masked=True)),
        (split, stop, functools.partial(visit, masked=False)),
        (stop, hi, stream.pass_over(lo)),
      ],
      (tiles.zeros((block_k, head_dim)), tiles.zeros((block_k, head_dim))),
    )
    k_smem[...] = (dk * scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  tiles.as_consumer(warpgroup, consume)


def _dq_from_ds(ds, k, segment_ids, *, layout: DsLayout, stages, causal, scale):
  """dQ = scale * dS @ K from the dS^T tiles the dK/dV kernel stored at ``layout``."""
  batch, seq_len, heads, head_dim = k.shape
  block, wgs = layout.block, tiles.COMPUTE_WARPGROUPS
  stages = min(stages, seq_len // block)
  segment_operands = ()
  if segment_ids is not None:
    # The dK/dV kernel's ranges at the same blocks: the same tiles, seen from the queries.
    k_range, _ = pallas_tiles.segment_block_ranges(segment_ids, block_q=block, block_k=block)
    segment_operands = k_range
  stream_tiles = [
    tiles.matrix_buffer((stages, block, head_dim), k.dtype),  # keys
    tiles.matrix_buffer((stages, wgs, block, block), ds.dtype),  # a pair of dS^T tiles, one per warpgroup
  ]
  kernel = functools.partial(
    _dq_from_ds_kernel, segments=segment_ids is not None, layout=layout, causal=causal, scale=scale
  )
  return _launch(
    kernel,
    jax.ShapeDtypeStruct(k.shape, k.dtype),
    [tiles.matrix_buffer((wgs, block, head_dim), k.dtype), tiles.Stream.scratch(stream_tiles)],
    programs=(heads, layout.programs, batch),
    name="alibi_flash_dq_from_ds_mosaic_gpu",
  )(k, ds, *segment_operands)


def _dq_from_ds_kernel(k_ref, ds_ref, *refs, segments: bool, layout: DsLayout, causal: bool, scale: float):
  """One program: COMPUTE_WARPGROUPS query blocks; dQ = scale * dS @ K over the key steps.

  dS arrives as dS^T tiles [keys, queries], which wgmma reads transposed from shared memory.
  A warpgroup visits exactly the tiles the dK/dV kernel stored: up to its diagonal when
  causal, within its block's segment range (pallas_tiles.segment_block_ranges) with segments.
  """
  k_ranges = None
  if segments:
    k_lo_ref, k_hi_ref, *refs = refs
    k_ranges = (k_lo_ref, k_hi_ref)
  dq_ref, dq_buffers, stream_scratch = refs
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  warpgroup = lax.axis_index(tiles.WARPGROUP_AXIS)
  stream = tiles.Stream(*stream_scratch)
  block, head_dim = layout.block, k_ref.shape[-1]
  program = pallas_tiles.heaviest_first(lax.axis_index("programs"), num_blocks=layout.programs)
  _, lo, hi = tiles.query_program(
    program, block_q=block, block_k=block, seq_len=layout.seq_len, causal=causal, segment_ranges=None, batch=batch
  )
  if k_ranges is not None:
    lo, hi = tiles.clip(lo, hi, *tiles.program_span(k_ranges, batch, program))
  first_tile = layout.tile(batch, head, program * tiles.COMPUTE_WARPGROUPS, 0)

  def sources(step):
    pair = pl.ds(first_tile + step * tiles.COMPUTE_WARPGROUPS, tiles.COMPUTE_WARPGROUPS)
    return [k_ref.at[batch, pl.ds(step * block, block), head], ds_ref.at[pair]]

  tiles.as_producer(warpgroup, lambda: stream.produce(sources, lo, hi))

  def consume():
    query_block = program * tiles.COMPUTE_WARPGROUPS + warpgroup
    start, stop = lo, hi
    if causal:
      stop = jnp.clip(query_block + 1, lo, hi)
    if k_ranges is not None:
      start, stop = tiles.clip(start, stop, k_ranges[0][batch, query_block], k_ranges[1][batch, query_block])

    def visit(step, dq):
      slot = stream.slot(step, lo)
      stream.wait(0, slot)
      stream.wait(1, slot)
      ds_t = stream.slots[1].at[slot, warpgroup]
      dq = tiles.accumulate(dq, (tiles.transposed(ds_t), stream.slots[0].at[slot]))
      stream.release(0, slot)
      stream.release(1, slot)
      return dq

    dq = tiles.run_plan(
      [(lo, start, stream.pass_over(lo)), (start, stop, visit), (stop, hi, stream.pass_over(lo))],
      tiles.zeros((block, head_dim)),
    )
    dq_smem = dq_buffers.at[warpgroup]
    dq_smem[...] = (dq * scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[batch, pl.ds(query_block * block, block), head])
    plgpu.wait_smem_to_gmem(0)

  tiles.as_consumer(warpgroup, consume)
