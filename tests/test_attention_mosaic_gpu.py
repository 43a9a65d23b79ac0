"""The Hopper attention kernels (attention/pallas_mosaic_gpu.py) against the float32 reference.

On an H100/H200 (``pytest tests/test_attention_mosaic_gpu.py`` there) the kernels run; elsewhere
those tests skip, because jax's Mosaic GPU interpreter cannot run them (the reason is in
``pallas_mosaic_gpu.flash_attention``'s docstring). What a CPU can check, it does: every
configuration's forward and backward traces, every warpgroup's loop plan includes the step
the forward's query prefetch waits on, ``impl="pallas"`` picks these kernels on Hopper, and
they refuse what they cannot take.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from mpt_jax import attention
from mpt_jax.alibi import alibi_slopes
from mpt_jax.attention import dot_product_attention, pallas_mosaic_gpu, pallas_tiles, reference
from mpt_jax.attention import pallas_mosaic_gpu_tiles as tiles
from mpt_jax.attention import pallas_mosaic_gpu_vjp as vjp
from tests import test_attention
from tests.test_attention import _rel_err

ON_HOPPER = pallas_mosaic_gpu.on_hopper()
hopper_only = pytest.mark.skipif(
  not ON_HOPPER, reason="needs an H100/H200: jax's Mosaic GPU interpreter cannot run these kernels"
)
# Relative L2 error bounds for bf16 inputs (tests/test_attention.py): output, gradients.
OUT_TOL, GRAD_TOL = 1e-2, 2e-2

# (seq_len, head_dim, causal, segments, scale): lengths that fill whole programs and ragged
# ones (padded inside), head dims 64 and 128, packed documents, bidirectional, a given scale.
# 4096 makes more query blocks (32 x 3 heads x 2 rows) than an H100/H200 has SMs (132), so
# the persistent forward's programs each loop over several, their ring continuing across.
CASES = [
  (384, 64, True, None, None),
  (4096, 64, True, "packed", None),
  (1000, 128, True, "packed", None),
  (512, 128, True, "shuffled", None),
  (300, 128, False, None, 0.3),
  (200, 64, False, "packed", None),
]


def _case_id(case):
  seq_len, head_dim, causal, segments, scale = case
  return f"{seq_len=}-{head_dim=}-{'causal' if causal else 'bidirectional'}-{segments=}-{scale=}"


# bf16 q, k, v, d_out and segment ids; packed documents of ~100 tokens.
_inputs = functools.partial(test_attention._inputs, dtype=jnp.bfloat16, new_document_rate=0.01)


def _out_and_grads(attend, q, k, v, d_out):
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(d_out)


def _reference(**kwargs):
  def attend(q, k, v):
    return reference.attention(q, k, v, precision=jax.lax.Precision.HIGHEST, **kwargs)

  return attend


# The two ways to dQ (pallas_mosaic_gpu_vjp.py): from the dS tiles the dK/dV kernel stores
# (the default), or recomputed where that workspace exceeds max_ds_bytes; and the forward
# over 64-key tiles (on jax 0.11 these once failed to lower without segments).
BLOCK_SIZES = {
  "stored dS": pallas_mosaic_gpu.BlockSizes(),
  "recomputed dS": pallas_mosaic_gpu.BlockSizes(max_ds_bytes=0),
  "64-key forward tiles": pallas_mosaic_gpu.BlockSizes(block_k=64),
}


@hopper_only
@pytest.mark.parametrize("blocks", BLOCK_SIZES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, blocks):
  seq_len, head_dim, causal, segments, scale = case
  heads = 3
  q, k, v, d_out, segment_ids = _inputs(seq_len + head_dim, 2, seq_len, heads, head_dim, segments)
  kwargs = dict(slopes=alibi_slopes(heads), segment_ids=segment_ids, causal=causal, scale=scale)
  kwargs["block_sizes"] = BLOCK_SIZES[blocks]
  out, grads = _out_and_grads(functools.partial(pallas_mosaic_gpu.flash_attention, **kwargs), q, k, v, d_out)
  del kwargs["block_sizes"]
  ref_out, ref_grads = _out_and_grads(_reference(**kwargs), *(x.astype(jnp.float32) for x in (q, k, v, d_out)))
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert _rel_err(out, ref_out) < OUT_TOL
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.dtype == jnp.bfloat16, name
    assert _rel_err(grad, ref_grad) < GRAD_TOL, name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [None, "packed", "shuffled"])
def test_every_consumer_visits_its_programs_first_key_step(causal, segments):
  """The forward's query prefetch runs at each warpgroup's first key step, ``lo``: a warpgroup
  that skipped it would never load its next block's queries and the kernel would hang
  waiting for them. It cannot skip it: each row sees at least its own key (ragged T padded,
  short documents starting anywhere in a block)."""
  blocks = pallas_mosaic_gpu.BlockSizes()
  seq_len = 1000
  *_, segment_ids = _inputs(1, 2, seq_len, 1, 64, segments, new_document_rate=0.05)  # ~20-token documents
  padded_len = pl.cdiv(seq_len, blocks.padded_multiple) * blocks.padded_multiple
  padded = pallas_mosaic_gpu._padded_segments(segment_ids, 2, seq_len, padded_len, causal=causal)
  program_rows = tiles.COMPUTE_WARPGROUPS * blocks.block_q
  ranges = None
  if padded is not None:
    ranges, _ = pallas_tiles.segment_block_ranges(padded, block_q=program_rows, block_k=blocks.block_k)
  plan = dict(block_q=blocks.block_q, block_k=blocks.block_k, causal=causal)
  for batch, query_block in itertools.product(range(2), range(padded_len // program_rows)):
    start, lo, hi = tiles.query_program(query_block, seq_len=padded_len, segment_ranges=ranges, batch=batch, **plan)
    for warpgroup in range(tiles.COMPUTE_WARPGROUPS):
      q_start = start + warpgroup * blocks.block_q
      split, stop = tiles.query_major_plan(q_start, lo=lo, hi=hi, segments=padded is not None, **plan)
      assert lo <= split <= stop <= hi and lo < stop, (batch, query_block, warpgroup, int(lo), int(split), int(stop))


@pytest.mark.parametrize("causal", [True, False])
def test_ds_layout_gives_each_tile_of_a_dq_program_its_own_place(causal):
  """The dK/dV kernel stores dS^T tile (query block i, key step j) at ``layout.tile``; the dQ
  kernel reads, per key step, the pair of its warpgroups' tiles from ``tile(first block, 0)``
  on. Every tile a dQ program can visit (up to its diagonal when causal) has its own place
  in the buffer, the pairs are consecutive, and the buffer holds nothing else."""
  batch, seq_len, heads, block = 2, 512, 3, 64
  layout = vjp.DsLayout(batch, seq_len, heads, block, causal)
  wgs = tiles.COMPUTE_WARPGROUPS
  places = []
  for b, h, program in itertools.product(range(batch), range(heads), range(layout.programs)):
    steps = wgs * (program + 1) if causal else layout.key_steps
    first = int(layout.tile(b, h, program * wgs, 0))
    for step, warpgroup in itertools.product(range(steps), range(wgs)):
      place = int(layout.tile(b, h, program * wgs + warpgroup, step))
      assert place == first + step * wgs + warpgroup
      places.append(place)
  assert sorted(places) == list(range(layout.shape[0]))
  assert layout.nbytes == 2 * len(places) * block * block


def test_ds_layout_only_within_max_ds_bytes_and_for_equal_blocks():
  shape = (8, 2048, 16, 128)
  needed = vjp.DsLayout(8, 2048, 16, 64, causal=True).nbytes
  assert needed == 8 * 16 * 16 * 17 * 2 * 64 * 64 * 2  # 16 programs: 2 * 16 * 17 / 2 pairs of tiles per (row, head)
  assert vjp.ds_layout(shape, pallas_mosaic_gpu.BlockSizes(max_ds_bytes=needed), causal=True) is not None
  assert vjp.ds_layout(shape, pallas_mosaic_gpu.BlockSizes(max_ds_bytes=needed - 1), causal=True) is None
  assert vjp.ds_layout(shape, pallas_mosaic_gpu.BlockSizes(block_k_dq=128), causal=True) is None


@hopper_only
def test_causal_never_loads_keys_past_the_diagonal():
  """NaN keys and values past the first 256 positions reach no earlier query.

  256 is a whole number of programs and tiles in every kernel: a kernel that loaded those
  tiles and masked them would still multiply the NaN values by zero.
  """
  seen, heads = 256, 2
  q, k, v, d_out, _ = _inputs(7, 2, 512, heads, 128)
  k, v = (x.at[:, seen:].set(jnp.nan) for x in (k, v))
  kwargs = dict(slopes=alibi_slopes(heads), causal=True)
  out, (dq, _, _) = _out_and_grads(functools.partial(pallas_mosaic_gpu.flash_attention, **kwargs), q, k, v, d_out)
  prefix = (x[:, :seen].astype(jnp.float32) for x in (q, k, v, d_out))
  ref_out, (ref_dq, _, _) = _out_and_grads(_reference(**kwargs), *prefix)
  assert _rel_err(out[:, :seen], ref_out) < OUT_TOL
  assert _rel_err(dq[:, :seen], ref_dq) < GRAD_TOL


@hopper_only
@pytest.mark.parametrize("poisoned", [0, 1])
def test_packed_documents_never_load_each_other(poisoned):
  """Two 256-token documents per row; NaN in one leaves the other's output and gradients right.

  Document 0 poisoned tests the skipping of key tiles (forward, dQ), document 1 that of
  query tiles (dK/dV).
  """
  doc, heads = 256, 2
  q, k, v, d_out, _ = _inputs(13, 2, 2 * doc, heads, 128)
  segment_ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32), doc)[None].repeat(2, axis=0)
  bad, good = slice(poisoned * doc, (poisoned + 1) * doc), slice((1 - poisoned) * doc, (2 - poisoned) * doc)
  q, k, v = (x.at[:, bad].set(jnp.nan) for x in (q, k, v))
  kwargs = dict(slopes=alibi_slopes(heads), segment_ids=segment_ids)
  out, grads = _out_and_grads(functools.partial(pallas_mosaic_gpu.flash_attention, **kwargs), q, k, v, d_out)
  good_inputs = (x[:, good].astype(jnp.float32) for x in (q, k, v, d_out))
  ref_out, ref_grads = _out_and_grads(_reference(slopes=alibi_slopes(heads)), *good_inputs)
  assert _rel_err(out[:, good], ref_out) < OUT_TOL
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert _rel_err(grad[:, good], ref_grad) < GRAD_TOL, name


@hopper_only
def test_runs_per_device_under_a_mesh():
  """impl='pallas' under a (data, fsdp, tensor) mesh of the local GPUs runs these kernels in
  shard_map, each device on its own rows, and equals them run directly."""
  devices = jax.device_count()
  batch, heads = 2 * devices, 2
  q, k, v, d_out, segment_ids = _inputs(17, batch, 256, heads, 128, "packed")
  slopes = alibi_slopes(heads)

  def out_and_grads(attend):
    return jax.jit(
      lambda *args: _out_and_grads(functools.partial(attend, slopes=slopes, segment_ids=segment_ids), *args)
    )(q, k, v, d_out)

  expected = out_and_grads(pallas_mosaic_gpu.flash_attention)
  mesh = jax.make_mesh((devices, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    actual = out_and_grads(functools.partial(dot_product_attention, impl="pallas"))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))


@pytest.mark.parametrize("blocks", BLOCK_SIZES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [None, "packed"])
@pytest.mark.parametrize("seq_len", [256, 300])
def test_every_configuration_traces(causal, segments, seq_len, blocks):
  """Forward and backward kernels build (shapes, layouts, loop plans) without a GPU."""
  q, k, v, d_out, segment_ids = _inputs(0, 1, seq_len, 2, 64, segments)
  attend = functools.partial(
    pallas_mosaic_gpu.flash_attention,
    slopes=alibi_slopes(2),
    segment_ids=segment_ids,
    causal=causal,
    block_sizes=BLOCK_SIZES[blocks],
  )
  grads = jax.eval_shape(lambda q, k, v: _out_and_grads(attend, q, k, v, d_out), q, k, v)
  assert [g.shape for g in grads[1]] == [q.shape] * 3
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_pallas_picks_the_hopper_kernels_on_hopper(monkeypatch):
  """impl='pallas' means the best Pallas kernel for the GPU: these on Hopper for bf16, Triton otherwise."""
  called = []

  def kernel(name):
    return lambda q, k, v, **kwargs: called.append(name) or q

  monkeypatch.setattr(pallas_mosaic_gpu, "on_hopper", lambda: True)
  for name in ("pallas_mosaic_gpu", "pallas_triton"):
    monkeypatch.setitem(attention._KERNELS, name, (kernel(name), "gpu"))
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  dot_product_attention(q, q, q, slopes=alibi_slopes(2), impl="pallas")
  dot_product_attention(q.astype(jnp.float32), q, q, slopes=alibi_slopes(2), impl="pallas")
  monkeypatch.setattr(pallas_mosaic_gpu, "on_hopper", lambda: False)
  dot_product_attention(q, q, q, slopes=alibi_slopes(2), impl="pallas")
  assert called == ["pallas_mosaic_gpu", "pallas_triton", "pallas_triton"]


def test_refuses_what_it_cannot_take():
  q = jnp.zeros((1, 128, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="pallas_triton"):
    pallas_mosaic_gpu.flash_attention(q, q, q, slopes=alibi_slopes(2))
  with pytest.raises(ValueError, match="Hopper"):
    pallas_mosaic_gpu.flash_attention(*(q.astype(jnp.bfloat16),) * 3, slopes=alibi_slopes(2), interpret=True)
  for field, value in (("block_q", 96), ("stages_dq", 1), ("max_ds_bytes", -1)):
    with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
      pallas_mosaic_gpu.BlockSizes(**{field: value})
