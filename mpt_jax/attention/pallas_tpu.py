"""Flash attention with in-kernel ALiBi: Pallas kernels on the TPU (Mosaic) backend.

FlashAttention-2 (Dao, 2023, arXiv:2307.08691) laid out for a TPU grid, as jax's TPU flash
attention does: a grid (batch, head, query block, key block) whose last axis is a sequential
loop, the online-softmax state in VMEM scratch, the output written at the last key block.
ALiBi is computed on each tile from the head's slope (SMEM) and the tile's positions, never
stored as a [T, T] array (jax's TPU kernel takes a materialized [B, N, T, T] bias; splash
attention takes masks only). Wholly masked tiles, above the causal diagonal or pairing two
packed documents, are neither loaded nor computed (pallas_tpu_tiles.plan). The backward
(pallas_tpu_vjp.py) recomputes the probabilities from the saved logsumexp.

Any length: sequences are padded inside to whole blocks and the padding masked. Semantics
are exactly those of ``reference.attention`` with T == S. Off TPU the kernels run in the
Pallas TPU interpreter (tests on CPU); what only a real TPU checks is listed in README.md.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.attention import flash, pallas_tpu_vjp
from mpt_jax.attention import pallas_tpu_tiles as tiles

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward (``block_q``/``block_k``), dK/dV (``*_dkv``) and dQ (``*_dq``) kernels.

  Multiples of 128: a query block is the lane dimension of the row statistics in the dK/dV
  kernel and a key block that of the score tiles. A block longer than the (128-rounded)
  sequence is shortened to it. Per-generation defaults: ``for_device``.
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < tiles.LANES or value % tiles.LANES:
        raise ValueError(f"BlockSizes.{field.name} must be a positive multiple of {tiles.LANES}, got {value!r}")

  def fit(self, seq_len: int) -> "BlockSizes":
    """These sizes with every block shortened to the sequence rounded up to 128."""
    longest = pl.cdiv(seq_len, tiles.LANES) * tiles.LANES
    return dataclasses.replace(self, **{f.name: min(getattr(self, f.name), longest) for f in dataclasses.fields(self)})

  def padded_len(self, seq_len: int) -> int:
    """The sequence length padded to a whole number of every block."""
    multiple = math.lcm(*(getattr(self, f.name) for f in dataclasses.fields(self)))
    return pl.cdiv(seq_len, multiple) * multiple

  @classmethod
  def for_device(cls, device_kind: str | None = None) -> "BlockSizes":
    """Defaults for a TPU generation (``jax.devices()[0].device_kind``), not yet tuned on hardware.

    Budget: Mosaic's default scoped VMEM (16 MiB on v4/v5e/v5p, 32 MiB on v6e) must hold the
    double-buffered q/k/v/dO blocks, the float32 [block_q, block_k] score and probability
    tiles (the largest terms: 1 MiB each at 512 x 512) and the float32 accumulators; blocks
    are multiples of the MXU edge (128 on v4/v5e/v5p, 256 on v6e). Longer query blocks
    reread keys and values fewer times (bytes ~ T^2 H / block_q), which matters most where
    HBM is slowest per FLOP (v5e: 197 TF/s over 819 GB/s). The backward keeps smaller tiles:
    it holds about twice as many float32 [block_q, block_k] tiles live.
    """
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    for name, sizes in _GENERATIONS:
      if name in kind:
        return sizes
    return cls()


_GENERATIONS = (
  # v6e (Trillium), "TPU v6 lite": 256x256 MXUs, 32 MiB scoped VMEM: 1024x512 forward tiles (2 MiB scores).
  ("v6", BlockSizes(block_q=1024, block_k=512, block_q_dkv=512, block_k_dkv=512, block_q_dq=512, block_k_dq=512)),
  # v5e, "TPU v5 lite": 128x128 MXUs, 128 MiB VMEM (16 MiB scoped), the lowest bandwidth per FLOP:
  # long query blocks in the forward and the dQ kernel, to reread keys/values less.
  ("v5 lite", BlockSizes(block_q=1024, block_k=512, block_q_dkv=512, block_k_dkv=512, block_q_dq=1024, block_k_dq=256)),
  # v5p, "TPU v5": 128x128 MXUs, 2.8 TB/s HBM: square 512 tiles are compute-bound already.
  ("v5", BlockSizes(block_q=512, block_k=512, block_q_dkv=512, block_k_dkv=512, block_q_dq=512, block_k_dq=512)),
  # v4: 128x128 MXUs, 32 MiB VMEM (16 MiB scoped), 1.2 TB/s: 512 x 512 forward, 512 x 256 backward.
  ("v4", BlockSizes(block_q=512, block_k=512, block_q_dkv=256, block_k_dkv=512, block_q_dq=512, block_k_dq=256)),
)


def supports(q, k) -> bool:
  """Whether flash_attention takes these shapes: self-attention (T == S), head_dim <= 256."""
  return q.shape[1] == k.shape[1] and q.shape[-1] <= MAX_HEAD_DIM


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, slopes, segment_ids=None, causal=True, scale=None, block_sizes=None, interpret=False):
  """ALiBi flash attention on TPU; the same function as ``reference.attention`` with T == S.

  Args:
    q, k, v: [B, T, N, H], all float32 or all bfloat16; H <= 256, any T.
    slopes: [N] ALiBi slopes.
    segment_ids: optional int [B, T]; tokens attend only within their own segment.
    causal: mask keys after the query (and use the causal ALiBi form).
    scale: softmax scale, a Python float; defaults to 1/sqrt(H).
    block_sizes: a ``BlockSizes``; None for ``BlockSizes.for_device()``.
    interpret: run the kernels in the Pallas TPU interpreter (any backend, slow).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  flash.check_inputs(
    q,
    k,
    v,
    slopes,
    segment_ids,
    scale,
    block_sizes,
    block_sizes_type=BlockSizes,
    head_dim_ok=lambda h: h <= MAX_HEAD_DIM,
    head_dim_rule=f"<= {MAX_HEAD_DIM}",
  )
  seq_len, head_dim = q.shape[1], q.shape[3]
  blocks = (block_sizes or (BlockSizes() if interpret else BlockSizes.for_device())).fit(seq_len)
  padded_len = blocks.padded_len(seq_len)
  statics = _Statics(
    causal=causal,
    scale=head_dim**-0.5 if scale is None else float(scale),
    block_sizes=blocks,
    seq_len=seq_len,
    interpret=interpret,
  )
  # [B, N, T, H], padded: each head's rows are then a contiguous [T, H] matrix whose (8, 128)
  # tiles the kernels' BlockSpecs cut directly. The pads and transposes are XLA ops outside
  # the custom_vjp, so autodiff slices and transposes the gradients back.
  pad = ((0, 0), (0, 0), (0, padded_len - seq_len), (0, 0))
  q, k, v = (jnp.pad(x.transpose(0, 2, 1, 3), pad) for x in (q, k, v))
  if segment_ids is not None:
    # Padding repeats the last document, so a padded query block still has keys to visit.
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)), mode="edge")
  out = _attention(q, k, v, jnp.asarray(slopes, jnp.float32), segment_ids, statics=statics)
  return out[:, :, :seq_len].transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class _Statics:
  """Everything static about one call: the forward takes it whole, the backward its fields by name."""

  causal: bool
  scale: float
  block_sizes: BlockSizes
  seq_len: int  # unpadded
  interpret: bool


def _forward(q, k, v, slopes, segment_ids, statics: _Statics):
  """Runs the forward kernel on padded [B, N, T, H]; returns the output and the logsumexp [B, N, T]."""
  batch, heads, padded_len, head_dim = q.shape
  block_q, block_k = statics.block_sizes.block_q, statics.block_sizes.block_k
  num_q, num_k = padded_len // block_q, padded_len // block_k
  block_plan = tiles.plan(
    segment_ids,
    batch=batch,
    padded_len=padded_len,
    seq_len=statics.seq_len,
    block_q=block_q,
    block_k=block_k,
    causal=statics.causal,
    outer="q",
  )

  def kv_block(b, n, i, j, codes, lo, hi):
    return b, n, tiles.clamp(j, lo, hi, b * num_q + i), 0

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j, *_: (b, n, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_block)
  in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec(memory_space=pltpu.SMEM)]
  args = [q, k, v, slopes]
  if segment_ids is not None:
    in_specs += [
      pl.BlockSpec((None, block_q, tiles.LANES), lambda b, n, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, tiles.SUBLANES, block_k), lambda b, n, i, j, *p: (b, 0, kv_block(b, n, i, j, *p)[2])),
    ]
    args += tiles.segment_layouts(segment_ids)
  stats_spec = pl.BlockSpec((None, None, block_q, tiles.LANES), lambda b, n, i, j, *_: (b, n, i, 0))
  out, lse = pl.pallas_call(
    functools.partial(
      _forward_kernel,
      causal=statics.causal,
      scale=statics.scale,
      seq_len=statics.seq_len,
      num_q_blocks=num_q,
      has_segments=segment_ids is not None,
    ),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, num_q, num_k),
      in_specs=in_specs,
      out_specs=[q_spec, stats_spec],
      scratch_shapes=[
        pltpu.VMEM((block_q, tiles.LANES), jnp.float32),  # running row max
        pltpu.VMEM((block_q, tiles.LANES), jnp.float32),  # running row sum
        pltpu.VMEM((block_q, head_dim), jnp.float32),  # unnormalised output
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, padded_len, tiles.LANES), jnp.float32),
    ],
    compiler_params=tiles.compiler_params(3),
    interpret=tiles.interpret_params(statics.interpret),
    name="alibi_flash_forward_tpu",
  )(*block_plan, *args)
  return out, lse[..., 0]


def _forward_kernel(
  codes_ref,
  lo_ref,
  hi_ref,
  q_ref,
  k_ref,
  v_ref,
  slopes_ref,
  *refs,
  causal: bool,
  scale: float,
  seq_len: int,
  num_q_blocks: int,
  has_segments: bool,
):
  if has_segments:
    q_segment_ref, k_segment_ref, out_ref, lse_ref, max_ref, sum_ref, acc_ref = refs
  else:
    (out_ref, lse_ref, max_ref, sum_ref, acc_ref), q_segment_ref, k_segment_ref = refs, None, None
  b, n, i, j = (pl.program_id(axis) for axis in range(4))
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  code = codes_ref[(b * num_q_blocks + i) * pl.num_programs(3) + j]

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = tiles.scores(
      tiles.dot(q, k, trans_b=True),
      slope=slopes_ref[n],
      q_start=i * block_q,
      k_start=j * block_k,
      q_segment=q_segment_ref[:, :1] if has_segments else None,
      k_segment=k_segment_ref[:1, :] if has_segments else None,
      scale=scale,
      causal=causal,
      masked=masked,
      seq_len=seq_len,
    )  # [block_q, block_k]
    # Online softmax (FlashAttention-2 §3.1.1): the output stays unnormalised and the running
    # sums are rescaled whenever the row maximum grows.
    row_max = max_ref[...]
    new_max = jnp.maximum(row_max, s.max(axis=1, keepdims=True))  # [block_q, 128]
    rescale = jnp.exp(row_max - new_max)
    p = jnp.exp(s - new_max[:, :1])
    sum_ref[...] = sum_ref[...] * rescale + p.sum(axis=1, keepdims=True)
    max_ref[...] = new_max
    acc_ref[...] = acc_ref[...] * rescale[:, :1] + tiles.dot(p.astype(v.dtype), v)

  pl.when(code == tiles.FULL)(lambda: visit(masked=False))
  pl.when(code == tiles.MASKED)(lambda: visit(masked=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    # A query block that visited nothing (only padding does) stores zeros and an infinite
    # logsumexp, so its probabilities in the backward are exactly zero.
    row_sum = sum_ref[...]
    empty = row_sum == 0
    out_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, row_sum)[:, :1]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, max_ref[...] + jnp.log(jnp.where(empty, 1.0, row_sum)))


_attention = flash.attention_with_vjp(_forward, pallas_tpu_vjp.backward)
