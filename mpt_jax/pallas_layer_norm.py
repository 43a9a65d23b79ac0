"""LayerNorm forward and backward as Pallas kernels on the Triton backend: one pass over memory each.

XLA fuses a LayerNorm backward into three passes: the row reductions (mean of g and of
g * x_hat), the column reduction for d scale and the elementwise dx cannot share a fusion,
so x and dy are read three times and x_hat is materialized in float32 between them (21 ms
of the MPT-1B step on an H200, for 97 LayerNorms: docs/performance.md). Here each program
owns ``block_rows`` whole rows: the forward reads x once and writes y with the row's mean
and 1/std; the backward reads x and dy once, writes dx, and adds its rows' share of
d scale into one float32 row per program, which XLA sums afterwards (a [rows /
block_rows, D] array, 1/(2 * block_rows) of dy's size).

Rows are the flattened leading axes, any number of them: programs take BLOCK_ROWS rows, or
as many as divide the count; with few rows (a decoding step: one per sequence) one row each,
so the kernel spreads over as many SMs as there are rows, and a decoding step normalizes in
one kernel rather than XLA's two reductions and an elementwise pass. D must be a power of two
(Triton blocks), which every MPT width is. ``ops.layer_norm`` uses these kernels on GPUs and
the same maths in XLA elsewhere; ``interpret=True`` runs them in the Pallas interpreter (tests).

``normalize_parts`` is the forward for rows made of parts (the query, key and value of a
fused QKV product): it normalizes some parts in place, each with its own scale, so decoding
needs no copies of q and k sliced out first (``ops.layer_norm_parts``).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 4  # rows per program (at most): 4 x 2048 float32 values per live array fit 8 warps' registers
# Below this many programs of BLOCK_ROWS, one row per program: decoding 16 rows in 16 programs
# rather than 4 made a batch-16 MPT-1B step on an H200 4% faster (benchmarks/RESULTS.md, "Generation").
MIN_PROGRAMS = 256
NUM_WARPS = 8
MAX_WIDTH = 16384


def supports(width: int) -> bool:
  """Whether the kernels take rows of this width: a power of two in [16, MAX_WIDTH]."""
  return width & (width - 1) == 0 and 16 <= width <= MAX_WIDTH


def _block_rows(rows: int) -> int:
  """Rows per program: one where programs of BLOCK_ROWS would be fewer than MIN_PROGRAMS,
  else BLOCK_ROWS or the largest power of two below it that divides ``rows``."""
  if rows < MIN_PROGRAMS * BLOCK_ROWS:
    return 1
  return math.gcd(rows, BLOCK_ROWS)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "interpret"))
def forward(x, scale, *, eps: float, dtype, interpret: bool = False):
  """(y [..., D] in dtype, mean [...], rstd [...]) of the LayerNorm of x with scale [D]."""
  rows, width = math.prod(x.shape[:-1]), x.shape[-1]
  block_rows = _block_rows(rows)
  row_spec = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
  y, mean, rstd = pl.pallas_call(
    functools.partial(_forward_kernel, eps=eps),
    grid=(rows // block_rows,),
    in_specs=[row_spec, pl.BlockSpec((width,), lambda i: (0,))],
    out_specs=[row_spec, stat_spec, stat_spec],
    out_shape=[jax.ShapeDtypeStruct((rows, width), dtype), *[jax.ShapeDtypeStruct((rows,), jnp.float32)] * 2],
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    interpret=interpret,
    name="layer_norm_forward",
  )(x.reshape(rows, width), scale)
  return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


@functools.partial(jax.jit, static_argnames=("interpret",))
def backward(x, scale, mean, rstd, dy, *, interpret: bool = False):
  """(dx [..., D] in x's dtype, d scale [D] in scale's dtype) from the forward's mean and rstd [...]."""
  rows, width = math.prod(x.shape[:-1]), x.shape[-1]
  block_rows = _block_rows(rows)
  programs = rows // block_rows
  row_spec = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
  dx, dscale_rows = pl.pallas_call(
    _backward_kernel,
    grid=(programs,),
    in_specs=[row_spec, pl.BlockSpec((width,), lambda i: (0,)), stat_spec, stat_spec, row_spec],
    out_specs=[row_spec, pl.BlockSpec((None, width), lambda i: (i, 0))],
    out_shape=[jax.ShapeDtypeStruct((rows, width), x.dtype), jax.ShapeDtypeStruct((programs, width), jnp.float32)],
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    interpret=interpret,
    name="layer_norm_backward",
  )(x.reshape(rows, width), scale, mean.reshape(rows), rstd.reshape(rows), dy.reshape(rows, width))
  return dx.reshape(x.shape), jnp.sum(dscale_rows, axis=0).astype(scale.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def normalize_parts(x, scales, *, eps: float, interpret: bool = False):
  """x [..., P, D] with parts g < len(scales) replaced by their LayerNorm times scales[g] [D].

  Written over x (the output aliases it, so in place where x is not needed afterwards) in
  x's dtype; the other parts are left as they are. A grid of (row blocks, normalized parts).
  """
  *leading, parts, width = x.shape
  rows = math.prod(leading)
  block_rows = _block_rows(rows)
  part_spec = pl.BlockSpec((block_rows, None, width), lambda i, g: (i, g, 0))
  y = pl.pallas_call(
    functools.partial(_parts_kernel, eps=eps),
    grid=(rows // block_rows, len(scales)),
    in_specs=[part_spec, *[pl.BlockSpec((width,), lambda i, g: (0,))] * len(scales)],
    out_specs=part_spec,
    out_shape=jax.ShapeDtypeStruct((rows, parts, width), x.dtype),
    input_output_aliases={0: 0},
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    interpret=interpret,
    name="layer_norm_parts",
  )(x.reshape(rows, parts, width), *scales)
  return y.reshape(x.shape)


def _normalized(x_ref, scale, *, eps: float):
  """(LayerNorm of the rows of x_ref times scale, float32 [R, D]; mean [R]; 1/std [R])."""
  x = x_ref[...].astype(jnp.float32)  # [R, D]
  mean = jnp.mean(x, axis=1)
  centered = x - mean[:, None]
  rstd = jax.lax.rsqrt(jnp.mean(centered * centered, axis=1) + eps)
  return centered * rstd[:, None] * scale.astype(jnp.float32)[None, :], mean, rstd


def _forward_kernel(x_ref, scale_ref, y_ref, mean_ref, rstd_ref, *, eps: float):
  y, mean, rstd = _normalized(x_ref, scale_ref[...], eps=eps)
  y_ref[...] = y.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _parts_kernel(x_ref, *refs, eps: float):
  """Part ``program_id(1)`` of a block of rows: x_ref, y_ref [R, D]; refs: each part's scale [D], then y_ref."""
  *scale_refs, y_ref = refs
  part = pl.program_id(1)
  scale = scale_refs[0][...]
  for g, scale_ref in enumerate(scale_refs[1:], start=1):
    scale = jnp.where(part == g, scale_ref[...], scale)
  y_ref[...] = _normalized(x_ref, scale, eps=eps)[0].astype(y_ref.dtype)


def _backward_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dscale_ref):
  """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale; d scale += sum(dy * x_hat)."""
  rstd = rstd_ref[...][:, None]
  x_hat = (x_ref[...].astype(jnp.float32) - mean_ref[...][:, None]) * rstd  # [R, D]
  dy = dy_ref[...].astype(jnp.float32)
  g = dy * scale_ref[...].astype(jnp.float32)[None, :]
  mean_g = jnp.mean(g, axis=1)[:, None]
  mean_g_x_hat = jnp.mean(g * x_hat, axis=1)[:, None]
  dx_ref[...] = (rstd * (g - mean_g - x_hat * mean_g_x_hat)).astype(dx_ref.dtype)
  dscale_ref[...] = jnp.sum(dy * x_hat, axis=0)
