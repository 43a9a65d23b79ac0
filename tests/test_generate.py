"""Sampling: greedy decoding is the argmax of the full forward at every step."""

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
