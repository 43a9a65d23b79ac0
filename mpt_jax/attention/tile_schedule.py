"""Which tiles each program of a persistent kernel computes, and in what order.

The Hopper forward kernel (pallas_mosaic_gpu.py) runs one program per SM, each looping over
(pair, query block) tiles, a pair being one (batch row, head). Two things decide how fast
the programs finish together:
- balance: under the causal mask later query blocks visit more key blocks, so tiles differ
  in cost by up to the number of query blocks;
- L2 reuse: tiles that run at the same time should share their keys and values, which then
  come from L2 instead of HBM. Taking every pair's heaviest block first across the whole
  batch puts all pairs in flight at once, so their keys and values hardly stay in L2: on an
  H200 the forward kernel took 308 us in that order against 271 in this module's, and the
  gap grew under sustained load, which holds the clock at the GPU's power limit
  (docs/attention.md).

``schedule`` orders the tiles by groups of ``head_group`` pairs, each group's query blocks
heaviest first, and hands them out in that order to whichever program is free first by a
cost model (a tile's key steps plus a fixed overhead): list scheduling. So each program's
share ends within one tile of the others', and the tiles in flight at any moment are
consecutive in the order, from a few groups.
"""

import heapq

import numpy as np

# A tile's fixed cost in key steps: its queries' wait, its output's normalization and store.
TILE_OVERHEAD = 1.0


def schedule(steps: np.ndarray, *, programs: int, head_group: int) -> np.ndarray:
  """Each program's tiles, in order: int32 [programs, 1 + most tiles per program].

  Row p holds program p's tile count, then its tiles as ``pair * blocks + block``; unused
  entries are 0.

  Args:
    steps: [pairs, blocks] key steps of each tile (its cost).
    programs: the persistent programs, one per SM.
    head_group: pairs whose tiles come together in the order (see the module docstring).
  """
  pairs, blocks = steps.shape
  if min(pairs, blocks, programs, head_group) < 1:
    raise ValueError(f"schedule needs positive sizes, got {steps.shape=}, {programs=}, {head_group=}")
  order = [
    (pair, block)
    for group_start in range(0, pairs, head_group)
    for block in reversed(range(blocks))
    for pair in range(group_start, min(pairs, group_start + head_group))
  ]
  free_at = [(0.0, program) for program in range(programs)]  # (time free, program): earliest first
  assigned = [[] for _ in range(programs)]
  for pair, block in order:
    time, program = heapq.heappop(free_at)
    assigned[program].append(pair * blocks + block)
    heapq.heappush(free_at, (time + float(steps[pair, block]) + TILE_OVERHEAD, program))
  table = np.zeros((programs, 1 + max(map(len, assigned))), np.int32)
  for program, tiles in enumerate(assigned):
    table[program, 0] = len(tiles)
    table[program, 1 : 1 + len(tiles)] = tiles
  return table
