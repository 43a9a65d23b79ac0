"""Attention speed on one GPU: the Pallas ALiBi flash kernels against XLA and cuDNN (issues 4, 11).

  python benchmarks/attention.py                    # check ours against the reference, then time
  python benchmarks/attention.py --sweep mosaic_gpu # also time candidate BlockSizes of one kernel family

Ours are the Hopper kernels (pallas_mosaic_gpu.py; skipped on other GPUs) and the Triton
ones (pallas_triton.py), each timed with its default or swept BlockSizes.

Shape and FLOP count of the project's attention baselines: bf16, B=8, T=2048, N=16, H=128,
causal; forward 4*B*N*T^2*H/2 FLOPs, forward+backward 3.5x that. Packed rows are counted
at the same FLOPs, so their TF/s compare times. Each time is the median over samples of a
few back-to-back calls on rotating inputs, after warm-up, ended by block_until_ready.
A sample's dispatch and final synchronization leave the GPU idle ~60 us on an H200; 16
calls per sample spread that over the calls (with 4 it added ~15% to every row:
benchmarks/RESULTS.md).
"""

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mpt_jax.alibi import alibi_slopes  # noqa: E402
from mpt_jax.attention import dot_product_attention, pallas_mosaic_gpu, pallas_triton, reference  # noqa: E402

BATCH, SEQ, HEADS, HEAD_DIM = 8, 2048, 16, 128
PACKED_DOCS = 4
FWD_FLOPS = 4 * BATCH * HEADS * SEQ * SEQ * HEAD_DIM / 2
FWD_BWD_FLOPS = 3.5 * FWD_FLOPS
INPUT_SETS = 3  # rotating inputs, so no call reuses the last one's data from L2
SAMPLES, CALLS_PER_SAMPLE = 10, 16
# Relative L2 error bounds for bf16 inputs against the float32 reference (tests/test_attention.py).
OUT_TOL, GRAD_TOL = 1e-2, 2e-2


def make_inputs(seed: int):
  """INPUT_SETS tuples of bf16 (q, k, v, d_out), [B, T, N, H] each."""
  keys = jax.random.split(jax.random.key(seed), 4 * INPUT_SETS)
  shape = (BATCH, SEQ, HEADS, HEAD_DIM)
  arrays = [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]
  return [tuple(arrays[4 * i : 4 * i + 4]) for i in range(INPUT_SETS)]


def packed_segment_ids():
  """PACKED_DOCS equal documents per row."""
  return jnp.broadcast_to(jnp.repeat(jnp.arange(PACKED_DOCS, dtype=jnp.int32), SEQ // PACKED_DOCS), (BATCH, SEQ))


# Our kernel families: name -> module with flash_attention and BlockSizes.
KERNELS = {"mosaic_gpu": pallas_mosaic_gpu, "triton": pallas_triton}


def implementations(block_sizes):
  """name -> attend(q, k, v); each causal with ALiBi unless the name says otherwise.

  ``block_sizes``: kernel family -> its BlockSizes, for the families that run here.
  """
  slopes = alibi_slopes(HEADS)
  packed = packed_segment_ids()
  cudnn = functools.partial(dot_product_attention, slopes=slopes, impl="cudnn")
  ours = {}
  for family, sizes in block_sizes.items():
    attend = functools.partial(KERNELS[family].flash_attention, slopes=slopes, block_sizes=sizes)
    ours[f"ours ({family})"] = attend
    ours[f"ours ({family}), {PACKED_DOCS} packed docs"] = functools.partial(attend, segment_ids=packed)
    if family == "mosaic_gpu":  # the backward's fallback: the dQ kernel recomputes dS (no workspace)
      recomputing = dataclasses.replace(sizes, max_ds_bytes=0)
      ours[f"ours ({family}), dS recomputed"] = functools.partial(attend, block_sizes=recomputing)
  return {
    **ours,
    "XLA reference": functools.partial(reference.attention, slopes=slopes),
    "cuDNN, ALiBi as bias": cudnn,
    f"cuDNN, ALiBi bias, {PACKED_DOCS} docs": functools.partial(cudnn, segment_ids=packed),
    "cuDNN, no ALiBi": functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"),
  }


def forward_and_backward(attend):
  """Jitted forward, and forward+backward (jax.vjp with the given cotangent)."""
  forward = jax.jit(lambda q, k, v, d_out: attend(q, k, v))
  both = jax.jit(lambda q, k, v, d_out: jax.vjp(attend, q, k, v)[1](d_out))
  return forward, both


def median_seconds(fn, input_sets) -> float:
  for inputs in input_sets:  # compile and warm up
    jax.block_until_ready(fn(*inputs))
  samples = []
  for s in range(SAMPLES):
    start = time.perf_counter()
    for c in range(CALLS_PER_SAMPLE):
      out = fn(*input_sets[(s * CALLS_PER_SAMPLE + c) % len(input_sets)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / CALLS_PER_SAMPLE)
  return float(np.median(samples))


def check(family: str, block_sizes, inputs) -> None:
  """One kernel family's kernels (bf16) against the reference in float32 at HIGHEST on the same upcast inputs."""
  q, k, v, d_out = inputs
  slopes = alibi_slopes(HEADS)
  for segment_ids in (None, packed_segment_ids()):
    ours = functools.partial(
      KERNELS[family].flash_attention, slopes=slopes, segment_ids=segment_ids, block_sizes=block_sizes
    )
    ref = functools.partial(
      reference.attention, slopes=slopes, segment_ids=segment_ids, precision=jax.lax.Precision.HIGHEST
    )
    out, grads = _out_and_grads(ours, q, k, v, d_out)
    ref_out, ref_grads = _out_and_grads(ref, *(x.astype(jnp.float32) for x in (q, k, v, d_out)))
    errors = {
      name: _rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads))
    }
    label = f"{family}, " + ("unpacked" if segment_ids is None else f"{PACKED_DOCS} packed docs")
    print(f"check vs reference ({label}): " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()), flush=True)
    bounds = {"out": OUT_TOL, "dq": GRAD_TOL, "dk": GRAD_TOL, "dv": GRAD_TOL}
    failed = [n for n, e in errors.items() if not e < bounds[n]]
    if failed:
      raise SystemExit(f"ours differs from the reference in {failed} ({label})")


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(attend, q, k, v, d_out):
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(d_out)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def table(block_sizes, input_sets) -> None:
  print(f"\n{'implementation':40s} {'fwd ms':>8s} {'fwd TF/s':>9s} {'fwd+bwd ms':>11s} {'fwd+bwd TF/s':>13s}")
  for name, attend in implementations(block_sizes).items():
    forward, both = forward_and_backward(attend)
    t_fwd, t_both = median_seconds(forward, input_sets), median_seconds(both, input_sets)
    print(
      f"{name:40s} {t_fwd * 1e3:8.3f} {FWD_FLOPS / t_fwd / 1e12:9.1f} {t_both * 1e3:11.3f} "
      f"{FWD_BWD_FLOPS / t_both / 1e12:13.1f}",
      flush=True,
    )


# Candidate tilings per kernel family and kernel: (kernel, BlockSizes field suffix, timed
# pass (0 forward, 1 forward+backward), field names, candidate values).
SWEEPS = {
  "triton": [
    (
      "forward",
      "",
      0,
      ("block_q", "block_k", "num_warps", "num_stages"),
      [(bq, bk, w, s) for bq in (64, 128) for bk in (32, 64, 128) for w, s in ((4, 3), (8, 2), (8, 3), (8, 4))],
    ),
    (
      "dK/dV",
      "_dkv",
      1,
      ("block_q", "block_k", "num_warps", "num_stages"),
      [
        (bq, bk, w, s)
        for bq, bk in ((32, 64), (32, 128), (64, 64), (64, 128), (128, 64))
        for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))
      ],
    ),
    (
      "dQ",
      "_dq",
      1,
      ("block_q", "block_k", "num_warps", "num_stages"),
      [
        (bq, bk, w, s)
        for bq, bk in ((64, 64), (128, 32), (128, 64), (64, 128))
        for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))
      ],
    ),
  ],
  "mosaic_gpu": [
    (
      "forward",
      "",
      0,
      ("block_q", "block_k", "stages"),
      [(64, 64, 2), (64, 64, 3), (64, 64, 4), (64, 128, 2), (64, 128, 3)],
    ),
    ("dK/dV", "_dkv", 1, ("block_q", "block_k", "stages"), [(64, 64, 2), (64, 64, 3), (128, 64, 2)]),
    ("dQ from stored dS", "_dq_from_ds", 1, ("stages",), [(2,), (3,), (4,), (6,)]),
  ],
}


def sweep(family: str, base, input_sets):
  """Times each kernel's candidates with the other kernels at ``base``; returns the best mix."""
  slopes = alibi_slopes(HEADS)
  best = {}
  for kernel, suffix, which, names, candidates in SWEEPS[family]:
    print(f"\nsweep {family} {kernel}: {', '.join(names)} -> {('fwd', 'fwd+bwd')[which]} ms", flush=True)
    results = []
    for values in candidates:
      fields = {f"{name}{suffix}": value for name, value in zip(names, values)}
      label = " ".join(f"{value!s:>5}" for value in values)
      try:
        sizes = dataclasses.replace(base, **fields)
        attend = functools.partial(KERNELS[family].flash_attention, slopes=slopes, block_sizes=sizes)
        seconds = median_seconds(forward_and_backward(attend)[which], input_sets)
      except Exception as e:  # a tiling can exceed shared memory or registers: report, go on
        print(f"  {label}  failed: {str(e).splitlines()[0][:100]}", flush=True)
        continue
      results.append((seconds, fields))
      print(f"  {label}  {seconds * 1e3:.3f}", flush=True)
    seconds, best[kernel] = min(results, key=lambda r: r[0])
    print(f"best {kernel}: {best[kernel]} ({seconds * 1e3:.3f} ms)", flush=True)
  return dataclasses.replace(base, **{k: v for fields in best.values() for k, v in fields.items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", choices=tuple(KERNELS), help="time candidate BlockSizes of this kernel family")
  parser.add_argument("--profile_dir", type=pathlib.Path, help="also trace each of our kernels' forward+backward here")
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"this benchmark needs a GPU; found {device}")
  families = [f for f in KERNELS if f != "mosaic_gpu" or pallas_mosaic_gpu.on_hopper()]
  print(
    f"device: {device.device_kind}, jax {jax.__version__}, shape B={BATCH} T={SEQ} N={HEADS} H={HEAD_DIM} bf16 causal",
    flush=True,
  )
  input_sets = make_inputs(0)
  block_sizes = {family: KERNELS[family].BlockSizes() for family in families}
  for family in families:
    check(family, block_sizes[family], input_sets[0])
  if args.sweep in block_sizes:
    block_sizes[args.sweep] = sweep(args.sweep, block_sizes[args.sweep], input_sets)
    check(args.sweep, block_sizes[args.sweep], input_sets[0])
  for family, sizes in block_sizes.items():
    print(f"block sizes ({family}): {sizes}", flush=True)
  table(block_sizes, input_sets)
  if args.profile_dir:
    profile(block_sizes, input_sets, args.profile_dir)


def profile(block_sizes, input_sets, log_dir: pathlib.Path) -> None:
  """A jax.profiler trace of a few forward+backward calls of each of our kernel families, one folder each."""
  attends = implementations(block_sizes)
  for family in block_sizes:
    _, both = forward_and_backward(attends[f"ours ({family})"])
    jax.block_until_ready(both(*input_sets[0]))  # compiled and warm
    with jax.profiler.trace(str(log_dir / family)):
      for inputs in input_sets:
        jax.block_until_ready(both(*inputs))
    print(f"trace of ours ({family}): {log_dir / family}", flush=True)


if __name__ == "__main__":
  main()
