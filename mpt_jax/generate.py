"""Autoregressive sampling: temperature / greedy decoding from an MPTForCausalLM."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0, rng=None) -> np.ndarray:
  """Extends each prompt by ``max_new_tokens`` sampled tokens.

  The whole [B, T0 + max_new_tokens] buffer goes through one jitted step per token (the
  shape never changes, so it compiles once); causal attention keeps the not-yet-written
  positions from influencing earlier ones.

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
  total = prompt_ids.shape[1] + max_new_tokens
  if total > model.config.max_seq_len:
    raise ValueError(f"prompt ({prompt_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}")
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ValueError(f"temperature must be 0 (greedy) or > 0 with an rng, got {temperature=}, rng={rng}")
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((prompt_ids.shape[0], total), jnp.int32).at[:, : prompt_ids.shape[1]].set(prompt_ids)
  rng = jax.random.key(0) if rng is None else rng
  for position in range(prompt_ids.shape[1], total):
    rng, step_rng = jax.random.split(rng)
    tokens = _sample_next(graphdef, state, tokens, position, step_rng, temperature)
  return np.asarray(tokens)


@jax.jit(static_argnums=(0, 5))
def _sample_next(graphdef, state, tokens, position, rng, temperature):
  """Writes the token at ``position`` from the logits at ``position - 1``."""
  logits = nnx.merge(graphdef, state)(tokens)[:, position - 1]  # [B, V]
  if temperature == 0:
    next_token = jnp.argmax(logits, axis=-1)
  else:
    next_token = jax.random.categorical(rng, logits / temperature, axis=-1)
  return tokens.at[:, position].set(next_token.astype(jnp.int32))
