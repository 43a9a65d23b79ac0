"""The persistent forward's tile schedule (attention/tile_schedule.py): every tile once, programs
that finish together, tiles in flight that share few (row, head) pairs."""

import numpy as np
import pytest

from mpt_jax.attention import pallas_mosaic_gpu, tile_schedule

# The benchmark's shape on an H200: 8 rows x 16 heads, 16 query blocks of 128, 132 SMs.
PAIRS, BLOCKS, PROGRAMS = 128, 16, 132
CAUSAL_STEPS = np.broadcast_to(np.arange(1, BLOCKS + 1), (PAIRS, BLOCKS))


def _tiles(table):
  return [list(row[1 : 1 + row[0]]) for row in table]


def _runs(table, steps):
  """Per program, its tiles as (start, end, pair) under the schedule's own cost model."""
  blocks = steps.shape[1]
  runs = []
  for tiles in _tiles(table):
    time, program_runs = 0.0, []
    for t in tiles:
      end = time + steps[t // blocks, t % blocks] + tile_schedule.TILE_OVERHEAD
      program_runs.append((time, end, t // blocks))
      time = end
    runs.append(program_runs)
  return runs


def _assert_every_tile_once(table, count):
  assert sorted(t for tiles in _tiles(table) for t in tiles) == list(range(count))


@pytest.mark.parametrize(
  "pairs, blocks, programs", [(PAIRS, BLOCKS, PROGRAMS), (3, 5, 132), (32, 32, 114), (7, 3, 4), (1, 1, 1)]
)
@pytest.mark.parametrize("head_group", [1, 4, 5, 200])
def test_every_tile_runs_once(pairs, blocks, programs, head_group):
  steps = np.broadcast_to(np.arange(1, blocks + 1), (pairs, blocks))
  table = tile_schedule.schedule(steps, programs=programs, head_group=head_group)
  assert table.dtype == np.int32 and table.shape[0] == programs
  _assert_every_tile_once(table, pairs * blocks)


def test_programs_finish_within_one_tile_of_each_other():
  """List scheduling: a program takes a tile only when it is the first free, so by the cost
  model no program ends later than the earliest by more than the costliest tile."""
  table = tile_schedule.schedule(CAUSAL_STEPS, programs=PROGRAMS, head_group=4)
  finish = [runs[-1][1] for runs in _runs(table, CAUSAL_STEPS)]
  assert max(finish) - min(finish) <= CAUSAL_STEPS.max() + tile_schedule.TILE_OVERHEAD


def test_tiles_in_flight_share_few_pairs():
  """At every moment of the modelled run the programs work on tiles of at most 20 pairs (their
  keys and values, 20 MB at T = 2048, fit in L2), where heaviest-first across the batch has
  all 128 in flight."""

  def most_pairs_in_flight(table, steps):
    events = [run for runs in _runs(table, steps) for run in runs]
    starts = sorted({start for start, _, _ in events})
    return max(len({pair for start, end, pair in events if start <= moment < end}) for moment in starts)

  grouped = tile_schedule.schedule(CAUSAL_STEPS, programs=PROGRAMS, head_group=4)
  across_batch = tile_schedule.schedule(np.ones((PAIRS, BLOCKS)), programs=PROGRAMS, head_group=PAIRS)
  assert most_pairs_in_flight(grouped, CAUSAL_STEPS) <= 20
  assert most_pairs_in_flight(across_batch, CAUSAL_STEPS) == PAIRS


def test_equal_costs_across_the_batch_are_round_robin_heaviest_first():
  """What the forward uses with segments (tile costs unknown): program p takes tiles p, p + P, ...
  of the order query blocks heaviest first, then pairs."""
  table = tile_schedule.schedule(np.ones((PAIRS, BLOCKS)), programs=PROGRAMS, head_group=PAIRS)
  order = [pair * BLOCKS + block for block in reversed(range(BLOCKS)) for pair in range(PAIRS)]
  assert _tiles(table) == [order[p::PROGRAMS] for p in range(PROGRAMS)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [True, False])
def test_the_forward_schedules_every_tile_of_its_shape(causal, segments):
  table = pallas_mosaic_gpu._schedule(
    PAIRS, BLOCKS, PROGRAMS, program_rows=128, block_k=128, causal=causal, segments=segments
  )
  _assert_every_tile_once(table, PAIRS * BLOCKS)


def test_refuses_empty_sizes():
  with pytest.raises(ValueError, match="positive"):
    tile_schedule.schedule(CAUSAL_STEPS, programs=0, head_group=4)
