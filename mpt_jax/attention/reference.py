"""Plain-XLA attention with ALiBi: the ground truth every other implementation is tested against.

Follows the original model (docs/model.md, "What differs from a textbook GPT"): scores = (q·k) * scale + ALiBi, causal and segment masks,
softmax in float32, probabilities cast to v's dtype before the second matmul.
"""

import jax
import jax.numpy as jnp

from mpt_jax.attention import masks


def attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, precision=None, q_offset=None):
  """Multi-head attention with in-graph ALiBi.

  Args:
    q: [B, T, N, H] queries at positions q_offset .. q_offset + T - 1 of the S keys; by
      default the last T (T <= S), as MosaicGPT slices its bias ``[-T:, -S:]``.
    k, v: [B, S, N, H].
    slopes: [N] ALiBi slopes (float32).
    segment_ids: optional int [B, S]; tokens attend only within their own segment
      (packed documents). Query segments are the entries at the query positions.
    causal: mask keys after the query.
    scale: softmax scale; defaults to 1/sqrt(H).
    precision: matmul precision (tests pass HIGHEST for an exact float32 reference).
    q_offset: position of the first query (may be traced), a scalar or int [B] (one per row:
      a batch of prompts of different lengths); None: S - T. Cached decoding passes the write
      position, so keys past the queries (unwritten cache) are masked.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  t, s, head_dim = q.shape[1], k.shape[1], q.shape[-1]
  scale = head_dim**-0.5 if scale is None else scale
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=precision, preferred_element_type=jnp.float32)
  scores = scores * scale
  q_offset = s - t if q_offset is None else q_offset
  if segment_ids is not None and jnp.ndim(q_offset):
    raise ValueError(f"per-row q_offset {jnp.shape(q_offset)} is not supported with segment_ids")
  q_pos = jnp.reshape(q_offset, (-1, 1, 1, 1)) + jnp.arange(t)[:, None]  # [B or 1, 1, T, 1]
  k_pos = jnp.arange(s)  # [S]
  slopes = jnp.asarray(slopes, jnp.float32)[None, :, None, None]  # [1, N, 1, 1]
  scores = scores + masks.alibi_bias(slopes, q_pos, k_pos, causal=causal)
  if segment_ids is None:
    keep = masks.keep_mask(q_pos, k_pos, causal=causal)  # [B or 1, 1, T, S]
  else:
    q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, t, axis=1)[:, None, :, None]  # [B, 1, T, 1]
    k_seg = segment_ids[:, None, None, :]  # [B, 1, 1, S]
    keep = masks.keep_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)
  scores = jnp.where(keep, scores, masks.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BNTS,BSNH->BTNH", probs, v, precision=precision, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
