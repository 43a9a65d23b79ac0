"""Pieces shared by the Mosaic GPU (Hopper) attention kernels: the TMA stream, wgmma products,
ALiBi and masks on register tiles, and the loop plans that decide which tiles a warpgroup visits.

Every kernel is warp-specialised (FlashAttention-3, Shah et al. 2024, arXiv:2407.08608): one
producer warpgroup copies tiles from global to shared memory with TMA into a ring of slots
(``Stream``), and COMPUTE_WARPGROUPS consumer warpgroups, each holding its own block of rows,
multiply them on the tensor cores (wgmma) and do the softmax in registers. A program's
consumers visit the same steps of the stream in the same order; one that needs fewer steps
(under the causal mask) passes over the rest (``pass_step``) so the producer can refill.

Scores are in log2 units, ``s = log2(e) * (scale * q.k + ALiBi)``, as in pallas_tiles.py, with
causal ALiBi split into a per-key term added to each tile and a per-query term kept in the
logsumexp. Vectors along a tile's rows use the ROWS layout, along its columns COLUMNS.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mpt_jax.attention import masks
from mpt_jax.attention.pallas_tiles import LOG2E

COMPUTE_WARPGROUPS = 2  # consumers per program; the producer is warpgroup COMPUTE_WARPGROUPS
WARPGROUP_AXIS = "warpgroup"
ROWS = plgpu.Layout.WGMMA.reduce(1)  # [rows] vectors of a wgmma tile: one value per row
COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # [columns] vectors: one value per column
# Registers per thread: consumers take most of the register file, the producer keeps the few
# that issuing copies needs. 240 and 24 rather than 232 and 40 cut the dK/dV kernel's spills
# from 156 / 188 bytes stored / loaded to 56 / 92 and made forward + backward 1.03x faster on
# an H200 (benchmarks/RESULTS.md, issue 11).
CONSUMER_REGISTERS, PRODUCER_REGISTERS = 240, 24
# 128-byte swizzled tiles of 64 two-byte elements per row: what TMA and wgmma read without bank conflicts.
TILE_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

_JAX_0_11 = jax.__version_info__ >= (0, 11)


def matrix_buffer(shape: Sequence[int], dtype) -> plgpu.SMEM:
  """Shared memory for tiles that wgmma reads, [..., rows, head_dim]."""
  return plgpu.SMEM(tuple(shape), dtype, transforms=TILE_TRANSFORMS)


def transposed(ref):
  """A 2-D SMEM tile as its transpose, for wgmma's B operand (jax 0.10 and 0.11 spell it differently)."""
  return ref.transpose((1, 0)) if _JAX_0_11 else plgpu.transpose_ref(ref, (1, 0))


def load_vector(ref, layout):
  """A 1-D SMEM vector into registers, in ``layout``."""
  return plgpu.load(ref, layout=layout) if _JAX_0_11 else plgpu.load(ref, (), layout=layout)


def matmul(*products, shape: tuple[int, int], while_running: Callable[[], None] | None = None):
  """``a @ b`` for each ``(a, b)`` of ``products`` on the tensor cores, float32 [m, n] each.

  a is an SMEM tile or bf16 registers, b an SMEM tile. The products are issued together and
  awaited together (one wait instead of one each); ``while_running`` runs after they are
  issued and before they are awaited. One product returns an array, several a tuple.
  """

  def run(*acc_refs):
    for acc_ref, (a, b) in zip(acc_refs, products):
      plgpu.wgmma(acc_ref, a, b)
    if while_running is not None:
      while_running()
    return tuple(acc_ref[...] for acc_ref in acc_refs)

  results = pl.run_scoped(run, *(plgpu.ACC(shape, jnp.float32) for _ in products))
  return results[0] if len(products) == 1 else results


def accumulate(accumulators, *products):
  """``acc + a @ b`` for each accumulator and ``(a, b)``, by wgmma in the accumulators' own registers.

  Issued together, awaited together. ``accumulators`` is an array (one product) or a tuple.
  """
  single = not isinstance(accumulators, tuple)
  accumulators = (accumulators,) if single else accumulators

  def run(acc_refs):
    for acc_ref, (a, b) in zip(acc_refs, products):
      plgpu.wgmma(acc_ref, a, b)

  results = pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc in accumulators))
  return results[0] if single else results


def zeros(shape, layout=plgpu.Layout.WGMMA):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def positions(start, size: int, layout):
  """Float32 positions start .. start + size - 1 as a vector in ``layout`` (exact below 2**24)."""
  return (plgpu.broadcasted_iota(jnp.int32, (size,), 0, layout=layout) + start).astype(jnp.float32)


def rows(vector, shape):
  """A ROWS vector repeated along the columns of a [rows, columns] tile."""
  return lax.broadcast_in_dim(vector, shape, [0])


def columns(vector, shape):
  """A COLUMNS vector repeated along the rows of a tile."""
  return lax.broadcast_in_dim(vector, shape, [1])


@dataclasses.dataclass(frozen=True)
class TileFrame:
  """Positions and segments along both sides of one score tile, and the head's ALiBi slope.

  The tile is [rows, columns] with queries along the rows (forward, dQ) or along the columns
  (dK/dV, whose tiles are transposed); ``origin`` anchors the causal ALiBi split
  (pallas_tiles.alibi_key_term) at a position near the tile, so both terms stay small where
  the weights are large.
  """

  row_pos: jax.Array  # ROWS float32
  col_pos: jax.Array | None  # COLUMNS float32; None where nothing reads it (key_step_frame)
  row_segment: jax.Array | None  # ROWS int32, or None unpacked
  col_segment: jax.Array | None  # COLUMNS int32
  slope: jax.Array  # scalar float32
  origin: jax.Array  # scalar float32
  queries_along_rows: bool

  def alibi_key_term(self):
    """The causal ALiBi key term of the tile's keys, log2 units: a ROWS or COLUMNS vector."""
    key_pos = self.col_pos if self.queries_along_rows else self.row_pos
    return self.slope * LOG2E * (key_pos - self.origin)

  def scores(self, qk, *, scale: float, causal: bool, masked: bool, key_term=None):
    """Log2-unit scores of a tile of raw q.k products, less the per-query ALiBi term when causal.

    ``masked``: apply the causal mask (tiles on the diagonal); segments mask every tile.
    ``key_term``: the causal key term (``alibi_key_term``), if the caller has it cheaper.
    """
    shape = qk.shape
    if causal:  # the key term only: a vector, one multiply-add per score
      if key_term is None:
        key_term = self.alibi_key_term()
      bias = columns(key_term, shape) if self.queries_along_rows else rows(key_term, shape)
    else:
      slope = self.slope * LOG2E
      bias = masks.alibi_bias(slope, rows(self.row_pos, shape), columns(self.col_pos, shape), causal=False)
    s = qk * (scale * LOG2E) + bias
    keep = None
    if causal and masked:
      q_pos, k_pos = rows(self.row_pos, shape), columns(self.col_pos, shape)
      if not self.queries_along_rows:
        q_pos, k_pos = k_pos, q_pos
      keep = k_pos <= q_pos
    if self.row_segment is not None:
      same = rows(self.row_segment, shape) == columns(self.col_segment, shape)
      keep = same if keep is None else keep & same
    return s if keep is None else jnp.where(keep, s, masks.MASK_VALUE)


@dataclasses.dataclass(frozen=True)
class Stream:
  """Tiles of a few operands that the producer copies (TMA) into a ring of SMEM slots, one step at a time.

  The ring position of step i of a loop over ``[start, stop)`` is ``base + i - start``, where
  ``base`` counts the steps a program streamed before this loop (a persistent program loops
  over several tiles); position n lives in slot ``n % stages``. Consumers wait on a slot's
  ``loaded`` barrier, read it, and arrive on its ``consumed`` barrier (one arrival per
  consumer warpgroup) so the producer may refill it. Barrier phases are tracked per thread,
  so every consumer waits on every step, even one it passes over.
  """

  slots: tuple  # per operand: SMEM [stages, *tile]
  loaded: tuple  # per operand: barriers [stages]
  consumed: tuple  # per operand: barriers [stages], COMPUTE_WARPGROUPS arrivals each

  @staticmethod
  def scratch(tiles: Sequence[plgpu.SMEM]):
    """Scratch types of a stream over operands whose slot buffers are ``tiles`` ([stages, ...] each)."""
    stages = tiles[0].shape[0]
    loaded = tuple(plgpu.Barrier(num_barriers=stages) for _ in tiles)
    consumed = tuple(plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages) for _ in tiles)
    return tuple(tiles), loaded, consumed

  @property
  def stages(self) -> int:
    return self.slots[0].shape[0]

  def slot(self, step, start, base=0):
    """The slot of step ``step`` of a loop from ``start`` that began at ring position ``base``."""
    return lax.rem(base + step - start, jnp.int32(self.stages))

  def produce(self, sources: Callable[[jax.Array], Sequence], start, stop, base=0):
    """Producer: copies ``sources(step)`` (a GMEM tile per operand) for steps ``[start, stop)``.

    Returns the ring position after them.
    """

    @pl.loop(start, stop)
    def _copy(step):
      slot = self.slot(step, start, base)
      for source, slots, loaded, consumed in zip(sources(step), self.slots, self.loaded, self.consumed):

        @pl.when(base + step - start >= self.stages)
        def _wait_for_consumers():
          plgpu.barrier_wait(consumed.at[slot])

        plgpu.copy_gmem_to_smem(source, slots.at[slot], loaded.at[slot])

    return base + stop - start

  def wait(self, operand: int, slot):
    plgpu.barrier_wait(self.loaded[operand].at[slot])

  def release(self, operand: int, slot):
    plgpu.barrier_arrive(self.consumed[operand].at[slot])

  def pass_step(self, slot):
    """A consumer's turn at a step it does not compute: keeps the barrier phases and frees the slot."""
    for operand in range(len(self.slots)):
      self.wait(operand, slot)
      self.release(operand, slot)

  def pass_over(self, start):
    """A ``run_plan`` body for a loop from ``start`` whose steps a consumer does not compute:
    ``pass_step`` each, the carry unchanged."""

    def body(step, carry):
      self.pass_step(self.slot(step, start))
      return carry

    return body


def as_producer(warpgroup, work: Callable[[], None]) -> None:
  """Runs ``work`` on the producer warpgroup, which needs few registers."""

  @pl.when(warpgroup == COMPUTE_WARPGROUPS)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    work()


def as_consumer(warpgroup, work: Callable[[], None]) -> None:
  """Runs ``work`` on each consumer warpgroup, with most of the register file."""

  @pl.when(warpgroup < COMPUTE_WARPGROUPS)
  def _consumer():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    work()


def key_sources(k_ref, v_ref, segment_ids_ref, *, batch, head, block_k: int):
  """``Stream.produce``'s sources for kernels that stream keys: key step -> K, V (and segment ids) tiles."""

  def sources(step):
    keys = (batch, pl.ds(step * block_k, block_k), head)
    key_tiles = [k_ref.at[keys], v_ref.at[keys]]
    if segment_ids_ref is not None:
      key_tiles.append(segment_ids_ref.at[batch, pl.ds(step * block_k, block_k)])
    return key_tiles

  return sources


def key_step_frame(
  stream: Stream, slot, step, *, block_k: int, q_pos, q_segment, slope, origin, key_positions: bool = True
) -> TileFrame:
  """The TileFrame of key step ``step`` in kernels that hold queries and stream keys (forward,
  dQ); with segments (``q_segment`` given) it reads the step's key segments from the stream.

  ``key_positions=False`` leaves the key positions out, for a step whose scores read none
  (an unmasked causal step given its key term): jax 0.11's Mosaic GPU layout inference finds
  no layouts for a kernel holding that unused vector of a 64-key tile (benchmarks/RESULTS.md,
  issue 11, thirteenth session).
  """
  k_segment = None
  if q_segment is not None:
    stream.wait(2, slot)  # key_sources' third operand
    k_segment = load_vector(stream.slots[2].at[slot], COLUMNS)
    stream.release(2, slot)
  k_pos = positions(step * block_k, block_k, COLUMNS) if key_positions else None
  return TileFrame(q_pos, k_pos, q_segment, k_segment, slope, origin, True)


def held_barriers(count: int, buffers: int = 1):
  """Scratch for ``copy_in``: one barrier per held operand, one per consumer and buffer each
  (index ``buffer * COMPUTE_WARPGROUPS + warpgroup``)."""
  return tuple(plgpu.Barrier(num_barriers=buffers * COMPUTE_WARPGROUPS) for _ in range(count))


def start_copies(copies, barriers, index):
  """Starts a TMA copy of each (GMEM tile, SMEM buffer), each arriving on its barrier's ``index``.

  One barrier per copy: a TMA copy arrives on its barrier from every thread of the
  warpgroup, so a second copy on the same barrier would complete a phase early.
  """
  for (source, destination), barrier in zip(copies, barriers):
    plgpu.copy_gmem_to_smem(source, destination, barrier.at[index])


def wait_copies(barriers, index):
  """Waits for the copies ``start_copies`` started on ``barriers`` at ``index``."""
  for barrier in barriers:
    plgpu.barrier_wait(barrier.at[index])


def copy_in(copies, barriers, warpgroup):
  """Copies each (GMEM tile, SMEM buffer) with TMA into a warpgroup's buffers and waits for all of them."""
  start_copies(copies, barriers, warpgroup)
  wait_copies(barriers[: len(copies)], warpgroup)


def run_plan(plan, carry):
  """Runs a consumer's loop plan: ``(start, stop, body)`` segments in order, one carry through all.

  ``body(step, carry) -> carry``; segments split a loop where the work per step changes
  (tiles that need the causal mask, steps passed over).
  """
  for start, stop, body in plan:
    carry = lax.fori_loop(start, stop, body, carry)
  return carry


def query_program(query_block, *, block_q: int, block_k: int, seq_len: int, causal: bool, segment_ranges, batch):
  """Query block ``query_block``'s first query and key steps ``[lo, hi)``, in kernels that hold queries (forward, dQ).

  Key steps run up to the block's last query's diagonal when causal, and within
  ``segment_ranges`` (pallas_tiles.segment_block_ranges' [B, query blocks] refs of first and
  past-last key blocks) when given.
  """
  program_rows = COMPUTE_WARPGROUPS * block_q
  start = query_block * program_rows
  lo, hi = jnp.int32(0), jnp.int32(seq_len // block_k)
  if causal:
    hi = pl.cdiv(start + program_rows, jnp.int32(block_k))
  if segment_ranges is not None:
    lo, hi = clip(lo, hi, *(ref[batch, query_block] for ref in segment_ranges))
  return start, lo, hi


def key_program(*, block_q: int, block_k: int, seq_len: int, causal: bool, segment_ranges, batch):
  """This program's first key and query steps ``[lo, hi)``, in kernels that hold keys (dK/dV).

  Earlier keys are seen by more queries, so grid order is already heaviest first. Query
  steps start at the program's diagonal when causal, and lie within ``segment_ranges``
  (pallas_tiles.segment_block_ranges' [B, key blocks] refs of first and past-last query
  blocks, per warpgroup's block) when given.
  """
  program = lax.axis_index("programs")
  start = program * COMPUTE_WARPGROUPS * block_k
  lo, hi = jnp.int32(0), jnp.int32(seq_len // block_q)
  if causal:
    lo = lax.div(start, jnp.int32(block_q))
  if segment_ranges is not None:
    lo, hi = clip(lo, hi, *program_span(segment_ranges, batch, program))
  return start, lo, hi


def program_span(segment_ranges, batch, program):
  """A program's partner blocks from its warpgroups' blocks' ranges, which rise
  (pallas_tiles.segment_block_ranges): the first warpgroup's lo to the last's hi."""
  lo_ref, hi_ref = segment_ranges
  first = program * COMPUTE_WARPGROUPS
  return lo_ref[batch, first], hi_ref[batch, first + COMPUTE_WARPGROUPS - 1]


def query_major_plan(q_start, *, block_q: int, block_k: int, lo, hi, causal: bool, segments: bool):
  """``(split, stop)`` for a warpgroup holding queries ``[q_start, q_start + block_q)`` over key steps ``[lo, hi)``.

  Steps ``[lo, split)`` need no mask, ``[split, stop)`` do (the diagonal; every step with
  segments), ``[stop, hi)`` lie past this warpgroup's diagonal and are passed over.
  """
  stop = jnp.clip(pl.cdiv(q_start + block_q, jnp.int32(block_k)), lo, hi) if causal else hi
  if segments:
    return lo, stop
  split = jnp.clip(lax.div(q_start, jnp.int32(block_k)), lo, stop) if causal else stop
  return split, stop


def key_major_plan(k_start, *, block_q: int, block_k: int, lo, hi, causal: bool, segment_span=None):
  """``(first, split, stop)`` for a warpgroup holding keys ``[k_start, k_start + block_k)`` over query steps ``[lo, hi)``.

  Steps ``[lo, first)`` come before this warpgroup's keys or its segments and are passed
  over, ``[first, split)`` need the mask (the diagonal; every step with segments), ``[split,
  stop)`` do not, ``[stop, hi)`` lie past the warpgroup's segments and are passed over.
  ``segment_span``: the query blocks ``(lo, hi)`` that can share a segment with these keys.
  """
  first = jnp.clip(lax.div(k_start, jnp.int32(block_q)), lo, hi) if causal else lo
  if segment_span is not None:
    first, stop = clip(first, hi, *segment_span)
    return first, stop, stop
  split = jnp.clip(pl.cdiv(k_start + block_k, jnp.int32(block_q)), first, hi) if causal else first
  return first, split, hi


def clip(lo, hi, start, stop):
  """``[start, stop)`` narrowed to ``[lo, hi)``, never reversed."""
  start = jnp.clip(start, lo, hi)
  return start, jnp.clip(stop, start, hi)


def compiler_params():
  # approx_math: exp2 and division by the fast approximate instructions, as FlashAttention does.
  return plgpu.CompilerParams(approx_math=True)
