"""Decoding speed on one GPU: prefill tokens/s and decode ms per step, ours against transformers.

  python benchmarks/generate.py                  # MPT-1B bf16, batch 1 16 64, 32-token prompts, 256 new tokens
  python benchmarks/generate.py --batch_sizes 1 --new_tokens 512
  python benchmarks/generate.py --tiny           # a CPU smoke test of the same path
  python benchmarks/generate.py --batch_sizes 1 --profile_dir /tmp/decode  # and a jax.profiler trace

Both implementations decode greedily from random bfloat16 weights, with no EOS, so every row
gets all its new tokens. Per batch size each is timed on calls with max_new_tokens=1 (prefill
and one sample) and max_new_tokens=N: prefill tokens/s = batch * prompt / t1, decode ms per
step = (tN - t1) / (N - 1), a step giving each row one token; medians of --repeats after a
warm-up call. Ours is mpt_jax.generate.Generator on the MPT-1B config (QK-LN on), its two calls
sharing one compiled loop (the cache length generate() picks for N tokens). transformers is
MptForCausalLM.generate with the same sizes and QK-LN off (it has none), bfloat16, KV cache, in
the same process on the same GPU, after all of ours (its model on the GPU slowed ours).
The floor is reading every bf16 weight once per step: 2.62 GB / 4.8 TB/s = 0.55 ms on an H200.
Prints a table; writes $OUT/generate.json when $OUT is set (after every row, so a time-out keeps
what finished). Imports neither mpt_jax.data nor TensorFlow.
"""

import os
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# JAX would otherwise reserve 75% of the GPU up front and leave transformers too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import tyro  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # HBM bytes/s per device kind


@dataclasses.dataclass(frozen=True)
class Args:
  batch_sizes: tuple[int, ...] = (1, 16, 64)
  prompt_tokens: int = 32
  new_tokens: int = 256
  repeats: int = 3  # timed calls per measurement (median)
  transformers: bool = True  # also time transformers' MptForCausalLM.generate
  tiny: bool = False  # a toy MPT on whatever device there is (CPU smoke test)
  budget_s: int = 170  # rows not started within this many seconds are skipped
  profile_dir: str | None = None  # also trace one of our N-token calls per batch size (jax.profiler) here


def _configs(tiny: bool):
  """(our MPTConfig in bfloat16, the matching transformers MptConfig)."""
  import transformers

  from mpt_jax import MPTConfig

  sizes = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=512) if tiny else {}
  ours = MPTConfig(**sizes, dtype="bfloat16", param_dtype="bfloat16")  # the defaults are MPT-1B
  theirs = transformers.MptConfig(
    d_model=ours.d_model,
    n_heads=ours.n_heads,
    n_layers=ours.n_layers,
    expansion_ratio=ours.mlp_ratio,
    max_seq_len=ours.max_seq_len,
    vocab_size=ours.vocab_size,
    no_bias=True,
    use_cache=True,
    attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": False},
  )
  return ours, theirs


def _our_model(config):
  """Random bfloat16 weights (std 0.02, LayerNorm scales 1), made straight in the target dtype."""
  import jax
  import jax.numpy as jnp

  from mpt_jax.model_folder import abstract_params, model_from_params

  abstract = abstract_params(config)
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))
  make = lambda x: jnp.ones(x.shape, x.dtype) if x.ndim == 1 else 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)
  return model_from_params(config, jax.tree.map(make, abstract))


def _median_time(call, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _measure_ours(generator, batch: int, args: Args) -> dict:
  import numpy as np

  from mpt_jax.generate import CACHE_ROUNDING

  prompts = np.random.default_rng(batch).integers(
    1, generator.config.vocab_size, (batch, args.prompt_tokens), dtype=np.int32
  )
  cache_length = (
    -(-(args.prompt_tokens + args.new_tokens - 1) // CACHE_ROUNDING) * CACHE_ROUNDING
  )  # generate()'s choice for N
  run = lambda n: generator(prompts, max_new_tokens=n, temperature=0.0, cache_length=cache_length)
  start = time.perf_counter()
  out = run(args.new_tokens)  # compiles the loop both timings use
  compile_s = time.perf_counter() - start
  assert all(len(row) == args.new_tokens for row in out)
  if args.profile_dir:
    import jax

    with jax.profiler.trace(str(pathlib.Path(args.profile_dir) / f"batch{batch}")):
      run(args.new_tokens)
  return dict(
    compile_s=compile_s,
    t1=_median_time(lambda: run(1), args.repeats),
    tn=_median_time(lambda: run(args.new_tokens), args.repeats),
  )


def _measure_transformers(model, batch: int, args: Args, device) -> dict:
  import torch

  generator = torch.Generator().manual_seed(batch)
  prompts = torch.randint(1, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator).to(device)

  def run(n):
    out = model.generate(
      prompts,
      attention_mask=torch.ones_like(prompts),
      max_new_tokens=n,
      do_sample=False,
      use_cache=True,
      pad_token_id=0,
    )
    if device.type == "cuda":
      torch.cuda.synchronize()
    return out

  with torch.no_grad():
    start = time.perf_counter()
    assert run(4).shape == (batch, args.prompt_tokens + 4)  # warm-up: kernels, allocator
    warmup_s = time.perf_counter() - start
    return dict(
      compile_s=warmup_s,
      t1=_median_time(lambda: run(1), args.repeats),
      tn=_median_time(lambda: run(args.new_tokens), args.repeats),
    )


def _row(impl: str, batch: int, timing: dict, args: Args, floor_ms: float | None) -> dict:
  step_ms = 1e3 * (timing["tn"] - timing["t1"]) / (args.new_tokens - 1)
  return dict(
    impl=impl,
    batch=batch,
    status="ok",
    prefill_tokens_per_s=batch * args.prompt_tokens / timing["t1"],
    decode_ms_per_step=step_ms,
    decode_tokens_per_s=1e3 * batch / step_ms,
    x_floor=step_ms / floor_ms if floor_ms else None,
    **timing,
  )


def _table(rows: list[dict], floor_ms: float | None) -> str:
  lines = [
    f"{'impl':<13} {'batch':>5} {'prefill tok/s':>13} {'decode ms/step':>14} {'decode tok/s':>12} {'x floor':>7} {'warm-up s':>9}  status"
  ]
  for r in rows:
    if r["status"] != "ok":
      lines.append(f"{r['impl']:<13} {r['batch']:>5} {'-':>13} {'-':>14} {'-':>12} {'-':>7} {'-':>9}  {r['status']}")
      continue
    x_floor = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
    lines.append(
      f"{r['impl']:<13} {r['batch']:>5} {r['prefill_tokens_per_s']:>13,.0f} {r['decode_ms_per_step']:>14.3f} "
      f"{r['decode_tokens_per_s']:>12,.0f} {x_floor:>7} {r['compile_s']:>9.1f}  ok"
    )
  if floor_ms:
    lines.append(f"floor: every bf16 weight read once per step = {floor_ms:.3f} ms")
  return "\n".join(lines)


def _write(report: dict) -> None:
  if not os.environ.get("OUT"):
    return
  path = pathlib.Path(os.environ["OUT"]) / "generate.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  from mpt_jax.atomic import write_atomically

  write_atomically(path, json.dumps(report, indent=2))


def main(args: Args) -> dict:
  deadline = time.perf_counter() + args.budget_s
  import jax

  if not args.tiny and jax.default_backend() != "gpu":
    raise SystemExit(f"this benchmark needs a GPU (or --tiny for the CPU smoke test); found {jax.devices()[0]}")
  import torch
  import transformers

  from mpt_jax.generate import Generator
  from mpt_jax.model_folder import abstract_params

  ours_config, hf_config = _configs(args.tiny)
  device = jax.devices()[0]
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params(ours_config)))  # 1,311,442,944 for MPT-1B
  bandwidth = next((b for name, b in BANDWIDTH.items() if name in device.device_kind), None)
  floor_ms = 1e3 * 2 * n_params / bandwidth if bandwidth else None
  generator = Generator(_our_model(ours_config))
  torch_device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")

  @functools.cache  # made when first measured, after all of ours
  def transformers_model():
    torch.manual_seed(0)
    with torch.device(torch_device):  # initialized where it runs: 1.3B parameters init slowly on the host
      return transformers.MptForCausalLM(hf_config).to(torch.bfloat16).eval()

  report = dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    device=device.device_kind,
    jax=jax.__version__,
    torch=torch.__version__,
    transformers=transformers.__version__,
    args=dataclasses.asdict(args),
    n_params=n_params,
    floor_ms=floor_ms,
    rows=[],
  )
  # Ours first, before torch puts a model on the GPU: with one there, our batch-1 steps were
  # 1.10x slower in the same process (benchmarks/RESULTS.md, "Generation", sixth session).
  measures = {"mpt-jax": lambda batch: _measure_ours(generator, batch, args)}
  if args.transformers:
    measures["transformers"] = lambda batch: _measure_transformers(transformers_model(), batch, args, torch_device)
  for impl, measure in measures.items():
    for batch in args.batch_sizes:
      if time.perf_counter() > deadline:
        row = dict(impl=impl, batch=batch, status=f"skipped: over the {args.budget_s} s budget")
      else:
        row = _row(impl, batch, measure(batch), args, floor_ms)
      report["rows"].append(row)
      print(_table([row], floor_ms).splitlines()[1], flush=True)
      _write(report)
  report["rows"].sort(key=lambda row: row["batch"])  # stable: ours, then transformers, per batch
  _write(report)
  print(
    f"\n{device.device_kind}, jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
    f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, median of {args.repeats}"
  )
  print(_table(report["rows"], floor_ms))
  return report


if __name__ == "__main__":
  main(tyro.cli(Args))
