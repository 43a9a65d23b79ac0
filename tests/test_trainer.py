"""The loss, sharded training equivalence, gradient accumulation and MFU (8 virtual CPU devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mpt_jax import loss, metrics, sharding, trainer
from mpt_jax.config import MeshConfig, MPTConfig, OptimConfig, TrainConfig
from mpt_jax.model import MPTForCausalLM
from mpt_jax.optim import make_optimizer

TINY = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32, dtype="float32", attn_impl="xla")
CONFIG = TrainConfig(
  model=TINY,
  optim=OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1),
  seq_len=32,
  global_batch_size=8,
  steps=3,
  z_loss=1e-3,
)


def test_next_token_targets_shift_left_and_skip_row_ends_and_document_boundaries():
  ids = np.array([[5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7]])
  segments = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
  targets, mask = loss.next_token_targets(ids, segments)
  np.testing.assert_array_equal(targets[:, :6], ids[:, 1:])
  expected_mask = np.ones((2, 7), bool)
  expected_mask[:, 6] = False  # the last position has no next token
  expected_mask[0, 2] = False  # position 2 ends document 1; token 3 starts document 2
  np.testing.assert_array_equal(mask, expected_mask)
  _, unpacked_mask = loss.next_token_targets(ids)
  assert unpacked_mask.sum() == 2 * 6


def _train(config: TrainConfig, devices, batches):
  """Losses and final parameters of len(batches) steps on a mesh over ``devices``."""
  mesh = sharding.make_mesh(config.mesh, devices)
  with jax.set_mesh(mesh):
    setup = trainer.make_setup(config, mesh)
    state = setup.init()
    losses = []
    for rows in batches:
      state, step_metrics = setup.train_step(state, sharding.global_batch(rows, mesh))
      losses.append(float(step_metrics["loss"]))
  return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state.params))


def _batches(seed, n, *, segment_ids=False):
  keys = jax.random.split(jax.random.key(seed), n)
  batches = []
  for key in keys:
    k_ids, k_cuts = jax.random.split(key)
    rows = {"input_ids": np.asarray(jax.random.randint(k_ids, (8, 32), 0, 128), np.int32)}
    if segment_ids:  # random document boundaries: a cut after position t starts a new segment
      cuts = np.asarray(jax.random.bernoulli(k_cuts, 0.1, (8, 32)))
      rows["segment_ids"] = np.cumsum(cuts, axis=1).astype(np.int32)
    batches.append(rows)
  return batches


def _assert_same_training(a, b):
  losses_a, params_a = a
  losses_b, params_b = b
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), params_a, params_b)


@pytest.fixture(scope="module")
def one_device_run():
  return _train(CONFIG, jax.devices()[:1], _batches(1, 3, segment_ids=True))


@pytest.mark.parametrize(
  "mesh",
  [MeshConfig(data=2, fsdp=4, tensor=1), MeshConfig(data=1, fsdp=4, tensor=2)],
  ids=lambda m: f"{m.data}x{m.fsdp}x{m.tensor}",
)
def test_sharded_training_matches_one_device(one_device_run, mesh):
  config = dataclasses.replace(CONFIG, mesh=mesh)
  losses, _ = one_device_run
  assert losses[-1] < losses[0]  # the run trains, so equal losses are not trivially equal
  _assert_same_training(_train(config, jax.devices(), _batches(1, 3, segment_ids=True)), one_device_run)


def test_gradient_accumulation_matches_the_full_batch(one_device_run):
  config = dataclasses.replace(CONFIG, micro_batch_size=2)  # 2 rows x 4 microbatches x 1 device
  _assert_same_training(_train(config, jax.devices()[:1], _batches(1, 3, segment_ids=True)), one_device_run)


def test_train_step_equals_a_textbook_step(one_device_run):
  """Fused head + loss, clipping outside the optimizer chain and the select-based NaN guard
  leave the maths of the plain recipe: logits -> mean cross-entropy + z-loss -> grad ->
  optax clip_by_global_norm -> AdamW."""
  graphdef, params = nnx.split(
    MPTForCausalLM(CONFIG.model, rngs=nnx.Rngs(params=jax.random.split(jax.random.key(CONFIG.seed))[0]))
  )
  tx = optax.chain(
    optax.clip_by_global_norm(CONFIG.optim.grad_clip_norm), make_optimizer(CONFIG.optim, CONFIG.steps)[0]
  )

  def objective(params, rows):
    ids, segments = rows["input_ids"], rows["segment_ids"]
    ce, lse = loss.cross_entropy(nnx.merge(graphdef, params)(ids, segments), jnp.roll(ids, -1, axis=1))
    _, mask = loss.next_token_targets(ids, segments)
    tokens = mask.sum()
    return (jnp.sum(mask * ce) + CONFIG.z_loss * jnp.sum(mask * lse**2)) / tokens, jnp.sum(mask * ce) / tokens

  @jax.jit
  def step(params, opt_state, rows):
    (_, ce), grads = jax.value_and_grad(objective, has_aux=True)(params, rows)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, optax.tree.norm(grads)

  opt_state, losses, norms = tx.init(params), [], []
  for rows in _batches(1, 3, segment_ids=True):
    params, opt_state, ce, norm = step(params, opt_state, rows)
    losses.append(float(ce))
    norms.append(float(norm))
  assert max(norms) > CONFIG.optim.grad_clip_norm  # clipping took part
  _assert_same_training(one_device_run, (np.array(losses), jax.tree.map(np.asarray, params)))


def test_global_batch_must_factor_into_micro_batch_accumulation_and_data_parallel():
  assert trainer.grad_accum_steps(TrainConfig(global_batch_size=2200, micro_batch_size=11), 8) == 25
  assert trainer.grad_accum_steps(TrainConfig(global_batch_size=2200, micro_batch_size=5), 440) == 1
  with pytest.raises(ValueError, match=r"global_batch_size \(2200\) must be micro_batch_size \(4\) x grad_accum"):
    trainer.grad_accum_steps(TrainConfig(global_batch_size=2200, micro_batch_size=4), 8)


def test_mfu_uses_llm_foundry_flop_count_for_the_1b_preset():
  config = MPTConfig()
  abstract = jax.eval_shape(lambda: nnx.state(MPTForCausalLM(config, rngs=nnx.Rngs(0))))
  n_params = sum(x.size for x in jax.tree.leaves(abstract))
  assert n_params == 1_311_442_944
  per_token = metrics.flops_per_token(n_params, config.n_layers, config.d_model, 2048)
  np.testing.assert_allclose(per_token, 9.0766e9, rtol=1e-4)
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
  assert metrics.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert metrics.peak_flops("cpu") is None
  np.testing.assert_allclose(
    metrics.mfu(49_100, per_token, 1, 989.5e12), 0.45, rtol=2e-3
  )  # 45% MFU ~ 49.1k tok/s on an H100
  assert metrics.mfu(49_100, per_token, 1, None) is None
