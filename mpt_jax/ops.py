"""The model's memory-bound ops, with backward passes written out: LayerNorm and exact GELU.

Automatic differentiation of these ops is correct but slow on a GPU. For LayerNorm it saves
(or rematerializes) float32 copies of every input and splits the backward into many small
fusions; for GELU, ``jax.nn.gelu(approximate=False)`` goes through ``erfc`` evaluated in
the input dtype, whose XLA expansion (an exponential, two divisions and two polynomials)
makes both passes compute-bound: on one H200 the MPT-1B step spent 24 ms in GELU and about
29 ms in LayerNorm, three times what reading and writing their tensors takes
(docs/performance.md). Here each op saves only its bf16 input (and, for LayerNorm, two
float32 numbers per row), computes in float32 and has a backward that XLA fuses into one
or two passes over memory. The functions equal their textbook definitions to float32
rounding (tests/test_ops.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mpt_jax import pallas_layer_norm
from mpt_jax.attention import MeshAxes, axes_dividing
from mpt_jax.config import NORM_IMPLS

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def layer_norm(x, scale, eps: float, dtype, impl: str = "auto", batch_axes: tuple[str, ...] = MeshAxes().batch):
  """LayerNorm over the last axis with a scale and no bias; statistics in float32.

  Args:
    x: [..., D] in any float dtype.
    scale: [D].
    eps: added to the variance.
    dtype: output dtype (the compute dtype for MPT's low-precision LayerNorm).
    impl: "xla"; "pallas" (mpt_jax.pallas_layer_norm; interpreted without a GPU); "auto":
      pallas on GPUs for the widths it takes, xla otherwise.
    batch_axes: under a mesh, the mesh axes that together split x's leading (batch) axis;
      the kernels run per device on those rows (the model passes mpt_jax.sharding's).

  Returns:
    [..., D] in ``dtype``.
  """
  return _layer_norm_fwd(x, scale, eps, dtype, impl, batch_axes)[0]


def layer_norm_parts(x, scales, eps: float, impl: str = "auto"):
  """x [..., P, D] with parts g < len(scales) replaced by ``layer_norm(x[..., g, :], scales[g])``, in x's dtype.

  For decoding, no gradient: the query and key LayerNorms of a fused QKV product [..., 3, D]
  in one Pallas kernel that reads and writes them where they lie, where ``layer_norm`` would
  need q and k sliced into buffers of their own first (two copy kernels, then two
  LayerNorms). The kernel where ``layer_norm`` takes its kernels, outside a mesh; elsewhere
  ``layer_norm`` (impl "xla") on each part.
  """
  if _kernels(x, impl) and jax.sharding.get_abstract_mesh().empty:
    return pallas_layer_norm.normalize_parts(x, tuple(scales), eps=eps, interpret=_interpret())
  normalized = [layer_norm(x[..., g, :], scale, eps, x.dtype, "xla") for g, scale in enumerate(scales)]
  return jnp.concatenate([jnp.stack(normalized, axis=-2), x[..., len(scales) :, :]], axis=-2)


@jax.named_scope("layer_norm")
def _layer_norm_fwd(x, scale, eps, dtype, impl, batch_axes):
  if _kernels(x, impl):
    forward = functools.partial(pallas_layer_norm.forward, eps=eps, dtype=dtype, interpret=_interpret())
    y, mean, rstd = _per_device(forward, x, scale, batch_axes=batch_axes, outputs=(x.ndim, x.ndim - 1, x.ndim - 1))
    return y, (x, scale, mean[..., None], rstd[..., None])
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)  # [..., 1]
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  y = ((x32 - mean) * rstd * scale.astype(jnp.float32)).astype(dtype)
  return y, (x, scale, mean, rstd)


@jax.named_scope("layer_norm")
def _layer_norm_bwd(eps, dtype, impl, batch_axes, residuals, dy):
  """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale; dscale = sum(dy * x_hat)."""
  del eps, dtype
  x, scale, mean, rstd = residuals
  if _kernels(x, impl):

    def backward(x, scale, mean, rstd, dy):
      return pallas_layer_norm.backward(x, scale, mean[..., 0], rstd[..., 0], dy, interpret=_interpret())

    return _per_device(backward, x, scale, mean, rstd, dy, batch_axes=batch_axes, outputs=(x.ndim, None))
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dy32 = dy.astype(jnp.float32)
  g = dy32 * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
  dscale = jnp.sum(dy32 * x_hat, axis=tuple(range(x.ndim - 1)))
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


def _kernels(x, impl: str) -> bool:
  """Whether this LayerNorm runs the Pallas kernels (see layer_norm's ``impl``)."""
  if impl not in NORM_IMPLS:
    raise ValueError(f"unknown LayerNorm impl {impl!r}; expected one of {NORM_IMPLS}")
  if impl == "xla" or (impl == "auto" and jax.default_backend() != "gpu"):
    return False
  supported = pallas_layer_norm.supports(x.shape[-1])
  if impl == "pallas" and not supported:
    raise ValueError(
      f"LayerNorm impl='pallas' needs a power-of-two width in [16, {pallas_layer_norm.MAX_WIDTH}]; got {x.shape=}"
    )
  return supported


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _per_device(kernel, x, scale, *per_row, batch_axes: tuple[str, ...], outputs: tuple[int | None, ...]):
  """``kernel(x, scale, *per_row)`` on each device's rows under a mesh (a pallas_call is opaque to
  the partitioner), split as the batch is (over ``batch_axes``).

  x and ``per_row`` arrays have the batch as leading axis, scale is whole. ``outputs`` gives
  each output's rank when it is per row, or None for a [D] output summed over all rows.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(x, scale, *per_row)
  axes = axes_dividing(mesh, batch_axes, x.shape[0]) or None
  rows = lambda ndim: PartitionSpec(axes, *(None,) * (ndim - 1))  # noqa: E731

  def local(*args):
    outs = kernel(*args)
    return tuple(out if ndim or axes is None else jax.lax.psum(out, axes) for out, ndim in zip(outs, outputs))

  # check_vma=False: the Pallas call does not track varying manual axes (as in mpt_jax.attention).
  return jax.shard_map(
    local,
    in_specs=(rows(x.ndim), PartitionSpec(), *(rows(a.ndim) for a in per_row)),
    out_specs=tuple(rows(ndim) if ndim else PartitionSpec() for ndim in outputs),
    check_vma=False,
  )(x, scale, *per_row)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def exact_gelu(x):
  """GELU with the Gaussian CDF, 0.5 * x * (1 + erf(x / sqrt(2))), in float32; returns x's dtype.

  PyTorch's ``nn.GELU()`` (what MPT uses) computes exactly this, in float32 for bf16 inputs.
  """
  return _gelu_fwd(x)[0]


@jax.named_scope("gelu")
def _gelu_fwd(x):
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype), x


@jax.named_scope("gelu")
def _gelu_bwd(x, dy):
  """d gelu / dx = Phi(x) + x * phi(x): the Gaussian CDF plus x times its density."""
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * jnp.square(x32)) * _INV_SQRT_2PI
  return ((dy.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


exact_gelu.defvjp(_gelu_fwd, _gelu_bwd)
