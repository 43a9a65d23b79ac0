"""One attention function, several implementations behind it.

``dot_product_attention`` is what the model calls; ``impl`` picks the implementation:
  xla    plain XLA (reference.py), the ground truth; runs anywhere.
  cudnn  jax.nn.dot_product_attention with ALiBi materialized as a [N, T, S] bias: a GPU
         baseline, not a fast path (it reads the bias and computes its gradient).
  auto   the fastest correct implementation for the current backend.
"""

import jax
import jax.numpy as jnp

from mpt_jax.attention import masks, reference

IMPLS = ("auto", "xla", "cudnn")


def dot_product_attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, impl="auto"):
  """ALiBi attention. q: [B, T, N, H]; k, v: [B, S, N, H]; slopes: [N]; segment_ids: [B, S].

  Returns [B, T, N, H] in q's dtype. See reference.attention for the exact semantics.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"expected q [B, T, N, H] and k, v [B, S, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
  if jnp.shape(slopes) != (q.shape[2],):
    raise ValueError(f"expected one ALiBi slope per head ({q.shape[2]}), got {jnp.shape(slopes)=}")
  if impl == "auto":
    impl = "xla"
  if impl == "xla":
    return reference.attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def _cudnn_attention(q, k, v, *, slopes, segment_ids, causal, scale):
  """cuDNN flash attention with ALiBi as a materialized bias (and segments as a mask)."""
  if jax.default_backend() != "gpu":
    raise ValueError(f"impl='cudnn' needs a GPU; the default backend is {jax.default_backend()!r}")
  t, s = q.shape[1], k.shape[1]
  q_pos = jnp.arange(s - t, s)[:, None]
  k_pos = jnp.arange(s)[None, :]
  slopes = jnp.asarray(slopes, jnp.float32)[:, None, None]  # [N, 1, 1]
  bias = masks.alibi_bias(slopes, q_pos, k_pos, causal=causal)[None].astype(q.dtype)  # [1, N, T, S]
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, s - t :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
  )
