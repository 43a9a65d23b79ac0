"""One new query per row against a KV cache: attention as multiply-and-reduce in the cache's layout.

A decode step reads the whole cache once per layer. Written as a dot_general (reference.py),
the [B, S, N, H] cache enters a matrix-vector product batched over (B, N), which XLA lowers by
first transposing the cache to [B, N, S, H]: on CPU (the compiled HLO shows it) a copy of every
layer's keys and values at every step, which would outweigh the weights at large batch. As an
elementwise product reduced over H (scores) and then over S (output), each cache array is read
once where it lies. Same math as reference.attention with T = 1: scale, ALiBi, causal mask,
float32 softmax, probabilities cast to v's dtype.
"""

import jax
import jax.numpy as jnp

from mpt_jax.attention import masks


def attention(q, k, v, *, slopes, q_offset, scale=None):
  """Causal ALiBi attention of q at position q_offset over the cache positions <= q_offset.

  Args:
    q: [B, 1, N, H], the query of each row.
    k, v: [B, S, N, H], the cache (positions past q_offset are masked: unwritten or stale).
    slopes: [N] ALiBi slopes (float32).
    q_offset: the query's position, a scalar or int [B] (one per row); may be traced.
    scale: softmax scale; defaults to 1/sqrt(H).

  Returns:
    [B, 1, N, H] in q's dtype.
  """
  check_shapes(q, k, v)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1) * scale  # [B, S, N]
  q_pos = jnp.reshape(q_offset, (-1, 1, 1))  # [B or 1, 1, 1]
  k_pos = jnp.arange(k.shape[1])[:, None]  # [S, 1]
  scores = scores + masks.alibi_bias(jnp.asarray(slopes, jnp.float32), q_pos, k_pos, causal=True)
  scores = jnp.where(masks.keep_mask(q_pos, k_pos, causal=True), scores, masks.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=1).astype(v.dtype)  # over S
  out = jnp.sum(probs[..., None].astype(jnp.float32) * v.astype(jnp.float32), axis=1)  # [B, N, H]
  return out[:, None].astype(q.dtype)


def write_cache(cache, new, position):
  """cache [B, S, N, H] with new [B, T, N, H] written at ``position``: one offset, or one per row."""
  new = new.astype(cache.dtype)
  if jnp.ndim(position) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, position, axis=1)
  write_row = lambda row, new_row, at: jax.lax.dynamic_update_slice_in_dim(row, new_row, at, axis=0)
  return jax.vmap(write_row)(cache, new, position)


def check_shapes(q, k, v) -> None:
  """Raises ValueError unless q is [B, 1, N, H] and k, v are [B, S, N, H]."""
  if q.ndim != 4 or q.shape[1] != 1 or k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"expected q [B, 1, N, H] and k, v [B, S, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
