"""Optimizer and learning-rate schedule with MosaicML Composer's semantics (docs/training.md).

Composer's decoupled optimizers shrink the weights by ``(lr_t / lr_peak) * weight_decay``
(not ``lr_t * weight_decay`` as optax.adamw does), so the decay follows the schedule's shape
but not its scale:

  p <- p - lr_t * update - (lr_t / lr_peak) * weight_decay * p

Adding ``weight_decay / lr_peak * p`` to the update before scaling by ``lr_t`` gives exactly
that from stock optax parts. ``update`` is Adam's bias-corrected m / (sqrt(v) + eps) (torch's
AdamW, which DecoupledAdamW extends) or Lion's sign step (DecoupledLionW).
"""

import jax
import jax.numpy as jnp
import optax

from mpt_jax.config import OptimConfig


def cosine_with_warmup(peak_lr: float, *, warmup_steps: int, total_steps: int, alpha_f: float) -> optax.Schedule:
  """Composer's ``cosine_with_warmup``: the LR used by the step that starts after ``t`` updates.

  t / t_warmup for t < t_warmup; else alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2 with
  tau = (t - t_warmup) / (t_max - t_warmup) clipped to [0, 1]; times ``peak_lr``.
  """

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warmup = t / max(warmup_steps, 1)
    tau = jnp.clip((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + jnp.cos(jnp.pi * tau))
    return peak_lr * jnp.where(t < warmup_steps, warmup, cosine)

  return schedule


def clip_by_global_norm(grads, grad_norm, max_norm: float):
  """torch's clip_grad_norm_: grads * max_norm / grad_norm where grad_norm exceeds max_norm.

  Takes the norm the train step has already computed (for logging and the NaN guard), so
  the gradients are read once for it, not twice as with optax.clip_by_global_norm in the
  optimizer chain. ``max_norm <= 0`` disables clipping.
  """
  if max_norm <= 0:
    return grads
  factor = jnp.where(grad_norm > max_norm, max_norm / grad_norm, 1.0)
  return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def make_optimizer(config: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Decoupled AdamW or LionW on the cosine-with-warmup schedule (clip first: clip_by_global_norm).

  Returns the transformation and its schedule (for logging the LR of each step).
  """
  if not config.lr > 0:
    raise ValueError(f"OptimConfig.lr must be positive (the decay is scaled by lr_t / lr), got {config.lr}")
  if config.weight_decay < 0 or not 0.0 <= config.alpha_f <= 1.0 or config.warmup_steps < 0:
    raise ValueError(f"OptimConfig needs weight_decay >= 0, 0 <= alpha_f <= 1, warmup_steps >= 0; got {config}")
  schedule = cosine_with_warmup(
    config.lr, warmup_steps=config.warmup_steps, total_steps=total_steps, alpha_f=config.alpha_f
  )
  b1, b2 = config.betas
  if config.name == "decoupled_adamw":
    direction = optax.scale_by_adam(b1=b1, b2=b2, eps=config.eps)
  elif config.name == "decoupled_lionw":
    direction = optax.scale_by_lion(b1=b1, b2=b2)
  else:
    raise ValueError(f"OptimConfig.name must be 'decoupled_adamw' or 'decoupled_lionw', got {config.name!r}")
  tx = optax.chain(
    direction,
    optax.add_decayed_weights(config.weight_decay / config.lr),
    optax.scale_by_learning_rate(schedule),
  )
  return tx, schedule
