"""Which rows a step reads, as pure functions of the seed: the mixture draw and each source's order.

The mixture draw of step i depends only on (seed, i), like the original's per-sample source
choice with fixed probabilities (docs/data.md). Within a source, rows are taken
in a pseudorandom order that changes every epoch: a keyed Feistel permutation of the row
index (cycle-walking into range), evaluated pointwise, so a source of hundreds of millions
of rows needs no materialized permutation and no state beyond a counter.
"""

import numpy as np

_MIXTURE_STREAM, _ORDER_STREAM = 0, 1
_ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudorandom function give a pseudorandom permutation


def mixture_draw(seed: int, step: int, rates: np.ndarray, size: int) -> np.ndarray:
  """Source index of each of the `size` rows of global batch `step`, drawn with probabilities `rates`."""
  rng = np.random.default_rng([seed, _MIXTURE_STREAM, step])
  return rng.choice(len(rates), size=size, p=rates)


def permute(index: np.ndarray, n: int, *, seed: int, source: int, epoch: int) -> np.ndarray:
  """Position `index` (in [0, n)) of the epoch's row order of one source: a bijection of [0, n)."""
  keys = np.random.SeedSequence([seed, _ORDER_STREAM, source, epoch]).generate_state(_ROUNDS, np.uint64)
  half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # the cipher permutes [0, 4**half_bits) >= n
  x = np.asarray(index, np.uint64).copy()
  walking = np.ones(x.shape, bool)
  while walking.any():  # values that land outside [0, n) are enciphered again until inside
    x[walking] = _feistel(x[walking], keys, half_bits)
    walking = x >= n
  return x.astype(np.int64)


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: int) -> np.ndarray:
  mask = np.uint64((1 << half_bits) - 1)
  left, right = x >> np.uint64(half_bits), x & mask
  for key in keys:
    left, right = right, left ^ (_mix64(right ^ key) & mask)
  return (left << np.uint64(half_bits)) | right


def _mix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer: a cheap, well-distributed 64-bit hash (uint64 arithmetic wraps)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))
