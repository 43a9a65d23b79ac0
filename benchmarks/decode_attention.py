"""Cached attention of one decoding step on a GPU: the Pallas decode kernel, split over the cache or not.

  python benchmarks/decode_attention.py                      # MPT-1B's heads; the cases below; auto and unsplit
  python benchmarks/decode_attention.py --cases 1,2048,1500 --splits auto 1 4 8 16
  python benchmarks/decode_attention.py --tiny               # a CPU smoke test (interpreted, small shapes)

A case is BATCH,CACHE_LENGTH,QUERY_POSITION; the defaults are batch 1, 16 and 64 at position
160 of a 288-position cache (the middle of benchmarks/generate.py's 256 new tokens after a
32-token prompt) and batch 1 at 1500 of 2048. Each row runs ``pallas_decode.write_and_attend``
(16 heads of 128, bf16) over LAYERS distinct caches per call, so they come from HBM as in a
decoding step rather than from L2, donated and carried from call to call as the decode loop
carries them (no copies). Times are GPU time per layer from a jax.profiler trace of CALLS calls
(benchmarks/step_profile.py): the attention kernel alone, and everything the call ran (the
split parts' combine included). ``--splits auto`` is the kernel's own choice; a number asks
for that many parts, of which whole blocks make ``parts``. Every row's output is checked
against ``decode.attention`` in float32 first. Without a GPU (``--tiny``) the kernel runs in
the Pallas interpreter and the time is wall-clock.
"""

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import step_profile  # noqa: E402 - benchmarks/ is on sys.path when this runs as a script

from mpt_jax.alibi import alibi_slopes  # noqa: E402
from mpt_jax.attention import decode, pallas_decode  # noqa: E402

HEADS, HEAD_DIM, LAYERS, CALLS = 16, 128, 24, 8
CASES = ("1,288,160", "16,288,160", "64,288,160", "1,2048,1500")
TOLERANCE = 2e-2  # bf16 output against the float32 reference


def _inputs(batch: int, cache_length: int, *, heads: int, head_dim: int, layers: int, seed: int = 0):
  """(qkv [B, 1, 3, N, H], a list of ``layers`` (k, v) caches [B, S, N, H]), bf16."""
  keys = iter(jax.random.split(jax.random.key(seed), 1 + 2 * layers))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)  # noqa: E731
  qkv = normal((batch, 1, 3, heads, head_dim))
  return qkv, [
    (normal((batch, cache_length, heads, head_dim)), normal((batch, cache_length, heads, head_dim)))
    for _ in range(layers)
  ]


def _step(splits: int | None, *, on_gpu: bool):
  """One call: every layer's cache written at ``position`` and attended; on a GPU the caches are donated."""

  @functools.partial(jax.jit, donate_argnums=1 if on_gpu else ())
  def step(qkv, caches, position):
    outs, written = [], []
    for k, v in caches:
      out, k, v = pallas_decode.write_and_attend(
        qkv, k, v, slopes=alibi_slopes(qkv.shape[3]), q_offset=position, splits=splits, interpret=not on_gpu
      )
      outs.append(out)
      written.append((k, v))
    return jnp.stack(outs), written

  return step


def _check(out, qkv, cache, position) -> float:
  """Max |out - decode.attention| over the first layer, with the cache as the kernel wrote it."""
  q = qkv[:, :, 0].astype(jnp.float32)
  expected = decode.attention(
    q, *(c.astype(jnp.float32) for c in cache), slopes=alibi_slopes(q.shape[2]), q_offset=position
  )
  return float(jnp.max(jnp.abs(out[0].astype(jnp.float32) - expected)))


def _gpu_us_per_layer(step, qkv, caches, position, *, layers: int) -> tuple[float, float]:
  """(attention kernel, whole call) GPU microseconds per layer of the compiled ``step``, from a trace of CALLS calls."""
  carry = (qkv, caches)

  def run(carry):
    _, written = step(carry[0], carry[1], position)
    return carry[0], written

  hlo = step.as_text()
  with tempfile.TemporaryDirectory() as log_dir:
    trace_file = step_profile.trace(run, carry, pathlib.Path(log_dir), steps=CALLS, compiled_text=hlo)
    summary = step_profile.summarize(trace_file, hlo, steps=CALLS)
  per_layer = lambda ms: 1e3 * ms / layers  # noqa: E731
  return per_layer(summary["buckets"].get("attention kernels", 0.0)), per_layer(sum(summary["buckets"].values()))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", nargs="+", default=list(CASES), help="BATCH,CACHE_LENGTH,QUERY_POSITION each")
  parser.add_argument("--splits", nargs="+", default=["auto", "1"], help="'auto' or a number of parts, each a row")
  parser.add_argument("--tiny", action="store_true", help="small shapes, interpreted: a CPU smoke test")
  args = parser.parse_args()
  heads, head_dim, layers = (4, 16, 2) if args.tiny else (HEADS, HEAD_DIM, LAYERS)
  on_gpu = jax.default_backend() == "gpu"
  if not (on_gpu or args.tiny):
    raise SystemExit("this benchmark needs a GPU (or --tiny for the interpreted smoke test)")
  cases = [tuple(int(x) for x in case.split(",")) for case in (["2,150,70"] if args.tiny else args.cases)]
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {heads} heads of {head_dim}, {layers} layers")
  unit = "GPU us per layer" if on_gpu else "wall us per layer (interpreted)"
  print(
    f"{'batch':>5} {'cache':>6} {'position':>8} {'splits':>6} {'parts':>5}  {unit:>30}  max |diff| vs decode.attention"
  )
  for (batch, cache_length, position), splits in ((c, s) for c in cases for s in args.splits):
    if not 0 <= position < cache_length:
      raise SystemExit(f"case {batch},{cache_length},{position}: the position must lie in the cache")
    parts = None if splits == "auto" else int(splits)
    qkv, caches = _inputs(batch, cache_length, heads=heads, head_dim=head_dim, layers=layers)
    position = jnp.full((batch,), position, jnp.int32)
    step = _step(parts, on_gpu=on_gpu).lower(qkv, caches, position).compile()  # compiled once, for every call
    out, caches = step(qkv, caches, position)  # the caches come back written
    error = _check(out, qkv, caches[0], position)
    if error > TOLERANCE:
      raise SystemExit(f"splits {splits}: the kernel differs from decode.attention by {error:.2e}")
    if on_gpu:
      kernel_us, call_us = _gpu_us_per_layer(step, qkv, caches, position, layers=layers)
      timing = f"kernel {kernel_us:7.2f}, all {call_us:7.2f}"
    else:
      start = time.perf_counter()
      jax.block_until_ready(step(qkv, caches, position))
      timing = f"{1e6 * (time.perf_counter() - start) / layers:.0f}"
    actual = pallas_decode.split_plan(batch * heads, cache_length, parts)[1]
    print(
      f"{batch:>5} {cache_length:>6} {int(position[0]):>8} {splits:>6} {actual:>5}  {timing:>30}  {error:.1e}",
      flush=True,
    )


if __name__ == "__main__":
  main()
