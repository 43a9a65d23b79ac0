"""Cached decoding equals the full forward; sampling is greedy argmax or seeded categorical."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM
from mpt_jax.generate import generate

CONFIG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=53, dtype="float32", attn_impl="xla")


@pytest.fixture(scope="module")
def model():
  return MPTForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"scan={s}")
def test_cached_decode_equals_the_full_forward(scan_layers):
  """A prompt prefilled at once, then tokens one by one, give the logits of one full pass."""
  model = MPTForCausalLM(dataclasses.replace(CONFIG, scan_layers=scan_layers), rngs=nnx.Rngs(4))
  ids = jax.random.randint(jax.random.key(5), (3, 13), 0, CONFIG.vocab_size)
  cache = model.init_cache(3, 20)  # longer than used: the unwritten tail must stay masked
  logits, cache = model.decode(ids[:, :6], cache, 0)
  pieces = [logits]
  for position in range(6, 13):
    logits, cache = model.decode(ids[:, position : position + 1], cache, position)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(ids), rtol=1e-5, atol=1e-5)
  assert cache.k.shape == (CONFIG.n_layers, 3, 20, CONFIG.n_heads, CONFIG.head_dim)


def test_cache_longer_than_max_seq_len_raises(model):
  with pytest.raises(ValueError, match="max_seq_len"):
    model.init_cache(1, CONFIG.max_seq_len + 1)


def test_greedy_extends_the_prompt_with_argmax_tokens(model):
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (2, 5), 0, 53), np.int32)
  out = generate(model, prompt, max_new_tokens=7, temperature=0.0)
  assert out.shape == (2, 12) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, :5], prompt)
  for position in range(5, 12):
    expected = jnp.argmax(model(jnp.asarray(out[:, :position]))[:, -1], axis=-1)
    np.testing.assert_array_equal(out[:, position], expected)


def test_sampling_is_reproducible_per_key_and_differs_across_keys(model):
  prompt = np.zeros((4, 3), np.int32)
  first = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(2))
  again = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(2))
  other = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(3))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=np.zeros((2, 20), np.int32), max_new_tokens=5), "max_seq_len"),
    (dict(prompt_ids=np.zeros((2,), np.int32), max_new_tokens=1), "prompt_ids"),
    (dict(prompt_ids=np.zeros((1, 2), np.int32), max_new_tokens=1, temperature=1.0), "rng"),
])
def test_bad_arguments_raise(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate(model, **kwargs)
