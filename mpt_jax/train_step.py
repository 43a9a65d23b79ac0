"""The train step's maths: TrainState, the objective, gradient accumulation, the guarded update.

``train_step`` is one optimizer step as a pure top-level function, which a test or a
benchmark can jit on its own (as the Flax examples' ``train_step``); ``make_setup`` derives
from a TrainConfig and a mesh everything a run needs (abstract state, shardings, the jitted
init and step) without allocating anything. The run around it (loop, hooks, checkpoints,
``main``) is mpt_jax.trainer's.

The model is split once into (graphdef, params) and merged inside the jitted step (flax
examples/nnx_toy_examples/01_functional_api.py). Parameters are float32 master weights; the
model computes in its config dtype; the loss (mpt_jax.loss) forms float32 logits chunk by
chunk from the final hidden states and is float32. docs/training.md describes the recipe.
"""

import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mpt_jax import loss, sharding
from mpt_jax.config import TrainConfig
from mpt_jax.model import MPTForCausalLM, abstract_model
from mpt_jax.optim import clip_by_global_norm, make_optimizer

Batch = dict[str, jax.Array]  # 'input_ids' int32 [B, T], optionally 'segment_ids' int32 [B, T]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer updates applied so far
  params: nnx.State  # float32 master weights; nnx.Param leaves carry their logical axis names
  opt_state: optax.OptState
  rng: jax.Array  # key for stochastic work (sampling); the MPT forward itself is deterministic
  nonfinite_steps: jax.Array  # int32 []: updates skipped because the loss or grad norm was NaN/inf
  nonfinite_streak: jax.Array  # int32 []: of those, how many in a row up to now


def _objective(params, graphdef, batch: Batch, z_loss: float):
  """(objective, cross-entropy) of one (micro)batch, each already divided by the batch's token count.

  ``batch`` carries 'targets' and 'weights' (mask / predicted tokens of the whole step), so
  microbatches add up to exactly the full batch's mean.
  """
  model = nnx.merge(graphdef, params)
  hidden = model.hidden_states(batch["input_ids"], batch.get("segment_ids"))
  with jax.named_scope("loss"):
    return loss.head_cross_entropy(
      hidden,
      model.wte[...],
      batch["targets"],
      batch["weights"],
      z_loss=z_loss,
      logit_scale=model.config.logit_multiplier,
    )


def _accumulated_gradients(params, graphdef, batch: Batch, *, grad_accum: int, z_loss: float, microbatch_sharding):
  """Gradient of the mean objective over the batch, in ``grad_accum`` sequential microbatches."""
  grad_fn = jax.grad(_objective, has_aux=True)
  if grad_accum == 1:
    return grad_fn(params, graphdef, batch, z_loss)

  def split(x):  # [B, T] -> [A, B / A, T]; row i goes to microbatch i % A, so every device keeps its rows
    x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return x if microbatch_sharding is None else jax.lax.with_sharding_constraint(x, microbatch_sharding)

  def accumulate(carry, microbatch):
    grads, cross_entropy = carry
    g, ce = grad_fn(params, graphdef, microbatch, z_loss)
    return (jax.tree.map(jnp.add, grads, g), cross_entropy + ce), None

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
  (grads, cross_entropy), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, batch))
  return grads, cross_entropy


def _with_targets(batch: Batch) -> Batch:
  """Adds next-token 'targets' and 'weights' (mask / number of predicted tokens in the whole batch)."""
  targets, mask = loss.next_token_targets(batch["input_ids"], batch.get("segment_ids"))
  weights = mask / jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
  return {**batch, "targets": targets, "weights": weights}


def guarded_update(optimizer: optax.GradientTransformation, grads, params, opt_state, *, finite):
  """Optimizer update, kept only where ``finite`` (the NaN/inf guard).

  A select per element, which XLA fuses into the update's own pass over the parameters
  and moments, so the guard reads and writes nothing extra (a lax.cond around the update
  cost ~3 ms per MPT-1B step: docs/performance.md).
  """
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int = 1,
  z_loss: float = 0.0,
  grad_clip_norm: float = 1.0,
  microbatch_sharding=None,
) -> tuple[TrainState, dict]:
  """One optimizer step: (new state, metrics). Pure, so it can be jitted on its own.

  Args:
    state: the train state (its params are ``graphdef``'s model state).
    batch: 'input_ids' int32 [B, T], optionally 'segment_ids'; B divisible by ``grad_accum``.
    graphdef: the model's graph (make_setup's, or ``nnx.split(model)[0]``).
    optimizer, schedule: from mpt_jax.optim.make_optimizer; the schedule only feeds the 'lr' metric.
    grad_accum: microbatches the batch is split into, run one after another.
    z_loss: weight of mean(logsumexp^2) added to the objective.
    grad_clip_norm: global-norm clipping threshold; <= 0 disables.
    microbatch_sharding: where microbatches [A, B / A, T] live (make_setup's: rows over the
      data-parallel axes); None: no constraint.

  Returns:
    The state one step on (a step whose loss or gradient norm is NaN/inf keeps the old params
    and optimizer state and counts in ``nonfinite_*``) and float32 scalar metrics: loss,
    grad_norm, lr, nonfinite_steps.
  """
  grads, loss_value = _accumulated_gradients(
    state.params,
    graphdef,
    _with_targets(batch),
    grad_accum=grad_accum,
    z_loss=z_loss,
    microbatch_sharding=microbatch_sharding,
  )
  with jax.named_scope("optimizer"):
    grad_norm = optax.tree.norm(grads)
    grads = clip_by_global_norm(grads, grad_norm, grad_clip_norm)
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    params, opt_state = guarded_update(optimizer, grads, state.params, state.opt_state, finite=finite)
  skipped = (~finite).astype(jnp.int32)
  state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    nonfinite_steps=state.nonfinite_steps + skipped,
    nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
  )
  step_metrics = {
    "loss": loss_value,
    "grad_norm": grad_norm,
    "lr": schedule(state.step - 1),
    "nonfinite_steps": state.nonfinite_steps,
  }
  return state, step_metrics


class TrainSetup(NamedTuple):
  """Everything derived from config and mesh; nothing is allocated until ``init`` is called."""

  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves
  state_shardings: TrainState  # NamedSharding leaves
  init: Callable[[], TrainState]  # jitted; every array is born in its sharded layout
  init_from_params: Callable[[nnx.State], TrainState]  # jitted; step 0 with given (e.g. converted) params
  train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # jitted; donates the state
  schedule: optax.Schedule
  grad_accum: int
  n_params: int


def grad_accum_steps(config: TrainConfig, data_parallel: int) -> int:
  """global_batch_size = micro_batch_size x grad_accum x data-parallel size; returns grad_accum."""
  micro = config.micro_batch_size or config.global_batch_size // data_parallel
  if config.global_batch_size % (micro * data_parallel):
    raise ValueError(
      f"TrainConfig.global_batch_size ({config.global_batch_size}) must be micro_batch_size ({micro}) "
      f"x grad_accum x data-parallel size (mesh data x fsdp = {data_parallel})"
    )
  return config.global_batch_size // (micro * data_parallel)


def make_setup(config: TrainConfig, mesh: jax.sharding.Mesh) -> TrainSetup:
  """Abstract state, its shardings and the jitted init and train step for ``config`` on ``mesh``."""
  if config.seq_len > config.model.max_seq_len:
    raise ValueError(f"TrainConfig.seq_len ({config.seq_len}) exceeds model.max_seq_len ({config.model.max_seq_len})")
  grad_accum = grad_accum_steps(config, sharding.data_parallel_size(mesh))
  optimizer, schedule = make_optimizer(config.optim, config.steps)

  params_key, rng_key = jax.random.split(jax.random.key(config.seed))

  def init_from_params(params: nnx.State) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
      step=zero,
      params=params,
      opt_state=optimizer.init(params),
      rng=rng_key,
      nonfinite_steps=zero,
      nonfinite_streak=zero,
    )

  def init() -> TrainState:
    return init_from_params(nnx.split(MPTForCausalLM(config.model, rngs=nnx.Rngs(params=params_key)))[1])

  graphdef, _ = abstract_model(config.model)
  abstract_state = jax.eval_shape(init)
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  microbatch_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))

  step = functools.partial(
    train_step,
    graphdef=graphdef,
    optimizer=optimizer,
    schedule=schedule,
    grad_accum=grad_accum,
    z_loss=config.z_loss,
    grad_clip_norm=config.optim.grad_clip_norm,
    microbatch_sharding=microbatch_sharding,
  )

  replicated = sharding.replicated(mesh)
  return TrainSetup(
    mesh=mesh,
    graphdef=graphdef,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    init=jax.jit(init, out_shardings=state_shardings),
    init_from_params=jax.jit(init_from_params, in_shardings=(state_shardings.params,), out_shardings=state_shardings),
    train_step=jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    ),
    schedule=schedule,
    grad_accum=grad_accum,
    n_params=sum(x.size for x in jax.tree.leaves(abstract_state.params)),
  )
