"""Autoregressive sampling with a KV cache: temperature or greedy decoding from an MPTForCausalLM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0, rng=None) -> np.ndarray:
  """Extends each prompt by ``max_new_tokens`` sampled tokens.

  One cached forward over the prompt (prefill), then one jitted step per new token that
  attends to the cache: the same compiled step for every position.

  Args:
    model: an MPTForCausalLM.
    prompt_ids: int [B, T0] prompts, all of the same length.
    max_new_tokens: tokens to add; T0 + max_new_tokens must fit in max_seq_len.
    temperature: softmax temperature; 0 means greedy (argmax).
    rng: a jax.random key, needed when temperature > 0.

  Returns:
    int32 [B, T0 + max_new_tokens]: the prompts followed by the samples.
  """
  prompt_ids = np.asarray(prompt_ids, np.int32)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
    raise ValueError(f"prompt_ids must be [B, T0] with T0 >= 1, got shape {prompt_ids.shape}")
  batch, prompt_length = prompt_ids.shape
  total = prompt_length + max_new_tokens
  if total > model.config.max_seq_len:
    raise ValueError(f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}")
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ValueError(f"temperature must be 0 (greedy) or > 0 with an rng, got {temperature=}, rng={rng}")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, total)
  tokens = [jnp.asarray(prompt_ids)]
  logits, cache = _decode(graphdef, state, tokens[0], cache, 0)
  for position in range(prompt_length, total):
    rng, step_rng = jax.random.split(rng)
    next_token = _sample(logits[:, -1], step_rng, temperature)[:, None]  # [B, 1]
    tokens.append(next_token)
    if position + 1 < total:
      logits, cache = _decode(graphdef, state, next_token, cache, position)
  return np.asarray(jnp.concatenate(tokens, axis=1))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode(graphdef, state, input_ids, cache, position):
  return nnx.merge(graphdef, state).decode(input_ids, cache, position)


@functools.partial(jax.jit, static_argnums=2)
def _sample(logits, rng, temperature: float):
  """logits: [B, V] -> int32 [B]."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)
