"""The training objective: next-token cross-entropy through MPT's tied output head.

``next_token_targets`` says what each position predicts. ``head_cross_entropy`` is the
objective the trainer differentiates: the head matmul, log-softmax and cross-entropy (plus
PaLM's z-loss) in one function whose forward pass already produces the gradients, so the
float32 [B, T, V] logits (3.3 GB per copy for MPT-1B at 8 x 2048 tokens) never exist as a
whole and the two backward matmuls run on bfloat16 operands (float32 cotangents would make
XLA run them as float32 GEMMs, ~2.5x slower: docs/performance.md). ``cross_entropy``
is the textbook version on materialized logits: the reference in tests and for evaluation.
"""

import functools

import jax
import jax.numpy as jnp

CHUNK_POSITIONS = 512  # positions per row whose logits exist at once (float32 [B, 512, V])


def next_token_targets(input_ids, segment_ids=None):
  """Targets (input_ids shifted left by one) and where a prediction counts, llm-foundry style.

  The last position of a row has no target; with segment_ids a position whose next token
  starts another document predicts nothing.

  Args:
    input_ids: int [B, T].
    segment_ids: optional int [B, T].

  Returns:
    (targets int [B, T], mask bool [B, T]).
  """
  t = input_ids.shape[1]
  targets = jnp.roll(input_ids, -1, axis=1)
  mask = jnp.broadcast_to(jnp.arange(t) < t - 1, input_ids.shape)
  if segment_ids is not None:
    mask = mask & (segment_ids == jnp.roll(segment_ids, -1, axis=1))
  return targets, mask


def cross_entropy(logits, targets):
  """(cross-entropy, logsumexp) of float logits [..., V] against int targets [...], in float32."""
  logits = logits.astype(jnp.float32)
  logsumexp = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logsumexp - target_logits, logsumexp


def head_cross_entropy(
  hidden,
  embedding,
  targets,
  weights,
  *,
  z_loss: float = 0.0,
  logit_scale: float | None = None,
  chunk_positions: int = CHUNK_POSITIONS,
):
  """sum(weights * (cross-entropy + z_loss * logsumexp^2)) of the tied head's logits.

  The logits are ``logit_scale * hidden @ embedding^T`` with bfloat16-rounded operands (as
  the model computes them) and float32 accumulation. Differentiable in ``hidden`` and
  ``embedding`` only.

  Args:
    hidden: [B, T, D], the final LayerNorm's output in the compute dtype.
    embedding: [V, D] (float32 master weights; cast to hidden's dtype for the matmuls).
    targets: int [B, T].
    weights: float32 [B, T]: each position's share of the objective (mask / token count).
    z_loss: weight of logsumexp^2 (PaLM §5); 0 for none.
    logit_scale: multiplies the logits (MPTConfig.logit_multiplier); None for none.
    chunk_positions: positions per row whose float32 logits exist at once.

  Returns:
    (objective, cross_entropy_sum): float32 scalars; the second is sum(weights *
    cross-entropy) without the z-loss, for logging (not differentiated).
  """
  objective, cross_entropy_sum = _head_cross_entropy(
    hidden,
    embedding,
    targets,
    weights,
    float(z_loss),
    1.0 if logit_scale is None else float(logit_scale),
    _chunk_count(hidden.shape[1], chunk_positions),
  )
  return objective, jax.lax.stop_gradient(cross_entropy_sum)


def _chunk_count(positions: int, chunk_positions: int) -> int:
  """The fewest chunks of at most ``chunk_positions`` that split ``positions`` evenly."""
  return next(n for n in range(1, positions + 1) if positions % n == 0 and positions // n <= chunk_positions)


def _chunked(x, chunks: int):
  """[B, T, ...] -> [chunks, B, T / chunks, ...]: positions split, rows (and their sharding) kept."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, chunks, t // chunks, *x.shape[2:]), 1, 0)


def _unchunked(x):
  """The inverse of _chunked."""
  chunks, b, tc = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, chunks * tc, *x.shape[3:])


def _chunk_logits(hidden, weight, scale):
  """[B, C, D] x [V, D] -> float32 logits [B, C, V] (bf16 operands, float32 accumulation)."""
  return scale * jnp.einsum("BTD,VD->BTV", hidden, weight, preferred_element_type=jnp.float32)


def _logit_grads(logits, lse, targets, weights, z_loss, scale, dtype):
  """d objective / d logits in ``dtype``: the objective is w * (lse - logit[target] + z * lse^2), whose
  derivative is w * ((1 + 2 z lse) * softmax - onehot), times the logit scale."""
  softmax = jnp.exp(logits - lse[..., None])
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  d_logits = weights[..., None] * ((1.0 + 2.0 * z_loss * lse)[..., None] * softmax - onehot)
  return (scale * d_logits).astype(dtype)


def _objective(ce, lse, weights, z_loss):
  return jnp.sum(weights * (ce + z_loss * jnp.square(lse))), jnp.sum(weights * ce)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_cross_entropy(hidden, embedding, targets, weights, z_loss, scale, chunks):
  weight = embedding.astype(hidden.dtype)
  ce, lse = jax.lax.map(
    lambda args: cross_entropy(_chunk_logits(args[0], weight, scale), args[1]),
    (_chunked(hidden, chunks), _chunked(targets, chunks)),
  )
  return _objective(_unchunked(ce), _unchunked(lse), weights, z_loss)


def _head_cross_entropy_fwd(hidden, embedding, targets, weights, z_loss, scale, chunks):
  """The loss, and already its gradients: each chunk's logits become bf16 d_logits, then its share
  of d_hidden and d_embedding (accumulated in float32), so no [B, T, V] array is ever stored."""
  weight = embedding.astype(hidden.dtype)

  def chunk(d_embedding, args):
    h, t, w = args
    logits = _chunk_logits(h, weight, scale)
    ce, lse = cross_entropy(logits, t)
    d_logits = _logit_grads(logits, lse, t, w, z_loss, scale, hidden.dtype)
    d_h = jnp.einsum("BTV,VD->BTD", d_logits, weight).astype(hidden.dtype)
    d_embedding = d_embedding + jnp.einsum("BTV,BTD->VD", d_logits, h, preferred_element_type=jnp.float32)
    return d_embedding, (ce, lse, d_h)

  zeros = jnp.zeros(embedding.shape, jnp.float32)
  d_embedding, (ce, lse, d_hidden) = jax.lax.scan(
    chunk, zeros, (_chunked(hidden, chunks), _chunked(targets, chunks), _chunked(weights, chunks))
  )
  objective = _objective(_unchunked(ce), _unchunked(lse), weights, z_loss)
  return objective, (_unchunked(d_hidden), d_embedding.astype(embedding.dtype))


def _head_cross_entropy_bwd(z_loss, scale, chunks, residuals, cotangents):
  """Scales the gradients computed in the forward pass by the objective's cotangent.

  The cross-entropy sum leaves head_cross_entropy through stop_gradient, so its cotangent
  is zero; targets and weights get none.
  """
  del z_loss, scale, chunks
  d_hidden, d_embedding = residuals
  d_objective, _ = cotangents
  return (d_objective * d_hidden).astype(d_hidden.dtype), d_objective * d_embedding, None, None


_head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd)
