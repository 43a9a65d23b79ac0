"""Single-query cache attention (attention/decode.py, and the Pallas kernel pallas_decode.py:
compiled on a GPU, interpreted elsewhere) against the reference at the same query position,
and the kernel that also writes the new key and value into the cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import attention
from mpt_jax.alibi import alibi_slopes
from mpt_jax.attention import decode, pallas_decode, reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DECODERS = {
  "xla": decode.attention,
  "pallas": functools.partial(pallas_decode.attention, interpret=jax.default_backend() != "gpu"),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("per_row", [False, True], ids=lambda p: f"per_row={p}")
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decoder", DECODERS)
def test_matches_the_reference_at_the_query_position(decoder, seed, per_row, dtype):
  # 37 positions: the Pallas kernel's last 64-position block is ragged.
  batch, cache_length, heads, head_dim = 3, 37, 5, 16
  k_q, k_k, k_v, k_pos = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(k_q, (batch, 1, heads, head_dim)).astype(dtype)
  k = jax.random.normal(k_k, (batch, cache_length, heads, head_dim)).astype(dtype)
  v = jax.random.normal(k_v, (batch, cache_length, heads, head_dim)).astype(dtype)
  position = jax.random.randint(k_pos, (batch,) if per_row else (), 0, cache_length)
  slopes = alibi_slopes(heads, 8.0, "mpt")
  ours = DECODERS[decoder](q, k, v, slopes=slopes, q_offset=position, scale=0.3)
  assert ours.shape == q.shape and ours.dtype == q.dtype
  rows = np.broadcast_to(np.asarray(position), (batch,))
  for b in range(batch):
    expected = reference.attention(
      q[b : b + 1].astype(jnp.float32),
      k[b : b + 1].astype(jnp.float32),
      v[b : b + 1].astype(jnp.float32),
      slopes=slopes,
      scale=0.3,
      q_offset=int(rows[b]),
      precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(
      np.asarray(ours[b : b + 1], np.float32), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )


@pytest.mark.parametrize("decoder", DECODERS)
def test_keys_after_the_query_are_ignored(decoder):
  k_q, k_k, k_v = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(k_q, (2, 1, 4, 16))
  k, v = jax.random.normal(k_k, (2, 11, 4, 16)), jax.random.normal(k_v, (2, 11, 4, 16))
  position = jnp.array([3, 7])
  stale = k.at[0, 4:].set(100.0).at[1, 8:].set(-100.0), v.at[0, 4:].set(9.0).at[1, 8:].set(9.0)
  slopes = alibi_slopes(4)
  np.testing.assert_array_equal(
    DECODERS[decoder](q, *stale, slopes=slopes, q_offset=position),
    DECODERS[decoder](q, k, v, slopes=slopes, q_offset=position),
  )


def test_the_kernel_never_loads_the_cache_past_the_query():
  """NaN after each row's position cannot reach the output: those blocks are outside the loop and masked on load."""
  k_q, k_k, k_v = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(k_q, (2, 1, 4, 16))
  k, v = jax.random.normal(k_k, (2, 150, 4, 16)), jax.random.normal(k_v, (2, 150, 4, 16))
  position = jnp.array([5, 70])
  stale = k.at[0, 6:].set(jnp.nan).at[1, 71:].set(jnp.nan), v.at[0, 6:].set(jnp.nan).at[1, 71:].set(jnp.nan)
  slopes = alibi_slopes(4)
  np.testing.assert_allclose(
    DECODERS["pallas"](q, *stale, slopes=slopes, q_offset=position),
    decode.attention(q, k, v, slopes=slopes, q_offset=position),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_are_checked(decoder):
  with pytest.raises(ValueError, match=r"expected q \[B, 1, N, H\]"):
    DECODERS[decoder](
      jnp.zeros((2, 3, 4, 8)), jnp.zeros((2, 9, 4, 8)), jnp.zeros((2, 9, 4, 8)), slopes=alibi_slopes(4), q_offset=0
    )


def test_generation_takes_the_kernel_on_a_gpu_unless_told_xla(monkeypatch):
  q, k = jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 9, 4, 16))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention._decode_kernel_applies(q, k, "auto")
  assert not attention._decode_kernel_applies(q, k, "xla")
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not attention._decode_kernel_applies(q, k, "auto")


def _cache_step(seed, dtype, batch=3, cache_length=37, heads=5, head_dim=16):
  """q, new k and v [B, 1, N, H], a cache (k, v [B, S, N, H]) and per-row positions, first and last included."""
  k_q, k_k, k_v, k_ck, k_cv = jax.random.split(jax.random.key(seed), 5)
  step = [jax.random.normal(key, (batch, 1, heads, head_dim)).astype(dtype) for key in (k_q, k_k, k_v)]
  cache = tuple(jax.random.normal(key, (batch, cache_length, heads, head_dim)).astype(dtype) for key in (k_ck, k_cv))
  return (*step, cache, jnp.array([0, cache_length // 2, cache_length - 1])[:batch])


def _check_the_writing_kernel(step, tolerance: float, **kernel_args):
  """write_and_attend on a ``_cache_step`` writes the cache as decode.write_cache does and attends as
  decode.attention does over the written cache; ``kernel_args`` (scale, splits) go to the kernel, scale
  to the reference too."""
  q, k_new, v_new, (k_cache, v_cache), position = step
  slopes = alibi_slopes(q.shape[2])
  expected_cache = [decode.write_cache(old, new, position) for old, new in ((k_cache, k_new), (v_cache, v_new))]
  scale = kernel_args.get("scale")
  expected = decode.attention(q, *expected_cache, slopes=slopes, q_offset=position, scale=scale)
  out, *cache = pallas_decode.write_and_attend(
    jnp.stack([q, k_new, v_new], axis=2),
    k_cache,
    v_cache,
    slopes=slopes,
    q_offset=position,
    interpret=DECODERS["pallas"].keywords["interpret"],
    **kernel_args,
  )
  for written, want in zip(cache, expected_cache):
    np.testing.assert_array_equal(np.asarray(written, np.float32), np.asarray(want, np.float32))
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tolerance, rtol=tolerance
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_the_writing_kernel_equals_a_cache_write_then_attention(dtype):
  _check_the_writing_kernel(_cache_step(4, dtype), TOLERANCE[dtype], scale=0.3)


def test_cached_attention_gives_the_same_on_the_kernel_and_the_xla_path(monkeypatch):
  q, k_new, v_new, cache, position = _cache_step(5, jnp.float32)
  qkv = jnp.stack([q, k_new, v_new], axis=2)
  kwargs = dict(slopes=alibi_slopes(q.shape[2]), position=position)
  expected_out, expected_cache = attention.cached_attention(qkv, cache, impl="xla", **kwargs)
  written = []
  kernel = functools.partial(pallas_decode.write_and_attend, interpret=DECODERS["pallas"].keywords["interpret"])
  monkeypatch.setattr(attention, "_decode_kernel_applies", lambda q, k, impl: True)
  monkeypatch.setattr(pallas_decode, "write_and_attend", lambda *a, **kw: written.append(1) or kernel(*a, **kw))
  out, cache = attention.cached_attention(qkv, cache, **kwargs)
  assert written, "the kernel path was not taken"
  np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(cache, expected_cache):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_a_cache_split_into_parts_gives_the_same_attention(splits):
  """Each part a program of its own, combined by softmax weights; positions in the first part, a middle one and the last,
  so some parts lie wholly past their query and must contribute nothing."""
  batch, cache_length, heads, head_dim = 4, 300, 2, 16  # 5 blocks of 64, the last ragged
  k_q, k_k, k_v = jax.random.split(jax.random.key(6), 3)
  q = jax.random.normal(k_q, (batch, 1, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, cache_length, heads, head_dim)) for key in (k_k, k_v))
  position = jnp.array([3, 64, 190, cache_length - 1])
  slopes = alibi_slopes(heads)
  kernel = functools.partial(pallas_decode.attention, splits=splits, interpret=DECODERS["pallas"].keywords["interpret"])
  np.testing.assert_allclose(
    kernel(q, k, v, slopes=slopes, q_offset=position),
    decode.attention(q, k, v, slopes=slopes, q_offset=position),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("splits", [2, 4])
def test_the_writing_kernel_split_into_parts_writes_the_cache_and_attends(splits):
  _check_the_writing_kernel(_cache_step(7, jnp.float32, cache_length=200, heads=2), 1e-5, splits=splits)


def test_few_rows_split_the_cache_to_fill_the_gpu():
  plan = pallas_decode.split_plan
  assert plan(16, 300) == (64, 5, 1)  # batch 1, 16 heads: one 64-position block per part
  assert plan(16, 2048) == (64, 32, 1)  # 512 programs: at most one per block
  assert plan(256, 2048) == (64, 4, 8)  # batch 16: 1024 programs (TARGET_PROGRAMS)
  assert plan(1024, 2048) == (64, 1, 32)  # batch 64 fills the GPU alone
  assert plan(16, 300, splits=4) == (64, 3, 2)  # parts are whole blocks: 5 blocks make 3 parts of 2
