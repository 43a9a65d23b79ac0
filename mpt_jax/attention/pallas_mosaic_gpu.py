"""Flash attention with in-kernel ALiBi for Hopper GPUs (H100, H200): Pallas on the Mosaic GPU backend.

The same function as pallas_triton.py, built from Hopper's own instructions, which Triton's
Pallas backend does not reach: TMA copies into a ring of shared-memory slots fed by a
producer warpgroup, wgmma products accumulated in registers, and two consumer warpgroups
per program that take turns on the tensor cores, so one's softmax overlaps the other's
matrix products (FlashAttention-3, arXiv:2407.08608, §3.1). The forward is persistent: one
program per SM loops over query blocks, loading the next block's queries while it computes
this one's. pallas_mosaic_gpu_tiles.py holds
the stream and tile pieces; the backward is in pallas_mosaic_gpu_vjp.py.

Causal and packed-document tiles that are wholly masked are never loaded: each program's
loop bounds come from the diagonal and from ``pallas_tiles.segment_block_ranges``. Any T:
inputs are padded to whole programs; padded keys are masked by causality or, without it, by
a segment of their own. bf16 (or f16) inputs with head_dim 64 or 128; other inputs take the
Triton kernels (``supports``).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mpt_jax.attention import flash, pallas_mosaic_gpu_vjp, pallas_tiles, tile_schedule
from mpt_jax.attention import pallas_mosaic_gpu_tiles as tiles

HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float16")
BLOCK_MULTIPLE = 64  # wgmma tiles have 64 rows per warpgroup
# The persistent forward's tile order (tile_schedule.py): (row, head) pairs in groups of 4.
# On an H200 at B=8, T=2048, N=16 the forward kernel took 271 us against 308 with every
# pair's heaviest block first across the batch, in one device call (benchmarks/RESULTS.md).
HEAD_GROUP = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and pipeline depths of the three kernels.

  ``block_q`` is the query rows of one consumer warpgroup (a program holds
  COMPUTE_WARPGROUPS of them), ``block_k`` the key rows of one streamed tile, ``stages`` the
  slots of the stream. ``*_dq``: the dQ kernel (queries held, keys streamed); ``*_dkv``: the
  dK/dV kernel (keys held per warpgroup, queries streamed). Blocks are multiples of 64.
  Defaults: no candidate of ``benchmarks/attention.py --sweep mosaic_gpu`` on an H200 beat
  them by more than the run-to-run spread (benchmarks/RESULTS.md); 64 x 128 x 3 stages
  exceeds shared memory.

  When the four backward blocks are equal and the dS tiles of a call take at most
  ``max_ds_bytes`` (about B * N * T^2 bytes causal, twice that without), the dK/dV kernel
  stores them and the dQ kernel reads them, streaming ``stages_dq_from_ds`` slots
  (pallas_mosaic_gpu_vjp.py); otherwise the dQ kernel recomputes them. At B=8, T=2048,
  N=16 that workspace is 0.57 GB and makes forward+backward 1.08-1.10x faster on an H200.
  """

  block_q: int = 64
  block_k: int = 128
  stages: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 64
  stages_dq: int = 2
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  stages_dkv: int = 2
  stages_dq_from_ds: int = 4
  max_ds_bytes: int = 4 << 30

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "max_ds_bytes":
        if not isinstance(value, int) or value < 0:
          raise ValueError(f"BlockSizes.max_ds_bytes must be a non-negative int, got {value!r}")
        continue
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")
      if field.name.startswith("block") and value % BLOCK_MULTIPLE:
        raise ValueError(f"BlockSizes.{field.name} must be a multiple of {BLOCK_MULTIPLE}, got {value}")
      if field.name.startswith("stages") and value < 2:
        raise ValueError(f"BlockSizes.{field.name} must be at least 2 (double buffering), got {value}")

  @property
  def padded_multiple(self) -> int:
    """Sequences are padded to a multiple of this: whole programs and whole tiles in every kernel."""
    rows = tiles.COMPUTE_WARPGROUPS
    sides = (rows * self.block_q, self.block_k, rows * self.block_q_dq, self.block_k_dq)
    return math.lcm(*sides, self.block_q_dkv, rows * self.block_k_dkv)


def supports(q, k) -> bool:
  """Whether flash_attention takes these shapes: self-attention in bf16/f16, head_dim 64 or 128."""
  return q.shape[1] == k.shape[1] and q.shape[-1] in HEAD_DIMS and q.dtype.name in DTYPES


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x), where these kernels compile."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, block_sizes=None, interpret=False):
  """ALiBi flash attention; the same function as ``reference.attention`` with T == S.

  Args:
    q, k, v: [B, T, N, H], all bfloat16 or all float16; H 64 or 128.
    slopes: [N] ALiBi slopes.
    segment_ids: optional int [B, T]; tokens attend only within their own segment.
    causal: mask keys after the query (and use the causal ALiBi form).
    scale: softmax scale, a Python float; defaults to 1/sqrt(H).
    block_sizes: a ``BlockSizes``; None for the defaults.
    interpret: must be False. jax's Mosaic GPU interpreter (0.10, 0.11) cannot run these
      kernels: its wgmma takes no transposed operand (AttributeError: 'TransposeTransform'
      object has no attribute 'indices'), and it has no run_state and no CPU rule for
      layout_cast. Off a Hopper GPU use impl='pallas_triton', which interprets.

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
    head_dim_ok=lambda h: h in HEAD_DIMS,
    head_dim_rule=f"one of {HEAD_DIMS}",
  )
  if interpret:
    raise ValueError("the Mosaic GPU kernels run only on a Hopper GPU (see interpret); use impl='pallas_triton'")
  if q.dtype.name not in DTYPES:
    raise ValueError(f"the Mosaic GPU kernels take {DTYPES} inputs, got {q.dtype}; use impl='pallas_triton'")
  batch, seq_len, _, head_dim = q.shape
  blocks = block_sizes or BlockSizes()
  padded_len = pl.cdiv(seq_len, blocks.padded_multiple) * blocks.padded_multiple
  segment_ids = _padded_segments(segment_ids, batch, seq_len, padded_len, causal=causal)
  pad = ((0, 0), (0, padded_len - seq_len), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  statics = _Statics(causal=causal, scale=head_dim**-0.5 if scale is None else float(scale), block_sizes=blocks)
  out = _attention(q, k, v, jnp.asarray(slopes, jnp.float32), segment_ids, statics=statics)
  return out[:, :seq_len]


def _padded_segments(segment_ids, batch: int, seq_len: int, padded_len: int, *, causal: bool):
  """Segment ids over the padded length, or None when nothing needs masking beyond causality.

  Padded keys come after every real query, so the causal mask hides them; without it they get
  a segment of their own (int32 max, which keeps sorted ids sorted for block skipping).
  """
  if padded_len == seq_len or (causal and segment_ids is None):
    return None if segment_ids is None else segment_ids.astype(jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, seq_len), jnp.int32)
  pad_id = jnp.iinfo(jnp.int32).max
  return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)), constant_values=pad_id)


@dataclasses.dataclass(frozen=True)
class _Statics:
  """Everything static about one call: the forward takes it whole, the backward its fields by name."""

  causal: bool
  scale: float
  block_sizes: BlockSizes


def _forward(q, k, v, slopes, segment_ids, statics: _Statics):
  """Runs the forward kernel on padded inputs; returns the output and the logsumexp (log2 units) [B, N, T]."""
  batch, seq_len, heads, head_dim = q.shape
  blocks = statics.block_sizes
  block_q, block_k = blocks.block_q, blocks.block_k
  program_rows = tiles.COMPUTE_WARPGROUPS * block_q
  num_programs = seq_len // program_rows
  stages = min(blocks.stages, seq_len // block_k)
  segments = segment_ids is not None
  segment_operands = ()
  if segments:
    k_range, _ = pallas_tiles.segment_block_ranges(segment_ids, block_q=program_rows, block_k=block_k)
    segment_operands = (segment_ids, *k_range)
  stream_tiles = [tiles.matrix_buffer((stages, block_k, head_dim), q.dtype)] * 2
  if segments:
    stream_tiles.append(plgpu.SMEM((stages, block_k), jnp.int32))
  # Queries (and their segments) are double-buffered by tile parity: each warpgroup loads its
  # next tile's while it computes this one.
  query_buffers = (
    tiles.matrix_buffer((2, tiles.COMPUTE_WARPGROUPS, block_q, head_dim), q.dtype),  # q, then the output
    plgpu.SMEM((tiles.COMPUTE_WARPGROUPS, block_q), jnp.float32),  # logsumexp
    plgpu.SMEM((2, tiles.COMPUTE_WARPGROUPS, block_q), jnp.int32) if segments else None,  # query segments
  )
  # Persistent (FlashAttention-3's tile scheduler): one program per SM loops over query
  # blocks, so the producer streams the next block's keys while the consumers store the last.
  num_ctas = min(num_programs * heads * batch, _multiprocessors())
  schedule = _schedule(
    batch * heads,
    num_programs,
    num_ctas,
    program_rows=program_rows,
    block_k=block_k,
    causal=statics.causal,
    segments=segments,
  )
  kernel = functools.partial(
    _forward_kernel,
    segments=segments,
    causal=statics.causal,
    scale=statics.scale,
    block_k=block_k,
    batch_size=batch,
  )
  out, lse = plgpu.kernel(
    kernel,
    out_type=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      # Sequence minor-most, so each warpgroup stores its block_q values with one 1-D TMA.
      jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32),
    ],
    scratch_types=[
      query_buffers,
      tiles.held_barriers(2, buffers=2),  # query tile and segments loaded, per parity
      tiles.Stream.scratch(stream_tiles),
      plgpu.Barrier(num_arrivals=tiles.COMPUTE_WARPGROUPS),  # the consumers' turns on the tensor cores
    ],
    grid=(num_ctas,),
    grid_names=("ctas",),
    num_threads=tiles.COMPUTE_WARPGROUPS + 1,
    thread_name=tiles.WARPGROUP_AXIS,
    compiler_params=tiles.compiler_params(),
    kernel_name="alibi_flash_forward_mosaic_gpu",
  )(q, k, v, slopes, jnp.asarray(schedule), *segment_operands)
  return out, lse


def _schedule(pairs: int, blocks: int, programs: int, *, program_rows: int, block_k: int, causal: bool, segments: bool):
  """The forward's tile table (tile_schedule.schedule) over ``blocks`` query blocks of ``pairs`` (row, head) pairs.

  A tile's cost is its key steps: up to its diagonal when causal, all of them otherwise. With
  segments the cost depends on the documents, which are not known here: every tile then
  counts the same and the order is query blocks heaviest first across all pairs, round robin
  (on 4 packed documents per row this measured faster than the grouped order).
  """
  if segments:
    return tile_schedule.schedule(np.ones((pairs, blocks)), programs=programs, head_group=pairs)
  key_steps = (
    (np.arange(1, blocks + 1) * program_rows + block_k - 1) // block_k if causal else blocks * program_rows // block_k
  )
  steps = np.broadcast_to(key_steps, (pairs, blocks))
  return tile_schedule.schedule(steps, programs=programs, head_group=HEAD_GROUP)


def _multiprocessors() -> int:
  """Streaming multiprocessors of the default GPU (132 on an H100/H200 SXM; also off the GPU)."""
  return getattr(jax.devices()[0], "core_count", None) or 132


def _forward_kernel(*refs, segments: bool, causal: bool, scale: float, block_k: int, batch_size: int):
  """One program: the tiles its row of the schedule lists (``_schedule``), each COMPUTE_WARPGROUPS
  blocks of block_q queries of one (batch row, head); and their producer."""
  q_ref, k_ref, v_ref, slopes_ref, schedule_ref, *refs = refs
  segment_ids_ref = k_lo_ref = k_hi_ref = None
  if segments:
    segment_ids_ref, k_lo_ref, k_hi_ref, *refs = refs
  out_ref, lse_ref, query_buffers, q_loaded, stream_scratch, turn = refs
  warpgroup = lax.axis_index(tiles.WARPGROUP_AXIS)
  q_buffers, lse_buffers, q_segment_buffers = query_buffers
  stream = tiles.Stream(*stream_scratch)
  block_q, head_dim = q_buffers.shape[2:]
  seq_len, heads = k_ref.shape[1:3]
  num_programs = seq_len // (tiles.COMPUTE_WARPGROUPS * block_q)
  cta = lax.axis_index("ctas")
  my_tiles = schedule_ref[cta, 0]

  def tile(i):
    """(batch row, head, first query, key steps lo, hi) of this program's i-th tile."""
    t = schedule_ref[cta, i + 1]  # head_and_row * num_programs + query_block
    query_block, head_and_row = lax.rem(t, jnp.int32(num_programs)), lax.div(t, jnp.int32(num_programs))
    batch, head = lax.rem(head_and_row, jnp.int32(batch_size)), lax.div(head_and_row, jnp.int32(batch_size))
    start, lo, hi = tiles.query_program(
      query_block,
      block_q=block_q,
      block_k=block_k,
      seq_len=seq_len,
      causal=causal,
      segment_ranges=(k_lo_ref, k_hi_ref) if segments else None,
      batch=batch,
    )
    return batch, head, start, lo, hi

  def produce():
    def produce_tile(i, base):
      batch, head, _, lo, hi = tile(i)
      sources = tiles.key_sources(k_ref, v_ref, segment_ids_ref, batch=batch, head=head, block_k=block_k)
      return stream.produce(sources, lo, hi, base)

    lax.fori_loop(0, my_tiles, produce_tile, jnp.int32(0))

  def take_turn():
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  def load_queries(i):
    """Starts the copies of this warpgroup's queries (and segments) of tile i into buffer i % 2."""
    batch, head, program_start, _, _ = tile(i)
    q_start = program_start + warpgroup * block_q
    parity = lax.rem(i, 2)
    copies = [(q_ref.at[batch, pl.ds(q_start, block_q), head], q_buffers.at[parity, warpgroup])]
    if segments:
      copies.append((segment_ids_ref.at[batch, pl.ds(q_start, block_q)], q_segment_buffers.at[parity, warpgroup]))
    tiles.start_copies(copies, q_loaded, parity * tiles.COMPUTE_WARPGROUPS + warpgroup)

  def consume_tile(i, base):
    batch, head, program_start, lo, hi = tile(i)
    slope = slopes_ref[head]
    parity = lax.rem(i, 2)
    q_smem, lse_smem = q_buffers.at[parity, warpgroup], lse_buffers.at[warpgroup]
    q_start = program_start + warpgroup * block_q
    queries = (batch, pl.ds(q_start, block_q), head)
    tiles.wait_copies(q_loaded[: 2 if segments else 1], parity * tiles.COMPUTE_WARPGROUPS + warpgroup)
    q_segment = tiles.load_vector(q_segment_buffers.at[parity, warpgroup], tiles.ROWS) if segments else None
    q_pos = tiles.positions(q_start, block_q, tiles.ROWS)
    origin = q_start.astype(jnp.float32)

    def prefetch():
      """The next tile's queries, into the buffer whose output the last tile stored a step ago."""
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      load_queries(i + 1)

    def visit(step, carry, *, masked: bool):
      acc, row_max, row_sum = carry
      slot = stream.slot(step, lo, base)
      stream.wait(0, slot)
      qk = tiles.matmul(
        (q_smem, tiles.transposed(stream.slots[0].at[slot])), shape=(block_q, block_k), while_running=take_turn
      )
      stream.release(0, slot)
      # Every warpgroup visits step lo: its rows see at least their own keys.
      pl.when((step == lo) & (i + 1 < my_tiles))(prefetch)
      # Key positions only where the causal mask or the non-causal ALiBi reads them.
      frame = tiles.key_step_frame(
        stream,
        slot,
        step,
        block_k=block_k,
        q_pos=q_pos,
        q_segment=q_segment,
        slope=slope,
        origin=origin,
        key_positions=masked or not causal,
      )
      key_term = None
      if causal:
        # The key term as one multiply-add per column from offsets that stay in registers
        # across steps (one I2F, add and multiply fewer per column and step than TileFrame's).
        slope2 = slope * pallas_tiles.LOG2E
        key_start = (step * block_k).astype(jnp.float32)
        key_term = tiles.positions(0, block_k, tiles.COLUMNS) * slope2 + slope2 * (key_start - origin)
      s = frame.scores(qk, scale=scale, causal=causal, masked=masked, key_term=key_term)
      # Online softmax (FlashAttention-2 §3.1.1): rescale the running sums when the row maximum grows.
      new_max = jnp.maximum(row_max, s.max(axis=1))
      rescale = jnp.exp2(row_max - new_max)
      p = jnp.exp2(s - tiles.rows(new_max, s.shape))
      row_sum = row_sum * rescale + p.sum(axis=1)
      acc = acc * tiles.rows(rescale, acc.shape)
      p = p.astype(q_smem.dtype)
      plgpu.barrier_arrive(turn)  # softmax done: the other consumer may issue its products
      stream.wait(1, slot)
      plgpu.barrier_wait(turn)  # until the tensor cores are ours again
      acc = tiles.accumulate(acc, (p, stream.slots[1].at[slot]))
      stream.release(1, slot)
      return acc, new_max, row_sum

    def pass_over(step, carry):
      stream.pass_step(stream.slot(step, lo, base))
      take_turn()
      take_turn()
      return carry

    split, stop = tiles.query_major_plan(
      q_start, block_q=block_q, block_k=block_k, lo=lo, hi=hi, causal=causal, segments=segments
    )
    carry = (
      tiles.zeros((block_q, head_dim)),
      plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), tiles.ROWS),
      tiles.zeros((block_q,), tiles.ROWS),
    )
    pl.when(warpgroup == 1)(take_turn)  # start out of phase: the consumers alternate
    acc, row_max, row_sum = tiles.run_plan(
      [
        (lo, split, functools.partial(visit, masked=False)),
        (split, stop, functools.partial(visit, masked=True)),
        (stop, hi, pass_over),
      ],
      carry,
    )
    pl.when(warpgroup == 0)(take_turn)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's logsumexp has left lse_smem
    q_smem[...] = (acc / tiles.rows(row_sum, acc.shape)).astype(q_smem.dtype)
    lse_smem[...] = (
      row_max + jnp.log2(row_sum) + pallas_tiles.alibi_query_term(slope, q_pos, origin=origin, causal=causal)
    )
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[queries])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, block_q)])
    return base + hi - lo

  def consume():
    load_queries(0)
    lax.fori_loop(0, my_tiles, consume_tile, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  tiles.as_producer(warpgroup, produce)
  tiles.as_consumer(warpgroup, consume)


_attention = flash.attention_with_vjp(_forward, pallas_mosaic_gpu_vjp.backward)
