"""The optimizer and schedule against closed forms and Composer's update rules written in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpt_jax.config import OptimConfig
from mpt_jax.optim import clip_by_global_norm, cosine_with_warmup, make_optimizer

LR, WARMUP, TOTAL, ALPHA_F = 2e-4, 100, 44_389, 0.1
MIDDLE = WARMUP + (TOTAL - WARMUP) // 2


@pytest.mark.parametrize(
  "step, multiplier",
  [
    (0, 0.0),
    (WARMUP // 4, 0.25),
    (WARMUP, 1.0),
    (MIDDLE, ALPHA_F + (1 - ALPHA_F) * 0.5 * (1 + math.cos(math.pi * (MIDDLE - WARMUP) / (TOTAL - WARMUP)))),
    (TOTAL, ALPHA_F),
    (TOTAL + 1000, ALPHA_F),
  ],
  ids=lambda x: f"{x}",
)
def test_cosine_with_warmup_closed_form(step, multiplier):
  schedule = cosine_with_warmup(LR, warmup_steps=WARMUP, total_steps=TOTAL, alpha_f=ALPHA_F)
  np.testing.assert_allclose(schedule(step), LR * multiplier, rtol=1e-5, atol=1e-12)


def _composer_multiplier(t, warmup, total, alpha_f):
  if t < warmup:
    return t / warmup
  tau = min(max((t - warmup) / (total - warmup), 0.0), 1.0)
  return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * tau))


def _composer_reference(name, params, grads_per_step, config: OptimConfig, total):
  """Composer's DecoupledAdamW / DecoupledLionW after torch clip_grad_norm_, in float64 numpy."""
  b1, b2 = config.betas
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_per_step):
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
    clip = min(1.0, config.grad_clip_norm / norm)
    lr = config.lr * _composer_multiplier(t, config.warmup_steps, total, config.alpha_f)
    for k in p:
      g = np.asarray(grads[k], np.float64) * clip
      p[k] = p[k] * (1 - lr / config.lr * config.weight_decay)
      if name == "decoupled_adamw":
        m[k] = b1 * m[k] + (1 - b1) * g
        v2[k] = b2 * v2[k] + (1 - b2) * g * g
        denom = np.sqrt(v2[k]) / math.sqrt(1 - b2 ** (t + 1)) + config.eps
        p[k] = p[k] - lr / (1 - b1 ** (t + 1)) * m[k] / denom
      else:
        p[k] = p[k] - lr * np.sign(b1 * m[k] + (1 - b1) * g)
        m[k] = b2 * m[k] + (1 - b2) * g
  return p


def _run(tx, params, grads_per_step, max_norm=0.0):
  """The train step's order: clip by the global norm, then the optimizer."""

  @jax.jit
  def step(params, state, grads):
    grads = clip_by_global_norm(grads, optax.tree.norm(grads), max_norm)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads in grads_per_step:
    params, state = step(params, state, grads)
  return params


@pytest.mark.parametrize("name", ["decoupled_adamw", "decoupled_lionw"])
def test_optimizer_matches_composer_update_rule(name):
  config = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, warmup_steps=2, alpha_f=0.1, grad_clip_norm=1.0)
  total = 6
  keys = jax.random.split(jax.random.key(0), 2 + 2 * total)
  params = {"w": jax.random.normal(keys[0], (5, 3)), "b": jax.random.normal(keys[1], (7,))}
  # Norms far above and below the clipping threshold, so a missing or misplaced clip shows.
  grads_per_step = [
    {
      "w": jax.random.normal(keys[2 + 2 * i], (5, 3)) * 10.0 ** (i % 3 - 1),
      "b": jax.random.normal(keys[3 + 2 * i], (7,)),
    }
    for i in range(total)
  ]
  tx, _ = make_optimizer(config, total)
  got = _run(tx, params, grads_per_step, config.grad_clip_norm)
  expected = _composer_reference(name, {k: np.asarray(v) for k, v in params.items()}, grads_per_step, config, total)
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", ["decoupled_adamw", "decoupled_lionw"])
def test_weight_decay_follows_the_schedule_shape_not_its_scale(name):
  """With zero gradients only the decay acts: p_T = p_0 * prod_t (1 - lr_t / lr * wd)."""
  config = OptimConfig(name=name, lr=3e-4, weight_decay=0.5, warmup_steps=3, alpha_f=0.2)
  total = 8
  params = {"w": jax.random.normal(jax.random.key(1), (4, 4))}
  tx, schedule = make_optimizer(config, total)
  got = _run(tx, params, [{"w": jnp.zeros((4, 4))}] * total)
  factor = np.prod([1 - _composer_multiplier(t, 3, total, 0.2) * 0.5 for t in range(total)])
  np.testing.assert_allclose(got["w"], params["w"] * factor, rtol=1e-6)
  np.testing.assert_allclose(schedule(3), config.lr, rtol=1e-6)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("lr", 0.0, "OptimConfig.lr must be positive"),
    ("alpha_f", 1.5, "0 <= alpha_f <= 1"),
    ("name", "sgd", "OptimConfig.name"),
  ],
)
def test_bad_optim_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    make_optimizer(OptimConfig(**{field: value}), 10)
