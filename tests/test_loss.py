"""The fused head + cross-entropy equals the textbook loss on materialized logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import loss

B, T, D, V = 3, 12, 16, 37  # distinct sizes, so swapped axes fail


def _rel_err(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def test_cross_entropy_matches_float64_log_softmax():
  k_logits, k_targets = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k_logits, (2, 7, 11))
  targets = jax.random.randint(k_targets, (2, 7), 0, 11)
  ce, lse = loss.cross_entropy(logits, targets)
  x = np.asarray(logits, np.float64)
  expected_lse = np.log(np.exp(x).sum(-1))
  expected_ce = expected_lse - np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(lse, expected_lse, rtol=1e-6)
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)


def _inputs(seed, dtype):
  k_h, k_w, k_t, k_m = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k_h, (B, T, D)).astype(dtype)
  embedding = 0.5 * jax.random.normal(k_w, (V, D))
  targets = jax.random.randint(k_t, (B, T), 0, V)
  mask = jax.random.bernoulli(k_m, 0.8, (B, T))
  return hidden, embedding, targets, mask / mask.sum()


def _textbook(hidden, embedding, targets, weights, z_loss, logit_scale):
  """The same objective by autodiff through float32 logits of the bf16-rounded operands."""
  logits = logit_scale * jnp.einsum(
    "BTD,VD->BTV", hidden.astype(jnp.float32), embedding.astype(hidden.dtype).astype(jnp.float32)
  )
  ce, lse = loss.cross_entropy(logits, targets)
  return jnp.sum(weights * (ce + z_loss * lse**2)), jnp.sum(weights * ce)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("chunk_positions", [T, 4, 5], ids=lambda c: f"chunk_positions={c}")
@pytest.mark.parametrize("z_loss, logit_scale", [(0.0, None), (1e-2, 0.7)], ids=["plain", "z_loss+scale"])
def test_fused_head_cross_entropy_matches_the_textbook_loss(dtype, tolerance, chunk_positions, z_loss, logit_scale):
  hidden, embedding, targets, weights = _inputs(1, dtype)
  fused = lambda h, e: loss.head_cross_entropy(
    h,
    e,
    targets,
    weights,
    z_loss=z_loss,
    logit_scale=logit_scale,  # noqa: E731
    chunk_positions=chunk_positions,
  )
  textbook = lambda h, e: _textbook(h, e, targets, weights, z_loss, 1.0 if logit_scale is None else logit_scale)  # noqa: E731
  (objective, ce_sum), (d_hidden, d_embedding) = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(
    hidden, embedding
  )
  (expected, expected_ce), (d_hidden_ref, d_embedding_ref) = jax.value_and_grad(textbook, argnums=(0, 1), has_aux=True)(
    hidden, embedding
  )
  np.testing.assert_allclose(objective, expected, rtol=1e-5)
  np.testing.assert_allclose(ce_sum, expected_ce, rtol=1e-5)
  assert d_hidden.dtype == dtype and d_embedding.dtype == jnp.float32
  assert _rel_err(d_hidden, d_hidden_ref) < tolerance
  assert _rel_err(d_embedding, d_embedding_ref) < tolerance
  # Without differentiation (evaluation) the same values come from the loss-only path.
  np.testing.assert_allclose(fused(hidden, embedding)[0], objective, rtol=1e-6)


def test_gradient_scales_with_the_objective_cotangent():
  hidden, embedding, targets, weights = _inputs(2, jnp.float32)
  grad = lambda scale: jax.grad(  # noqa: E731
    lambda h: scale * loss.head_cross_entropy(h, embedding, targets, weights)[0]
  )(hidden)
  np.testing.assert_allclose(grad(-2.5), -2.5 * grad(1.0), rtol=1e-5)
