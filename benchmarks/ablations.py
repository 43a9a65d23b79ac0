"""The ablation table of benchmarks/train_step.py: each feature of the real step, swapped out.

Every entry of ``VARIANTS`` names one feature of ``mpt_jax.train_step``'s step and how the
variant differs: either a config change (what a user can set) or a patch that replaces
one library function with its plain alternative, applied inside the child process that
measures the variant and nowhere else. The difference to the unchanged step, measured in
the same run, is that feature's cost.
"""

import dataclasses
from typing import Callable, NamedTuple


class Variant(NamedTuple):
  what: str  # the table's wording
  config: dict  # TrainConfig / MPTConfig overrides: {"z_loss": 1e-4} or {"model.attn_impl": "cudnn"}
  patch: Callable[[], None] | None = None  # replaces library functions (in the measuring process only)


def _no_guard():
  """The update is applied even when the loss or gradient norm is NaN/inf."""
  import optax

  from mpt_jax import train_step

  def unguarded(optimizer, grads, params, opt_state, *, finite):
    del finite
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  train_step.guarded_update = unguarded


def _cond_guard():
  """The guard as it was: lax.cond around the whole update."""
  import jax
  import optax

  from mpt_jax import train_step

  def cond_guarded(optimizer, grads, params, opt_state, *, finite):
    def update(operands):
      params, opt_state = operands
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return jax.lax.cond(finite, update, lambda unchanged: unchanged, (params, opt_state))

  train_step.guarded_update = cond_guarded


def _no_clipping():
  from mpt_jax import train_step

  train_step.clip_by_global_norm = lambda grads, grad_norm, max_norm: grads


def _constant_token_count():
  """Weights mask / (B * (T - 1)) instead of mask / (tokens predicted): no reduction over the mask."""
  import jax.numpy as jnp

  from mpt_jax import loss, train_step

  def with_targets(batch):
    targets, mask = loss.next_token_targets(batch["input_ids"], batch.get("segment_ids"))
    b, t = mask.shape
    return {**batch, "targets": targets, "weights": mask.astype(jnp.float32) / (b * (t - 1))}

  train_step._with_targets = with_targets


def _autodiff_norms_and_gelu(rematerialized: bool):
  """LayerNorm and GELU by automatic differentiation (jax.nn.gelu's erfc), as before ops.py."""

  def patch():
    import jax
    import jax.numpy as jnp

    from mpt_jax import ops

    def layer_norm(x, scale, eps, dtype, impl, batch_axes=()):
      del impl, batch_axes
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)).astype(dtype)

    def gelu(x):
      return jax.nn.gelu(x, approximate=False)

    if rematerialized:
      layer_norm = jax.checkpoint(layer_norm, static_argnums=(2, 3, 4, 5))
      gelu = jax.checkpoint(gelu)
    ops.layer_norm, ops.exact_gelu = layer_norm, gelu

  return patch


def _materialized_logits():
  """float32 [B, T, V] logits from the model, then cross-entropy on them (autodiff backward)."""
  import jax.numpy as jnp
  from flax import nnx

  from mpt_jax import loss, train_step

  def objective(params, graphdef, batch, z_loss):
    logits = nnx.merge(graphdef, params)(batch["input_ids"], batch.get("segment_ids"))
    ce, lse = loss.cross_entropy(logits, batch["targets"])
    weights = batch["weights"]
    return jnp.sum(weights * (ce + z_loss * jnp.square(lse))), jnp.sum(weights * ce)

  train_step._objective = objective


VARIANTS = {
  "as_is": Variant("the step as it is (all features on)", {}),
  "no_guard": Variant("without the NaN/inf guard", {}, _no_guard),
  "cond_guard": Variant("guard by lax.cond around the update (before)", {}, _cond_guard),
  "no_clipping": Variant("without clipping (norm still computed for guard and log)", {}, _no_clipping),
  "constant_count": Variant("divide by a constant instead of the token count", {}, _constant_token_count),
  "z_loss": Variant("with z-loss 1e-4 (off by default)", {"z_loss": 1e-4}),
  "remat_ln_gelu": Variant(
    "LayerNorm/GELU by autodiff under jax.checkpoint (before)", {}, _autodiff_norms_and_gelu(True)
  ),
  "autodiff_ln_gelu": Variant("LayerNorm/GELU by plain autodiff", {}, _autodiff_norms_and_gelu(False)),
  "xla_layer_norm": Variant(
    "LayerNorm by XLA (same custom VJP) instead of the Pallas kernels", {"model.norm_impl": "xla"}
  ),
  "f32_logits": Variant("float32 [B, T, V] logits + cross-entropy over the full vocabulary", {}, _materialized_logits),
  "scan": Variant("layers by lax.scan, one block per iteration", {"model.scan_unroll": 1}),
  "loop": Variant("layers by a Python loop (per-layer parameters)", {"model.scan_layers": False}),
  "cudnn": Variant("cuDNN attention with a materialized ALiBi bias", {"model.attn_impl": "cudnn"}),
}


def configure(config, variant: str):
  """``config`` (a TrainConfig) with the variant's overrides and its patch applied."""
  spec = VARIANTS[variant]
  model_overrides = {k.split(".", 1)[1]: v for k, v in spec.config.items() if k.startswith("model.")}
  run_overrides = {k: v for k, v in spec.config.items() if not k.startswith("model.")}
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, **model_overrides), **run_overrides)
  if spec.patch is not None:
    spec.patch()
  return config
