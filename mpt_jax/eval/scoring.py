"""Log-likelihoods of continuations, in batches padded to a few length buckets.

Requests (context, continuation) are sorted by length and grouped into batches of a fixed size;
each batch is right-padded to the next bucket (powers of two from 64, up to the longest sequence
allowed), so an evaluation compiles once per bucket. Padding follows each sequence, where causal
attention never looks, so a request scores exactly as it would alone.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from mpt_jax.model import MPTForCausalLM

SMALLEST_BUCKET = 64


class Request(NamedTuple):
  """One sequence to score: log p(continuation | context), token ids."""

  context: list[int]
  continuation: list[int]


class Scores(NamedTuple):
  """Per request."""

  loglik: np.ndarray  # float64 [R]: sum over the continuation of log p(token | every token before it)
  greedy: np.ndarray  # bool [R]: each continuation token is the argmax after its prefix (greedy decoding gives it)


def bucket(length: int, max_length: int) -> int:
  """The padded width of a batch whose longest sequence has ``length`` tokens."""
  width = SMALLEST_BUCKET
  while width < length:
    width *= 2
  return min(width, max_length)


def score(
  model: MPTForCausalLM,
  requests: Sequence[Request],
  *,
  batch_size: int,
  max_length: int,
  desc: str = "score",
  progress: bool = True,
) -> Scores:
  """Scores every request; each must fit in ``max_length`` (<= model.config.max_seq_len) tokens."""
  if max_length > model.config.max_seq_len:
    raise ValueError(f"max_length={max_length} exceeds the model's max_seq_len={model.config.max_seq_len}")
  lengths = np.array([len(r.context) + len(r.continuation) for r in requests])
  if lengths.size and lengths.max() > max_length:
    raise ValueError(f"request {int(lengths.argmax())} has {lengths.max()} tokens > max_length={max_length}")
  graphdef, state = nnx.split(model)
  order = np.argsort(-lengths, kind="stable")  # longest first: the widest bucket (and any memory error) comes first
  loglik, greedy = np.zeros(len(requests)), np.zeros(len(requests), bool)
  starts = range(0, len(requests), batch_size)
  for start in tqdm.tqdm(starts, desc=desc, unit="batch", disable=not progress):
    rows = order[start : start + batch_size]
    tokens = np.zeros((batch_size, bucket(int(lengths[rows].max()), max_length)), np.int32)
    first, end = np.zeros(batch_size, np.int32), np.zeros(batch_size, np.int32)  # continuation = tokens[first:end]
    for i, r in enumerate(rows):
      first[i], end[i] = len(requests[r].context), lengths[r]
      tokens[i, : end[i]] = requests[r].context + requests[r].continuation
    log_probs, batch_greedy = _score_batch(graphdef, state, tokens, first, end)
    # Summed on the host in float64: a 100-token answer's log-likelihood is near -1000, where
    # float32's spacing alone is 6e-5.
    loglik[rows] = np.asarray(log_probs, np.float64)[: len(rows)].sum(axis=1)
    greedy[rows] = np.asarray(batch_greedy)[: len(rows)]
  return Scores(loglik, greedy)


@functools.partial(jax.jit, static_argnums=0)
def _score_batch(graphdef, state, tokens, first, end):
  """tokens int32 [B, T] -> (float32 [B, T] log-probabilities of the continuation tokens, 0 elsewhere; bool [B]).

  Position t predicts token t + 1, so positions first-1 .. end-2 score the continuation.
  """
  logits = nnx.merge(graphdef, state)(tokens)  # float32 [B, T, V]
  targets = jnp.roll(tokens, -1, axis=1)  # [B, T]
  log_probs = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
  position = jnp.arange(tokens.shape[1])
  scored = (position >= first[:, None] - 1) & (position < end[:, None] - 1)  # [B, T]
  greedy = jnp.all(jnp.where(scored, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
  return jnp.where(scored, log_probs, 0.0), greedy
