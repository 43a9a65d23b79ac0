"""One attention function, several implementations behind it.

``dot_product_attention`` is what the model calls; ``impl`` picks the implementation:
  xla    plain XLA (reference.py), the ground truth; runs anywhere.
  cudnn  jax.nn.dot_product_attention with ALiBi materialized as a [N, T, S] bias: a GPU
         baseline, not a fast path (it reads the bias and computes its gradient).
  pallas the best Pallas flash attention (in-kernel ALiBi, T == S only) for this GPU:
         pallas_mosaic_gpu on Hopper for the inputs it takes, pallas_triton otherwise.
  pallas_mosaic_gpu  Hopper kernels (pallas_mosaic_gpu.py: TMA, wgmma, warp-specialised);
         bf16/f16, head_dim 64 or 128; they run only on an H100/H200.
  pallas_triton  the Triton-backend kernels (pallas_triton.py): A100 and H100, any float
         dtype, power-of-two head_dim; without a GPU they run in the Pallas interpreter (tests).
  pallas_tpu  the same flash attention for TPUs (pallas_tpu.py, Mosaic), T == S only; without a
         TPU the kernels run in the Pallas TPU interpreter (tests).
  auto   pallas on GPU, pallas_tpu on TPU, for the shapes they support (T == S; on GPU a
         power-of-two head_dim), xla otherwise.
Cached decoding (``q_offset`` given: a few new queries per row against a KV cache) does not
use the flash kernels: one query per row runs pallas_decode.py on a GPU (one kernel per
layer; impl "xla" or a mesh keeps XLA) and decode.py elsewhere, more queries reference.py. docs/attention.md describes the kernels' design.

The kernels know nothing of the training mesh: under a mesh, a caller says which mesh axes
split the batch and the heads (``MeshAxes``); the model passes mpt_jax.sharding's.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mpt_jax.attention import decode, masks, pallas_decode, pallas_mosaic_gpu, pallas_tpu, pallas_triton, reference

IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu")


class MeshAxes(NamedTuple):
  """Mesh axes that split activations, for kernels run per device under jax.shard_map."""

  batch: tuple[str, ...] = ("data", "fsdp")  # split the batch together (the conventional data-parallel names)
  heads: str | None = "tensor"  # splits the heads; None: heads stay whole


def dot_product_attention(
  q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, impl="auto", q_offset=None, axes: MeshAxes = MeshAxes()
):
  """ALiBi attention. q: [B, T, N, H]; k, v: [B, S, N, H]; slopes: [N]; segment_ids: [B, S].

  ``q_offset`` (a scalar or int [B], may be traced): cached decoding, the queries sit at
  positions q_offset .. q_offset + T - 1 of the S cached keys. ``axes``: how a mesh, if one
  is active, splits batch and heads (the Pallas kernels run per device).

  Returns [B, T, N, H] in q's dtype. See reference.attention for the exact semantics.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"expected q [B, T, N, H] and k, v [B, S, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
  if jnp.shape(slopes) != (q.shape[2],):
    raise ValueError(f"expected one ALiBi slope per head ({q.shape[2]}), got {jnp.shape(slopes)=}")
  if q_offset is not None:  # a few queries against a long cache
    if q.shape[1] == 1 and segment_ids is None and causal:
      single_query = pallas_decode.attention if _decode_kernel_applies(q, k, impl) else decode.attention
      return single_query(q, k, v, slopes=slopes, scale=scale, q_offset=q_offset)
    return reference.attention(
      q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale, q_offset=q_offset
    )
  if impl == "auto":
    impl = _auto_impl(q, k)
  if impl == "xla":
    return reference.attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, slopes=slopes, segment_ids=segment_ids, causal=causal, scale=scale)
  if impl == "pallas":
    impl = (
      "pallas_mosaic_gpu" if pallas_mosaic_gpu.on_hopper() and pallas_mosaic_gpu.supports(q, k) else "pallas_triton"
    )
  if impl in _KERNELS:
    flash, platform = _KERNELS[impl]
    return _pallas_attention(
      q,
      k,
      v,
      slopes=slopes,
      segment_ids=segment_ids,
      causal=causal,
      scale=scale,
      axes=axes,
      flash=flash,
      platform=platform,
    )
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def cached_attention(qkv, cache, *, slopes, position, scale=None, impl="auto"):
  """Writes the keys and values of qkv into ``cache`` at ``position``, then attends its queries
  there over the whole cache, causally; returns (out [B, T, N, H], cache).

  qkv [B, T, 3, N, H]: queries, keys and values (after QK-LN); cache: k, v [B, S, N, H];
  position: a scalar or int [B]. One query per row on a GPU (outside a mesh, ``impl`` not
  "xla") is one Pallas kernel for both (pallas_decode.write_and_attend), reading q, k and v
  where they lie in qkv; otherwise decode.write_cache, then ``dot_product_attention`` with
  ``q_offset=position``.
  """
  k_cache, v_cache = cache
  if qkv.shape[1] == 1 and _decode_kernel_applies(qkv[:, :, 0], k_cache, impl):
    out, k_cache, v_cache = pallas_decode.write_and_attend(
      qkv, k_cache, v_cache, slopes=slopes, q_offset=position, scale=scale
    )
    return out, (k_cache, v_cache)
  q, k, v = (qkv[:, :, part] for part in range(3))
  cache = tuple(decode.write_cache(old, new, position) for old, new in zip(cache, (k, v)))
  return dot_product_attention(q, *cache, slopes=slopes, scale=scale, impl=impl, q_offset=position), cache


# Pallas kernels by impl name: (flash_attention, the platform they compile for).
_KERNELS = {
  "pallas_mosaic_gpu": (pallas_mosaic_gpu.flash_attention, "gpu"),
  "pallas_triton": (pallas_triton.flash_attention, "gpu"),
  "pallas_tpu": (pallas_tpu.flash_attention, "tpu"),
}


def _decode_kernel_applies(q, k, impl: str) -> bool:
  """Whether one-query cached attention runs the Pallas decode kernel: on a GPU, outside a mesh."""
  return (
    impl != "xla"
    and jax.default_backend() == "gpu"
    and jax.sharding.get_abstract_mesh().empty
    and pallas_decode.supports(q, k)
  )


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


def _pallas_attention(q, k, v, *, slopes, segment_ids, causal, scale, axes: MeshAxes, flash, platform):
  """The Pallas kernels (``flash``, compiled for ``platform``, interpreted elsewhere); under a
  mesh, inside shard_map over batch and heads.

  A pallas_call is opaque to the SPMD partitioner, so each device runs the kernels on its
  own rows and heads, split as ``axes`` says activations are split: the batch over
  ``axes.batch`` together, heads over ``axes.heads``; axes that are absent or do not divide
  their dimension leave that dimension whole.
  """
  attend = functools.partial(flash, causal=causal, scale=scale, interpret=jax.default_backend() != platform)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attend(q, k, v, slopes=slopes, segment_ids=segment_ids)
  batch, _, heads, _ = q.shape
  batch_axes = axes_dividing(mesh, axes.batch, batch)
  head_axis = axes.heads
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

  # check_vma=False: the Pallas call does not track varying manual axes (needed on jax 0.10).
  return jax.shard_map(local, in_specs=tuple(specs), out_specs=qkv_spec, check_vma=False)(*args)


def axes_dividing(mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
  """Those of ``axes`` in ``mesh`` when together they split ``size`` evenly, else () (the dimension stays whole).

  For code that runs per device under jax.shard_map (Pallas kernels), which must cut
  activations the way the partitioner does.
  """
  present = tuple(axis for axis in axes if axis in mesh.axis_names)
  return present if size % math.prod(mesh.shape[axis] for axis in present) == 0 else ()
