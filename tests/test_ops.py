"""LayerNorm and exact GELU with written-out backward passes equal their textbook definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mpt_jax import ops, pallas_layer_norm

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative L2 error


def _rel_err(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def _textbook_layer_norm(x, scale, eps):
  """float32 LayerNorm by autodiff-able jnp (the independent path for values and gradients)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 24)], ids=str)
def test_layer_norm_and_its_gradients_match_the_textbook_formula(shape, dtype):
  k_x, k_scale, k_dy = jax.random.split(jax.random.key(len(shape)), 3)
  x = (3.0 * jax.random.normal(k_x, shape) + 1.5).astype(dtype)  # an offset, so a dropped mean shows
  scale = 1.0 + 0.3 * jax.random.normal(k_scale, shape[-1:])
  dy = jax.random.normal(k_dy, shape).astype(dtype)
  y, vjp = jax.vjp(lambda x, s: ops.layer_norm(x, s, 1e-5, dtype), x, scale)
  y_ref, vjp_ref = jax.vjp(lambda x, s: _textbook_layer_norm(x, s, 1e-5), x.astype(jnp.float32), scale)
  assert y.dtype == dtype and y.shape == shape
  dx, dscale = vjp(dy)
  dx_ref, dscale_ref = vjp_ref(dy.astype(jnp.float32))
  assert dx.dtype == dtype and dscale.dtype == scale.dtype
  tolerance = TOLERANCE[dtype]
  assert _rel_err(y, y_ref) < tolerance
  assert _rel_err(dx, dx_ref) < 2 * tolerance
  assert _rel_err(dscale, dscale_ref) < 2 * tolerance


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_exact_gelu_and_its_gradient_match_torch_gelu_in_float64(dtype):
  """torch.nn.GELU() is what MPT uses; float64 makes it the exact reference."""
  k_x, k_dy = jax.random.split(jax.random.key(3))
  x = (4.0 * jax.random.normal(k_x, (6, 50))).astype(dtype)  # far into both tails
  dy = jax.random.normal(k_dy, (6, 50)).astype(dtype)
  y, vjp = jax.vjp(ops.exact_gelu, x)
  (dx,) = vjp(dy)
  x_torch = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
  y_torch = torch.nn.functional.gelu(x_torch)
  y_torch.backward(torch.tensor(np.asarray(dy, np.float64)))
  assert y.dtype == dtype and dx.dtype == dtype
  assert _rel_err(y, y_torch.detach().numpy()) < TOLERANCE[dtype]
  assert _rel_err(dx, x_torch.grad.numpy()) < TOLERANCE[dtype]


# 1024 rows: programs of BLOCK_ROWS; 1026: programs of two; 12: one row each; one row: a decoding step at batch 1.
@pytest.mark.parametrize("shape", [(4, 256, 64), (3, 342, 64), (2, 6, 64), (1, 1, 64)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_pallas_layer_norm_kernels_match_the_xla_layer_norm(dtype, shape):
  """The Pallas kernels (interpreted here) against the XLA path of the same custom VJP, for any row count."""
  k_x, k_scale, k_dy = jax.random.split(jax.random.key(5), 3)
  x = (2.0 * jax.random.normal(k_x, shape) - 0.7).astype(dtype)
  scale = 1.0 + 0.3 * jax.random.normal(k_scale, (64,))
  dy = jax.random.normal(k_dy, shape).astype(dtype)
  outputs = {}
  for impl in ("xla", "pallas"):
    y, vjp = jax.vjp(lambda x, s: ops.layer_norm(x, s, 1e-5, dtype, impl), x, scale)  # noqa: B023
    outputs[impl] = (y, *vjp(dy))
  for got, expected in zip(outputs["pallas"], outputs["xla"]):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert _rel_err(got, expected) < TOLERANCE[dtype]


def test_few_rows_take_a_program_each_to_fill_the_gpu():
  """Decoding normalizes a row per sequence: 16 rows run as 16 programs, not 4 of BLOCK_ROWS."""
  assert pallas_layer_norm._block_rows(16) == 1
  assert pallas_layer_norm._block_rows(pallas_layer_norm.MIN_PROGRAMS * pallas_layer_norm.BLOCK_ROWS) == 4
  assert pallas_layer_norm._block_rows(1026) == 2  # the largest power of two below BLOCK_ROWS that divides


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("rows", [(1, 1), (2, 3)], ids=str)  # a decoding step at batch 1; a prompt
def test_layer_norm_parts_normalizes_the_first_parts_each_with_its_scale(rows, impl):
  """The query and key LayerNorms of a fused [..., 3, D] QKV product, the value left as it is
  (the Pallas kernel interpreted here; on a GPU it writes over its input)."""
  k_x, k_q, k_k = jax.random.split(jax.random.key(7), 3)
  qkv = (2.0 * jax.random.normal(k_x, (*rows, 3, 64)) - 0.7).astype(jnp.bfloat16)
  scales = tuple(1.0 + 0.3 * jax.random.normal(key, (64,)) for key in (k_q, k_k))
  got = ops.layer_norm_parts(qkv, scales, 1e-5, impl)
  assert got.dtype == qkv.dtype and got.shape == qkv.shape
  for part, scale in enumerate(scales):
    expected = ops.layer_norm(qkv[..., part, :], scale, 1e-5, jnp.bfloat16, "xla")
    np.testing.assert_allclose(np.asarray(got[..., part, :], np.float32), np.asarray(expected, np.float32), atol=1e-2)
    assert _rel_err(got[..., part, :], expected) < TOLERANCE[jnp.bfloat16]
  np.testing.assert_array_equal(np.asarray(got[..., 2, :]), np.asarray(qkv[..., 2, :]))


def test_pallas_layer_norm_runs_per_device_under_a_mesh():
  """Under a (data, fsdp) mesh each device normalizes its rows; d scale sums over all of them."""
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py makes 8 CPU devices), got {jax.device_count()}")
  k_x, k_dy = jax.random.split(jax.random.key(6))
  x, dy = jax.random.normal(k_x, (8, 4, 32)), jax.random.normal(k_dy, (8, 4, 32))
  scale = jnp.linspace(0.5, 1.5, 32)

  def grads(impl):
    return jax.grad(lambda x, s: jnp.sum(dy * ops.layer_norm(x, s, 1e-5, jnp.float32, impl)), argnums=(0, 1))(x, scale)

  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda: grads("pallas"))()
  for got, expected in zip(sharded, grads("xla")):
    assert _rel_err(got, expected) < 1e-5


def test_pallas_layer_norm_refuses_shapes_it_does_not_take():
  with pytest.raises(ValueError, match="power-of-two width"):
    ops.layer_norm(jnp.ones((4, 40)), jnp.ones((40,)), 1e-5, jnp.float32, "pallas")
