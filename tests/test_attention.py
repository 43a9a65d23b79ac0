"""Attention implementations against reference.attention (float32, Precision.HIGHEST).

The Pallas kernels run with small blocks, so every case spans several query and key blocks
of different sizes and, at T=37, a ragged last block: compiled on a GPU
(``JAX_PLATFORMS=cuda pytest tests/test_attention.py``), in the Pallas interpreter elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax.alibi import alibi_slopes
from mpt_jax.attention import (
  dot_product_attention,
  pallas_mosaic_gpu,
  pallas_tiles,
  pallas_tpu,
  pallas_triton,
  reference,
)

INTERPRET = jax.default_backend() != "gpu"
# Forward and backward blocks all differ, so a swapped block size shows as a wrong answer.
SMALL_BLOCKS = pallas_triton.BlockSizes(
  block_q=16,
  block_k=32,
  num_warps=4,
  block_q_dkv=32,
  block_k_dkv=16,
  num_warps_dkv=4,
  block_q_dq=16,
  block_k_dq=32,
  num_warps_dq=4,
)

# Relative L2 error bounds by input dtype: (output, gradients).
TOLERANCES = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 2e-2)}

# Implementations checked against the reference ("xla" is the reference itself).
IMPLS = {
  "pallas": lambda q, k, v, **kw: pallas_triton.flash_attention(
    q, k, v, block_sizes=SMALL_BLOCKS, interpret=INTERPRET, **kw
  ),
}

# (seq_len, head_dim, dtype, causal, segments, scale); segments: None, "packed" (sorted ids
# with random document boundaries) or "shuffled" (random unsorted ids).
CASES = [
  (64, 64, jnp.float32, True, None, None),
  (37, 128, jnp.float32, True, "packed", None),
  (37, 64, jnp.bfloat16, True, "packed", None),
  (64, 64, jnp.float32, True, "shuffled", None),
  (37, 64, jnp.float32, False, "packed", None),
  (64, 128, jnp.bfloat16, False, None, 0.3),
]


def _case_id(case):
  seq_len, head_dim, dtype, causal, segments, scale = case
  return (
    f"{seq_len=}-{head_dim=}-{jnp.dtype(dtype).name}-{'causal' if causal else 'bidirectional'}-{segments=}-{scale=}"
  )


def _inputs(seed, batch, seq_len, heads, head_dim, segments=None, *, dtype=jnp.float32, new_document_rate=0.1):
  """q, k, v, a cotangent (in ``dtype``) and segment ids (None; "packed": sorted, a new document
  starting at each token with ``new_document_rate``; or "shuffled": unsorted)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v, d_out = (jax.random.normal(key, (batch, seq_len, heads, head_dim), dtype) for key in keys[:4])
  if segments == "packed":
    segments = jnp.cumsum(jax.random.bernoulli(keys[4], new_document_rate, (batch, seq_len)), axis=1, dtype=jnp.int32)
  elif segments == "shuffled":
    segments = jax.random.randint(keys[4], (batch, seq_len), 0, 3)
  return q, k, v, d_out, segments


def _rel_err(actual, expected):
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, case):
  seq_len, head_dim, dtype, causal, segments, scale = case
  heads = 3
  q, k, v, d_out, segment_ids = _inputs(seq_len + head_dim, 2, seq_len, heads, head_dim, segments)
  q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
  kwargs = dict(slopes=alibi_slopes(heads), segment_ids=segment_ids, causal=causal, scale=scale)

  def ref(q, k, v):
    return reference.attention(q, k, v, precision=jax.lax.Precision.HIGHEST, **kwargs)

  # Full float32 matmuls for every implementation (XLA on GPU would otherwise use TF32).
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(lambda q, k, v: IMPLS[impl](q, k, v, **kwargs), q, k, v)
    grads = vjp(d_out)
  ref_out, ref_vjp = jax.vjp(ref, *(x.astype(jnp.float32) for x in (q, k, v)))
  assert out.dtype == dtype
  out_tol, grad_tol = TOLERANCES[dtype]
  assert _rel_err(out, ref_out) < out_tol
  ref_grads = ref_vjp(d_out.astype(jnp.float32))
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.dtype == dtype, name
    assert _rel_err(grad, ref_grad) < grad_tol, name


def test_causal_never_loads_keys_past_the_diagonal():
  """NaN keys and values past the first 32 positions reach no earlier query (blocks of 16/32).

  A kernel that only masked those blocks would still multiply the NaN values by zero.
  """
  seen, heads = 32, 2
  q, k, v, d_out, _ = _inputs(7, 2, 64, heads, 64)
  k, v = (x.at[:, seen:].set(jnp.nan) for x in (k, v))
  kwargs = dict(slopes=alibi_slopes(heads), causal=True)
  out, vjp = jax.vjp(lambda q: IMPLS["pallas"](q, k, v, **kwargs), q)
  (dq,) = vjp(d_out)
  prefix = (q[:, :seen], k[:, :seen], v[:, :seen])
  ref_out, ref_vjp = jax.vjp(
    lambda q: reference.attention(q, *prefix[1:], precision=jax.lax.Precision.HIGHEST, **kwargs), prefix[0]
  )
  (ref_dq,) = ref_vjp(d_out[:, :seen])
  assert _rel_err(out[:, :seen], ref_out) < TOLERANCES[jnp.float32][0]
  assert _rel_err(dq[:, :seen], ref_dq) < TOLERANCES[jnp.float32][1]


@pytest.mark.parametrize("poisoned", [0, 1])
def test_packed_documents_never_load_each_other(poisoned):
  """Two 32-token documents per row; NaN in one leaves the other's output and gradients exact.

  Document 0 poisoned tests the skipping of key blocks (forward, dQ), document 1 that of
  query blocks (dK/dV): blocks of one document only are outside the loop bounds.
  """
  doc, heads = 32, 2
  q, k, v, d_out, _ = _inputs(13, 2, 2 * doc, heads, 64)
  segment_ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32), doc)[None].repeat(2, axis=0)
  bad, good = slice(poisoned * doc, (poisoned + 1) * doc), slice((1 - poisoned) * doc, (2 - poisoned) * doc)
  q, k, v = (x.at[:, bad].set(jnp.nan) for x in (q, k, v))
  out, vjp = jax.vjp(
    lambda q, k, v: IMPLS["pallas"](q, k, v, slopes=alibi_slopes(heads), segment_ids=segment_ids), q, k, v
  )
  ref = functools.partial(reference.attention, slopes=alibi_slopes(heads), precision=jax.lax.Precision.HIGHEST)
  ref_out, ref_vjp = jax.vjp(ref, q[:, good], k[:, good], v[:, good])
  assert _rel_err(out[:, good], ref_out) < TOLERANCES[jnp.float32][0]
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), vjp(d_out), ref_vjp(d_out[:, good])):
    assert _rel_err(grad[:, good], ref_grad) < TOLERANCES[jnp.float32][1], name


@pytest.mark.parametrize("ids", ["packed", "documents out of order"])
@pytest.mark.parametrize(("block_q", "block_k"), [(16, 16), (16, 32), (32, 16)])
def test_segment_block_ranges_cover_every_meeting_tile_once_from_either_side(ids, block_q, block_k):
  """The key ranges of query blocks and the query ranges of key blocks are one set of tiles:
  it holds every tile whose blocks share a segment, is exactly those for sorted ids, and has
  rising bounds (a kernel that stores a tile per visit and one that reads them meet exactly)."""
  *_, segment_ids = _inputs(5, 3, 96, 1, 8, "packed", new_document_rate=0.05)
  if ids != "packed":  # the same documents, numbered in a shuffled order
    segment_ids = jnp.asarray(np.random.default_rng(0).permutation(96))[segment_ids]
  (k_lo, k_hi), (q_lo, q_hi) = map(
    np.asarray, pallas_tiles.segment_block_ranges(segment_ids, block_q=block_q, block_k=block_k)
  )
  blocks = np.asarray(segment_ids).reshape(3, -1, 1, block_q), np.asarray(segment_ids).reshape(3, 1, -1, block_k)
  q_block, k_block = np.arange(k_lo.shape[1])[None, :, None], np.arange(q_lo.shape[1])[None, None, :]
  meets = (blocks[0].min(-1) <= blocks[1].max(-1)) & (blocks[1].min(-1) <= blocks[0].max(-1))  # [B, nq, nk]
  from_queries = (k_lo[:, :, None] <= k_block) & (k_block < k_hi[:, :, None])
  from_keys = (q_lo[:, None, :] <= q_block) & (q_block < q_hi[:, None, :])
  np.testing.assert_array_equal(from_queries, from_keys)
  assert (from_queries | ~meets).all()
  if ids == "packed":
    np.testing.assert_array_equal(from_queries, meets)
  assert all((np.diff(bound, axis=1) >= 0).all() for bound in (k_lo, k_hi, q_lo, q_hi))


def test_sharded_matches_unsharded():
  """impl='pallas' under a (data, fsdp, tensor) mesh runs per shard and equals one device."""
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py makes 8 CPU devices), got {jax.device_count()}")
  batch, heads = 4, 4
  q, k, v, d_out, segment_ids = _inputs(11, batch, 32, heads, 64, "packed")
  slopes = alibi_slopes(heads)

  def loss_grads(attend):
    def run(q, k, v, segment_ids, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, slopes=slopes, segment_ids=segment_ids), q, k, v)
      return out, vjp(d_out)

    return jax.jit(run)(q, k, v, segment_ids, d_out)

  expected = loss_grads(lambda *a, **kw: pallas_triton.flash_attention(*a, interpret=INTERPRET, **kw))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    actual = loss_grads(lambda *a, **kw: dot_product_attention(*a, impl="pallas", **kw))
  split = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
  assert actual[0].sharding.is_equivalent_to(split, 4), actual[0].sharding
  # Per-shard shapes sum in float32 in another order: gradients differ in their last bits
  # (~2e-7 relative L2, ~1e-6 at most where they are ~3), so the tolerance follows each
  # array's scale; a shard given the wrong rows, heads or segments would be off by O(1).
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    e = np.asarray(e)
    np.testing.assert_allclose(np.asarray(a), e, rtol=1e-6, atol=1e-5 * np.abs(e).max())


# Each flash kernel with a head_dim its tiles do not take.
KERNELS = {
  "pallas_triton": (pallas_triton.flash_attention, 48),
  "pallas_mosaic_gpu": (pallas_mosaic_gpu.flash_attention, 96),
  "pallas_tpu": (pallas_tpu.flash_attention, 384),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
  "change, name",
  [
    (lambda h: dict(k=np.zeros((2, 16, 3, 64), np.float32)), "k.shape"),
    (lambda h: dict(slopes=np.ones(4, np.float32)), "slopes"),
    (lambda h: dict(segment_ids=np.zeros((2, 8), np.int32)), "segment_ids"),
    (lambda h: dict(segment_ids=np.zeros((2, 32), np.float32)), "segment_ids"),
    (lambda h: {name: np.zeros((2, 32, 3, h)) for name in "qkv"}, "head_dim"),
    (lambda h: dict(v=np.zeros((2, 32, 3, 64), jnp.bfloat16)), "v.dtype"),
    (lambda h: dict(scale=-1.0), "scale"),
    (lambda h: dict(block_sizes=(64, 64)), "block_sizes"),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)
def test_kernels_reject_bad_input_naming_it(kernel, change, name):
  """One check (attention/inputs.py) guards every kernel's public function."""
  flash_attention, bad_head_dim = KERNELS[kernel]
  args = dict(
    q=np.zeros((2, 32, 3, 64), np.float32),
    k=np.zeros((2, 32, 3, 64), np.float32),
    v=np.zeros((2, 32, 3, 64), np.float32),
    slopes=alibi_slopes(3),
    interpret=True,
  ) | change(bad_head_dim)
  with pytest.raises(ValueError, match=name):
    flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("field, value", [("block_q", 24), ("block_k_dq", 8), ("num_warps", 3), ("num_stages", 0)])
def test_block_sizes_validate(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_triton.BlockSizes(**{field: value})


def test_unknown_impl_is_named():
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="'flash'"):
    dot_product_attention(q, q, q, slopes=alibi_slopes(2), impl="flash")
