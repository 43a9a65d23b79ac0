"""One attention function, several implementations behind it.

``dot_product_attention`` is what the model calls; ``impl`` picks the implementation:
  xla    plain XLA (reference.py), the ground truth; runs anywhere.
  cudnn  jax.nn.dot_product_attention with ALiBi materialized as a [N, T, S] bias: a GPU
         baseline, not a fast path (it reads the bias and computes its gradient).
  pallas flash attention with in-kernel ALiBi (pallas_triton.py), T == S only; without a GPU
         the same kernels run in the Pallas interpreter (tests).
  pallas_tpu  the same flash attention for TPUs (pallas_tpu.py, Mosaic), T == S only; without a
         TPU the kernels run in the Pallas TPU interpreter (tests).
  auto   pallas on GPU, pallas_tpu on TPU, for the shapes they support (T == S; on GPU a
         power-of-two head_dim), xla otherwise.
Cached decoding (one new query per row against a KV cache) calls decode.attention directly.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mpt_jax import sharding
from mpt_jax.attention import masks, pallas_tpu, pallas_triton, reference

IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_tpu")


def dot_product_attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, impl="auto"):
  """ALiBi attention. q: [B, T, N, H]; k, v: [B, S, N, H]; slopes: [N]; segment_ids: [B, S].

  Returns [B, T, N, H] in q's dtype. See reference.attention for the exact semantics.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"expected q [B, T, N, H] and k, v [B, S, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
  if jnp.shape(slopes) != (q.shape[2],):
    raise ValueError(f"expected one ALiBi slope per head ({q.shape[2]}), got {jnp.shape(slopes)=}")
  if impl == "auto":
    impl = _auto_impl(q, k)
  if impl == "xla":
    return reference.attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "pallas":
    return _pallas_attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "pallas_tpu":
    return _pallas_attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale,
                             flash=pallas_tpu.flash_attention, platform="tpu")
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def _auto_impl(q, k):
  backend = jax.default_backend()
  if backend == "gpu" and pallas_triton.supports(q, k):
    return "pallas"
  if backend == "tpu" and pallas_tpu.supports(q, k):
    return "pallas_tpu"
  return "xla"


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


def _pallas_attention(q, k, v, *, slopes, segment_ids, causal, scale, flash=pallas_triton.flash_attention,
                      platform="gpu"):
  """The Pallas kernels (``flash``, compiled for ``platform``, interpreted elsewhere); under a
  mesh, inside shard_map over batch and heads.

  A pallas_call is opaque to the SPMD partitioner, so each device runs the kernels on its
  own rows and heads, split as mpt_jax.sharding splits activations: batch over the
  data-parallel axes, heads over the tensor axis; a mesh axis that is absent or does not
  divide its dimension leaves that dimension whole.
  """
  attend = functools.partial(
      flash, causal=causal, scale=scale, interpret=jax.default_backend() != platform
  )
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attend(q, k, v, slopes=slopes, segment_ids=segment_ids)
  batch, _, heads, _ = q.shape
  batch_axes = sharding.batch_axes_dividing(mesh, batch)
  head_axis = sharding.LOGICAL_RULES["heads"]
  if head_axis not in mesh.axis_names or heads % mesh.shape[head_axis]:
    head_axis = None
  rows = batch_axes or None
  qkv_spec = PartitionSpec(rows, None, head_axis, None)
  args, specs = [q, k, v, slopes], [qkv_spec, qkv_spec, qkv_spec, PartitionSpec(head_axis)]
  if segment_ids is not None:
    args.append(segment_ids)
    specs.append(PartitionSpec(rows, None))

  def local(q, k, v, slopes, segment_ids=None):
    return attend(q, k, v, slopes=slopes, segment_ids=segment_ids)

  # check_vma=False: the Pallas call does not track varying manual axes (DESIGN.md, jax 0.10).
  return jax.shard_map(local, in_specs=tuple(specs), out_specs=qkv_spec, check_vma=False)(*args)
