"""The Pallas-TPU kernels (attention/pallas_tpu.py) against reference.attention (float32, HIGHEST).

Off TPU the kernels run in the Pallas TPU interpreter, so shapes are small: T=200 and T=300
are ragged against blocks of 128 and 256, and forward, dK/dV and dQ blocks differ, so a swapped
block size or axis shows as a wrong answer. On a TPU (``JAX_PLATFORMS=tpu pytest
tests/test_attention_tpu.py``) the same cases run compiled.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM
from mpt_jax.alibi import alibi_slopes
from mpt_jax.attention import dot_product_attention, pallas_tpu, reference
from tests.test_attention import TOLERANCES, _inputs, _rel_err

INTERPRET = jax.default_backend() != "tpu"
BLOCKS = pallas_tpu.BlockSizes(
  block_q=128, block_k=256, block_q_dkv=256, block_k_dkv=128, block_q_dq=128, block_k_dq=256
)
flash = functools.partial(pallas_tpu.flash_attention, block_sizes=BLOCKS, interpret=INTERPRET)

# (seq_len, head_dim, dtype, causal, segments, scale), as in tests/test_attention.py.
CASES = [
  (200, 64, jnp.float32, True, None, None),
  (300, 128, jnp.float32, True, "packed", None),
  (300, 64, jnp.bfloat16, True, "packed", None),
  (200, 64, jnp.float32, False, "packed", None),
  (256, 128, jnp.bfloat16, False, "shuffled", 0.3),
]


def _case_id(case):
  seq_len, head_dim, dtype, causal, segments, scale = case
  return (
    f"{seq_len=}-{head_dim=}-{jnp.dtype(dtype).name}-{'causal' if causal else 'bidirectional'}-{segments=}-{scale=}"
  )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case):
  seq_len, head_dim, dtype, causal, segments, scale = case
  heads = 2
  q, k, v, d_out, segment_ids = _inputs(seq_len + head_dim, 1, seq_len, heads, head_dim, segments)
  if segments == "packed":  # documents of ~50 tokens, so whole blocks pair different documents
    segment_ids = jnp.arange(seq_len, dtype=jnp.int32)[None] // 50 + segment_ids
  q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
  kwargs = dict(slopes=alibi_slopes(heads), segment_ids=segment_ids, causal=causal, scale=scale)
  out, vjp = jax.vjp(lambda q, k, v: flash(q, k, v, **kwargs), q, k, v)
  grads = vjp(d_out)
  ref_out, ref_vjp = jax.vjp(
    lambda q, k, v: reference.attention(q, k, v, precision=jax.lax.Precision.HIGHEST, **kwargs),
    *(x.astype(jnp.float32) for x in (q, k, v)),
  )
  assert out.dtype == dtype
  out_tol, grad_tol = TOLERANCES[dtype]
  assert _rel_err(out, ref_out) < out_tol
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_vjp(d_out.astype(jnp.float32))):
    assert grad.dtype == dtype, name
    assert _rel_err(grad, ref_grad) < grad_tol, name


def test_causal_never_loads_keys_past_the_diagonal():
  """NaN keys and values from position 256 on reach no earlier query (key blocks of 256, 128).

  A kernel that only masked those blocks would still multiply the NaN values by zero.
  """
  seen, heads = 256, 2
  q, k, v, d_out, _ = _inputs(7, 1, 384, heads, 64)
  k, v = (x.at[:, seen:].set(jnp.nan) for x in (k, v))
  kwargs = dict(slopes=alibi_slopes(heads), causal=True)
  out, vjp = jax.vjp(lambda q: flash(q, k, v, **kwargs), q)
  (dq,) = vjp(d_out)
  ref_out, ref_vjp = jax.vjp(
    lambda q: reference.attention(q, k[:, :seen], v[:, :seen], precision=jax.lax.Precision.HIGHEST, **kwargs),
    q[:, :seen],
  )
  (ref_dq,) = ref_vjp(d_out[:, :seen])
  assert _rel_err(out[:, :seen], ref_out) < TOLERANCES[jnp.float32][0]
  assert _rel_err(dq[:, :seen], ref_dq) < TOLERANCES[jnp.float32][1]


@pytest.mark.parametrize("poisoned", [0, 1])
def test_packed_documents_never_load_each_other(poisoned):
  """Two 256-token documents; NaN in one leaves the other's output and gradients exact.

  Document 0 poisoned tests the skipping of key blocks (forward, dQ), document 1 that of
  query blocks (dK/dV): blocks of one document only are never computed.
  """
  doc, heads = 256, 2
  q, k, v, d_out, _ = _inputs(13, 1, 2 * doc, heads, 64)
  segment_ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32), doc)[None]
  bad, good = slice(poisoned * doc, (poisoned + 1) * doc), slice((1 - poisoned) * doc, (2 - poisoned) * doc)
  q, k, v = (x.at[:, bad].set(jnp.nan) for x in (q, k, v))
  out, vjp = jax.vjp(lambda q, k, v: flash(q, k, v, slopes=alibi_slopes(heads), segment_ids=segment_ids), q, k, v)
  ref = functools.partial(reference.attention, slopes=alibi_slopes(heads), precision=jax.lax.Precision.HIGHEST)
  ref_out, ref_vjp = jax.vjp(ref, q[:, good], k[:, good], v[:, good])
  assert _rel_err(out[:, good], ref_out) < TOLERANCES[jnp.float32][0]
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), vjp(d_out), ref_vjp(d_out[:, good])):
    assert _rel_err(grad[:, good], ref_grad) < TOLERANCES[jnp.float32][1], name


def test_model_logits_equal_the_reference_path():
  """A tiny MPT with attn_impl="pallas_tpu" (dispatcher, packed documents, T=45) equals "xla"."""
  config = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=61, dtype="float32", attn_impl="xla")
  model = MPTForCausalLM(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 45), 0, config.vocab_size)
  segment_ids = (jnp.arange(45)[None] >= jnp.array([[20], [31]])).astype(jnp.int32)
  expected = model(tokens, segment_ids)
  kernel_model = MPTForCausalLM(dataclasses.replace(config, attn_impl="pallas_tpu"), rngs=nnx.Rngs(0))
  nnx.update(kernel_model, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(kernel_model(tokens, segment_ids), expected, rtol=1e-5, atol=1e-5)


def test_sharded_matches_unsharded():
  """impl='pallas_tpu' under a (data, fsdp, tensor) mesh runs per shard and equals one device.

  Four devices, (data, fsdp, tensor) = (1, 2, 2): rows split over fsdp (the wrapper treats data
  the same way), heads over tensor. Not eight: in jax 0.10.2's TPU interpreter every kernel
  ends with a barrier across all devices (an io_callback), and io_callback first device_puts
  its arguments onto CPU device 0; with 8 CPU devices, some devices' callbacks wait on that
  transfer while device 0 waits in the barrier for them, a deadlock (seen in a faulthandler
  dump: 5 threads in _barrier, 3 in _allocate_buffer's int(device_id)). With 4 it completes.
  """
  if jax.device_count() < 4:
    pytest.skip(f"needs 4 devices, got {jax.device_count()}")
  batch, heads = 4, 4
  q, k, v, d_out, segment_ids = _inputs(11, batch, 40, heads, 64, "packed")
  slopes = alibi_slopes(heads)

  def run(attend):
    def step(q, k, v, segment_ids, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, slopes=slopes, segment_ids=segment_ids), q, k, v)
      return out, vjp(d_out)

    return jax.jit(step)(q, k, v, segment_ids, d_out)

  expected = run(functools.partial(pallas_tpu.flash_attention, interpret=INTERPRET))
  mesh = jax.make_mesh(
    (1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:4]
  )
  with jax.set_mesh(mesh):
    actual = run(functools.partial(dot_product_attention, impl="pallas_tpu"))
  split = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
  assert actual[0].sharding.is_equivalent_to(split, 4), actual[0].sharding
  assert len(actual[0].sharding.device_set) == 4
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "kind, block_q",
  [("TPU v4", 512), ("TPU v5 lite", 1024), ("TPU v5", 512), ("TPU v6 lite", 1024), ("cpu", 512)],
)
def test_block_sizes_per_generation(kind, block_q):
  assert pallas_tpu.BlockSizes.for_device(kind).block_q == block_q


@pytest.mark.parametrize("field, value", [("block_q", 192), ("block_k_dq", 64), ("block_q_dkv", 0)])
def test_block_sizes_validate(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_tpu.BlockSizes(**{field: value})


def test_auto_picks_the_tpu_kernel_on_tpu(monkeypatch):
  from mpt_jax import attention

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  q = jnp.zeros((1, 8, 2, 16))
  assert attention._auto_impl(q, q) == "pallas_tpu"
  assert attention._auto_impl(q, jnp.zeros((1, 9, 2, 16))) == "xla"
