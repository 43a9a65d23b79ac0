"""What every flash-attention kernel shares: the check of its public arguments and its custom VJP.

The kernels (pallas_triton.py for GPUs, pallas_tpu.py for TPUs) differ in tiling and memory
layout, not in what they accept or in how their forward and backward passes connect.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")


def check_inputs(
  q,
  k,
  v,
  slopes,
  segment_ids,
  scale,
  block_sizes,
  *,
  block_sizes_type: type,
  head_dim_ok: Callable[[int], bool],
  head_dim_rule: str,
) -> None:
  """Raises ValueError naming the first argument a kernel cannot take.

  Args:
    q, k, v, slopes, segment_ids, scale, block_sizes: the kernel's arguments (see its
      ``flash_attention``): self-attention, [B, T, N, H] each, one dtype of DTYPES.
    block_sizes_type: the kernel's BlockSizes class.
    head_dim_ok, head_dim_rule: which head dims the kernel's tiles take, and the rule in words.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got {q.shape=}")
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"k and v must be shaped like q (T == S), got {q.shape=} {k.shape=} {v.shape=}")
  if q.dtype.name not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share one dtype of {DTYPES}, got {q.dtype=} {k.dtype=} {v.dtype=}")
  batch, seq_len, heads, head_dim = q.shape
  if not head_dim_ok(head_dim):
    raise ValueError(f"head_dim must be {head_dim_rule}, got {head_dim=}")
  if jnp.shape(slopes) != (heads,):
    raise ValueError(f"slopes must be [N] = [{heads}], got {jnp.shape(slopes)=}")
  if segment_ids is not None and (
    segment_ids.shape != (batch, seq_len) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(
      f"segment_ids must be int [B, T] = [{batch}, {seq_len}], got {segment_ids.shape=} {segment_ids.dtype=}"
    )
  if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale must be a positive Python number or None, got {scale=}")
  if block_sizes is not None and not isinstance(block_sizes, block_sizes_type):
    raise ValueError(f"block_sizes must be a {block_sizes_type.__name__} or None, got {block_sizes=}")


def attention_with_vjp(forward: Callable, backward: Callable) -> Callable:
  """A kernel's forward and backward passes as one differentiable ``f(q, k, v, slopes, segment_ids, statics)``.

  ``forward(q, k, v, slopes, segment_ids, statics) -> (out, logsumexp)``;
  ``backward(q, k, v, slopes, segment_ids, out, logsumexp, d_out, **statics' fields) -> (dq, dk, dv)``.
  The residuals are the inputs, the output and the logsumexp, from which the backward
  recomputes the probabilities (FlashAttention-2 §3.1.2). ALiBi slopes are constants of the
  model and segment ids are integers: they get no cotangents. ``statics`` (a frozen
  dataclass) holds everything static about a call; the backward takes its fields as keyword
  arguments, so adding a field cannot shift arguments.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
  def attention(q, k, v, slopes, segment_ids, statics):
    return forward(q, k, v, slopes, segment_ids, statics)[0]

  def attention_fwd(q, k, v, slopes, segment_ids, statics):
    out, lse = forward(q, k, v, slopes, segment_ids, statics)
    return out, (q, k, v, slopes, segment_ids, out, lse)

  def attention_bwd(statics, residuals, d_out):
    fields = {field.name: getattr(statics, field.name) for field in dataclasses.fields(statics)}
    return (*backward(*residuals, d_out, **fields), None, None)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
