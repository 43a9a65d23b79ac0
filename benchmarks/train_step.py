"""MPT-1B train-step throughput on one device: tokens/s, MFU and peak memory per configuration.

  python benchmarks/train_step.py                      # the default sweep on one GPU
  python benchmarks/train_step.py --batch_sizes 8 16 --remat none full save_dots --attn cudnn pallas
  python benchmarks/train_step.py --tiny               # a CPU smoke test of the same path

Each configuration (batch size x remat x attention x scan) runs in its own process, so an
out-of-memory or a crash becomes one row of the table, and the peak memory is that
configuration's own. Synthetic tokens, the real train step (mpt_jax.trainer: fp32 master
weights, bf16 compute, AdamW, clipping); tokens/s from the median step time after warm-up,
each step ended by block_until_ready; MFU as in ANCHORS.md (9.0766e9 FLOPs/token at 2048).
Results go to stdout as a table and, when $OUT is set, to $OUT/train_step.json (rewritten
after every configuration, so a time-out keeps what finished). Never imports mpt_jax.data.
"""

import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Literal

import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


@dataclasses.dataclass(frozen=True)
class Args:
  batch_sizes: tuple[int, ...] = (8,)  # rows per step (one device, no accumulation)
  remat: tuple[Literal["none", "full", "save_dots"], ...] = ("none", "full")
  attn: tuple[Literal["xla", "cudnn", "pallas"], ...] | None = None  # None: cudnn and pallas (xla with --tiny)
  scan: tuple[bool, ...] = (True,)  # scan over layers (False: a Python loop of blocks)
  seq_len: int = 2048
  warmup_steps: int = 3  # untimed steps after compilation
  steps: int = 10  # timed steps; tokens/s uses their median
  tiny: bool = False  # a toy MPT on whatever device there is (CPU smoke test)
  timeout_s: int = 300  # per configuration (compile included)
  budget_s: int = 540  # all configurations together; the rest are skipped (a 600 s command limit)
  one: str = ""  # internal: run the configuration in this JSON and print its result


def _configurations(args: Args) -> list[dict]:
  attns = args.attn or (("xla",) if args.tiny else ("cudnn", "pallas"))
  return [
      dict(batch_size=b, remat=r, attn=a, scan=s)
      for b, r, a, s in itertools.product(args.batch_sizes, args.remat, attns, args.scan)
  ]


def _measure(args: Args, configuration: dict) -> dict:
  """Builds the real train step for ``configuration`` and times it (runs in a child process)."""
  import jax
  import numpy as np

  from mpt_jax import metrics, sharding, trainer
  from mpt_jax.config import MeshConfig, MPTConfig, TrainConfig

  run = dict(remat=configuration["remat"], attn_impl=configuration["attn"], scan_layers=configuration["scan"])
  if args.tiny:
    model = MPTConfig(d_model=128, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=args.seq_len, **run)
  else:
    model = MPTConfig(max_seq_len=max(2048, args.seq_len), **run)
  config = TrainConfig(
      model=model, mesh=MeshConfig(fsdp=1), seq_len=args.seq_len, global_batch_size=configuration["batch_size"], steps=10_000
  )
  device = jax.devices()[0]
  mesh = sharding.make_mesh(config.mesh, [device])
  with jax.set_mesh(mesh):
    setup = trainer.make_setup(config, mesh)
    state = setup.init()
    tokens = jax.random.randint(jax.random.key(0), (config.global_batch_size, config.seq_len), 0, model.vocab_size)
    batch = {"input_ids": jax.device_put(tokens.astype(np.int32), sharding.batch_sharding(mesh))}
    start = time.perf_counter()
    step = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup_steps + args.steps):
      start = time.perf_counter()
      state, step_metrics = step(state, batch)
      jax.block_until_ready((state, step_metrics))
      if i >= args.warmup_steps:
        times.append(time.perf_counter() - start)
  step_time = float(np.median(times))
  tokens_per_s = config.global_batch_size * config.seq_len / step_time
  flops = metrics.flops_per_token(setup.n_params, model.n_layers, model.d_model, config.seq_len)
  memory = device.memory_stats() or {}
  return dict(
      status="ok",
      tokens_per_s=tokens_per_s,
      mfu=metrics.mfu(tokens_per_s, flops, 1, metrics.peak_flops(device.device_kind)),
      step_time_s=step_time,
      compile_s=compile_s,
      peak_memory_gib=memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
      loss=float(step_metrics["loss"]),
      n_params=setup.n_params,
      card=device.device_kind,
      jax=jax.__version__,
  )


def _child(args: Args) -> None:
  configuration = json.loads(args.one)
  try:
    result = _measure(args, configuration)
  except Exception as error:  # noqa: BLE001 - every failure becomes a row of the table
    text = f"{type(error).__name__}: {error}"
    oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
    result = dict(status="OOM" if oom else f"error: {text.splitlines()[0][:200]}")
  print(RESULT_PREFIX + json.dumps({**configuration, **result}), flush=True)


def _run_one(args: Args, configuration: dict, *, timeout_s: int) -> dict:
  """Runs ``configuration`` in a fresh process; its last RESULT line, or what went wrong."""
  command = [sys.executable, __file__, "--one", json.dumps(configuration), *_passthrough(args)]
  try:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**configuration, "status": f"timeout after {timeout_s} s"}
  lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if lines:
    return json.loads(lines[-1][len(RESULT_PREFIX) :])
  tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
  return {**configuration, "status": f"crashed (rc={done.returncode}): {tail[0][:200]}"}


def _passthrough(args: Args) -> list[str]:
  flags = ["--seq_len", str(args.seq_len), "--warmup_steps", str(args.warmup_steps), "--steps", str(args.steps)]
  return flags + (["--tiny"] if args.tiny else [])


def _table(rows: list[dict]) -> str:
  header = f"{'batch':>5} {'remat':>9} {'attn':>6} {'scan':>5} {'tokens/s':>10} {'MFU':>6} {'step ms':>8} {'peak GiB':>8} {'compile s':>9}  status"
  lines = [header]
  for r in rows:
    ok = r["status"] == "ok"
    mfu = f"{100 * r['mfu']:5.1f}%" if ok and r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gib']:8.2f}" if ok and r["peak_memory_gib"] is not None else "-"
    numbers = (
        f"{r['tokens_per_s']:>10,.0f} {mfu:>6} {1e3 * r['step_time_s']:8.1f} {memory:>8} {r['compile_s']:9.1f}"
        if ok
        else f"{'-':>10} {'-':>6} {'-':>8} {'-':>8} {'-':>9}"
    )
    lines.append(f"{r['batch_size']:>5} {r['remat']:>9} {r['attn']:>6} {str(r['scan']):>5} {numbers}  {r['status']}")
  return "\n".join(lines)


def _write(rows: list[dict], args: Args) -> None:
  if not os.environ.get("OUT"):
    return
  path = pathlib.Path(os.environ["OUT"]) / "train_step.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), args=dataclasses.asdict(args), rows=rows)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(report, indent=2))
  tmp.rename(path)


def main(args: Args) -> None:
  rows, deadline = [], time.perf_counter() + args.budget_s
  for configuration in _configurations(args):
    left = int(deadline - time.perf_counter())
    if left < 30:
      rows.append({**configuration, "status": f"skipped: over the {args.budget_s} s budget"})
    else:
      rows.append(_run_one(args, configuration, timeout_s=min(args.timeout_s, left)))
    print(_table(rows[-1:]).splitlines()[1], flush=True)
    _write(rows, args)
  first_ok = next((r for r in rows if r["status"] == "ok"), {})
  print(f"\n{first_ok.get('card', 'unknown device')}, jax {first_ok.get('jax', '?')}, seq_len {args.seq_len}, "
        f"median of {args.steps} steps after {args.warmup_steps} warm-up")
  print(_table(rows))


if __name__ == "__main__":
  parsed = tyro.cli(Args)
  _child(parsed) if parsed.one else main(parsed)
