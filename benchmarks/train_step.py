"""MPT-1B train-step throughput: ours against a plain step, an ablation of our step, several GPUs.

  python benchmarks/train_step.py                      # ours (the 1b preset's settings) and the plain step
  python benchmarks/train_step.py --batch_sizes 8 16 --remat none save_dots --attn pallas cudnn --layers unrolled scan
  python benchmarks/train_step.py --ablation           # also each feature of our step swapped out (benchmarks/ablations.py)
  python benchmarks/train_step.py --devices 2          # FSDP over 2 GPUs, batch sizes per GPU
  python benchmarks/train_step.py --profile_dir /tmp/p # also where each step's GPU time goes (jax.profiler)
  python benchmarks/train_step.py --tiny               # a CPU smoke test of the same paths

Each configuration runs in its own process, so an out-of-memory or a crash becomes one row
of the table and the peak memory is that configuration's own; with ``--parallel N`` up to N
of them compile at once while a lock lets one at a time use the GPU for its timed steps.
Synthetic tokens; our step is ``mpt_jax.train_step``'s (float32 master weights, bf16 compute,
decoupled AdamW, clipping, NaN guard, fused head + loss), the plain one is
benchmarks/plain_step.py. tokens/s from the median step time after warm-up, each step ended
by block_until_ready; MFU per GPU as llm-foundry counts it (9.0766e9 FLOPs/token at 2048,
989.5 TF/s). Results go to stdout as a table and, when $OUT is set, to $OUT/train_step.json
(rewritten after every configuration, so a time-out keeps what finished). Never imports
mpt_jax.data (the GPU machines have no TensorFlow).
"""

import concurrent.futures
import contextlib
import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Literal

import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(ROOT))

import ablations  # noqa: E402 - benchmarks/ is on sys.path when this runs as a script

RESULT_PREFIX = "RESULT "
PROFILE_STEPS = 3  # steps traced per configuration with --profile_dir
Layers = Literal["unrolled", "scan", "loop"]


@dataclasses.dataclass(frozen=True)
class Args:
  batch_sizes: tuple[int, ...] = (8,)  # rows per GPU per step (no accumulation)
  remat: tuple[Literal["none", "full", "save_dots"], ...] = ("none",)
  # None: pallas, the best Pallas kernel for the GPU (xla with --tiny)
  attn: tuple[Literal["xla", "cudnn", "pallas", "pallas_mosaic_gpu", "pallas_triton"], ...] | None = None
  layers: tuple[Layers, ...] = ("unrolled",)  # scan unrolled over all blocks, scan of one block, Python loop
  ablation: bool = False  # also every variant of benchmarks/ablations.py at the first configuration (first batch size)
  variants: tuple[str, ...] = ()  # only these variants (names in benchmarks/ablations.py), without --ablation
  plain_batch_sizes: tuple[int, ...] = (8,)  # the plain step (benchmarks/plain_step.py) on one GPU; () for none
  devices: int = 1  # GPUs; our step runs FSDP over all of them (batch sizes are per GPU)
  seq_len: int = 2048
  warmup_steps: int = 3  # untimed steps after compilation
  steps: int = 10  # timed steps; tokens/s uses their median
  tiny: bool = False  # a toy MPT on whatever device there is (CPU smoke test)
  parallel: int = 1  # configurations compiling at once (timed steps run alone, while nothing compiles)
  timeout_s: int = 400  # per configuration (compile and the wait for the GPU included)
  budget_s: int = 560  # all configurations together; the rest are skipped (a 600 s command limit)
  profile_dir: str = (
    ""  # trace each configuration's step (not the ablation variants) there and print where its time goes
  )
  one: str = ""  # internal: run the configuration in this JSON and print its result
  gpu_lock: str = ""  # internal: the file whose lock grants the GPU for timed steps


def _configurations(args: Args) -> list[dict]:
  attns = args.attn or (("xla",) if args.tiny else ("pallas",))
  plain_attn = "xla" if args.tiny else "cudnn"
  plain = [
    dict(step="plain", batch_size=b, remat="none", attn=plain_attn, layers="loop", variant="-", devices=1)
    for b in args.plain_batch_sizes
  ]
  ours = [
    dict(step="ours", batch_size=b, remat=r, attn=a, layers=l, variant="as_is", devices=args.devices)
    for b, r, a, l in itertools.product(args.batch_sizes, args.remat, attns, args.layers)
  ]
  names = [name for name in ablations.VARIANTS if name != "as_is"] if args.ablation else list(args.variants)
  unknown = set(names) - set(ablations.VARIANTS)
  if unknown:
    raise SystemExit(f"error: unknown variants {sorted(unknown)}; expected names from {sorted(ablations.VARIANTS)}")
  variants = [{**ours[0], "variant": name} for name in names]
  return plain + ours + variants


def _model_config(args: Args, **run):
  """MPT-1B (a toy MPT with --tiny) with the run-time fields ``run``."""
  from mpt_jax.config import MPTConfig

  if args.tiny:
    return MPTConfig(d_model=128, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=args.seq_len, **run)
  return MPTConfig(max_seq_len=max(2048, args.seq_len), **run)


def _train_config(args: Args, configuration: dict):
  """The TrainConfig of one configuration of our step (ablation variant applied)."""
  from mpt_jax.config import MeshConfig, TrainConfig

  layers = configuration["layers"]
  model = _model_config(
    args, remat=configuration["remat"], attn_impl=configuration["attn"], scan_layers=layers != "loop"
  )
  model = dataclasses.replace(model, scan_unroll=model.n_layers if layers == "unrolled" else 1)
  config = TrainConfig(
    model=model,
    mesh=MeshConfig(fsdp=configuration["devices"]),
    seq_len=args.seq_len,
    global_batch_size=configuration["batch_size"] * configuration["devices"],
    steps=10_000,
  )
  return ablations.configure(config, configuration["variant"])


def _our_step(args: Args, configuration: dict):
  """The real step of mpt_jax.train_step: (advance(carry) -> (carry, loss), carry, model config, n_params, HLO)."""
  import jax

  from mpt_jax import sharding, trainer

  config = _train_config(args, configuration)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: configuration["devices"]])
  with jax.set_mesh(mesh):
    setup = trainer.make_setup(config, mesh)
    state = setup.init()
    tokens = jax.random.randint(
      jax.random.key(0), (config.global_batch_size, config.seq_len), 0, config.model.vocab_size
    )
    batch = {"input_ids": jax.device_put(tokens.astype("int32"), sharding.batch_sharding(mesh))}
    step = setup.train_step.lower(state, batch).compile()

  def advance(state):
    state, step_metrics = step(state, batch)
    return state, step_metrics["loss"]

  return advance, state, config.model, setup.n_params, step.as_text()


def _plain_step(args: Args, configuration: dict):
  """benchmarks/plain_step.py on one device, with the same return values as _our_step."""
  import jax
  import plain_step

  model = _model_config(args, attn_impl=configuration["attn"])
  tokens = jax.random.randint(
    jax.random.key(0), (configuration["batch_size"], args.seq_len), 0, model.vocab_size, dtype="int32"
  )
  init, step = plain_step.make_train_step(model)
  params, opt_state = init(jax.random.key(0))
  step = step.lower(params, opt_state, tokens).compile()

  def advance(carry):
    params, opt_state, loss = step(*carry, tokens)
    return (params, opt_state), loss

  return advance, (params, opt_state), model, sum(x.size for x in jax.tree.leaves(params)), step.as_text()


@contextlib.contextmanager
def _gpu(lock_file: str, *, exclusive: bool):
  """With other configurations running beside this one: shared use of the GPU(s) while compiling
  (autotuning runs kernels), exclusive use for the timed steps, so nothing else runs during them."""
  if not lock_file:
    yield
    return
  with open(lock_file, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _measure(args: Args, configuration: dict) -> dict:
  """Builds the step of ``configuration`` and times it (runs in a child process)."""
  import jax
  import numpy as np

  from mpt_jax import metrics

  build = _plain_step if configuration["step"] == "plain" else _our_step
  with _gpu(args.gpu_lock, exclusive=False):
    start = time.perf_counter()
    advance, carry, model, n_params, hlo = build(args, configuration)
    compile_s = time.perf_counter() - start  # init included
  with _gpu(args.gpu_lock, exclusive=True):
    times = []
    for i in range(args.warmup_steps + args.steps):
      start = time.perf_counter()
      carry, loss = advance(carry)
      jax.block_until_ready((carry, loss))
      if i >= args.warmup_steps:
        times.append(time.perf_counter() - start)
    profiled = args.profile_dir and configuration["variant"] in ("as_is", "-")  # not every ablation variant
    profile = _profile(args, configuration, advance, carry, hlo) if profiled else None
  devices = configuration["devices"]
  step_time = float(np.median(times))
  tokens_per_s = devices * configuration["batch_size"] * args.seq_len / step_time
  device = jax.devices()[0]
  flops = metrics.flops_per_token(n_params, model.n_layers, model.d_model, args.seq_len)
  memory = device.memory_stats() or {}
  return dict(
    status="ok",
    tokens_per_s=tokens_per_s,
    tokens_per_s_per_gpu=tokens_per_s / devices,
    mfu=metrics.mfu(tokens_per_s, flops, devices, metrics.peak_flops(device.device_kind)),
    step_time_s=step_time,
    step_time_min_s=float(np.min(times)),
    compile_s=compile_s,
    peak_memory_gib=memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
    loss=float(loss),
    n_params=n_params,
    card=device.device_kind,
    jax=jax.__version__,
    profile=profile,
  )


def _profile(args: Args, configuration: dict, advance, carry, hlo: str) -> dict:
  import step_profile

  name = "_".join(
    str(configuration[k]) for k in ("step", "batch_size", "remat", "attn", "layers", "variant", "devices")
  )
  trace_file = step_profile.trace(
    lambda c: advance(c)[0], carry, pathlib.Path(args.profile_dir) / name, steps=PROFILE_STEPS, compiled_text=hlo
  )
  try:
    return step_profile.summarize(trace_file, hlo, steps=PROFILE_STEPS)
  except ValueError as error:  # a trace without GPU kernels (CPU): the timing still stands
    return dict(error=str(error))


def _child(args: Args) -> None:
  configuration = json.loads(args.one)
  try:
    result = _measure(args, configuration)
  except Exception as error:  # noqa: BLE001 - every failure becomes a row of the table
    text = f"{type(error).__name__}: {error}"
    oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
    result = dict(status="OOM" if oom else f"error: {text.splitlines()[0][:200]}")
  print(RESULT_PREFIX + json.dumps({**configuration, **result}), flush=True)


def _run_one(args: Args, configuration: dict, *, deadline: float, gpu_lock: str) -> dict:
  """Runs ``configuration`` in a fresh process; its last RESULT line, or what went wrong."""
  timeout_s = int(min(args.timeout_s, deadline - time.perf_counter()))
  if timeout_s < 30:
    return {**configuration, "status": f"skipped: over the {args.budget_s} s budget"}
  command = [sys.executable, __file__, "--one", json.dumps(configuration), "--gpu_lock", gpu_lock, *_passthrough(args)]
  env = dict(os.environ)
  if args.parallel > 1:  # several processes share the GPU: each takes memory as it needs it
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  try:
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
  flags += ["--profile_dir", args.profile_dir] if args.profile_dir else []
  return flags + (["--tiny"] if args.tiny else [])


def _table(rows: list[dict]) -> str:
  """One line per configuration; ablation variants also as the ms they add to the unchanged step."""
  variants = [r for r in rows if r["variant"] not in ("as_is", "-")]
  base = next(
    (
      r
      for r in rows
      if r["variant"] == "as_is"
      and variants
      and r["status"] == "ok"
      and all(r[k] == variants[0][k] for k in ("batch_size", "devices"))
    ),
    None,
  )
  header = (
    f"{'step':>5} {'GPUs':>4} {'batch':>5} {'remat':>9} {'attn':>17} {'layers':>8} {'variant':>16} "
    f"{'tok/s/GPU':>10} {'MFU':>6} {'step ms':>8} {'vs base':>8} {'peak GiB':>8} {'compile s':>9}  status"
  )
  lines = [header]
  for r in rows:
    ok = r["status"] == "ok"
    if ok:
      mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "-"
      memory = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else "-"
      delta = (
        f"{1e3 * (r['step_time_s'] - base['step_time_s']):+8.1f}" if base and (r in variants or r is base) else "-"
      )
      numbers = (
        f"{r['tokens_per_s_per_gpu']:>10,.0f} {mfu:>6} {1e3 * r['step_time_s']:8.1f} {delta:>8} {memory:>8} "
        f"{r['compile_s']:9.1f}"
      )
    else:
      numbers = f"{'-':>10} {'-':>6} {'-':>8} {'-':>8} {'-':>8} {'-':>9}"
    lines.append(
      f"{r['step']:>5} {r['devices']:>4} {r['batch_size']:>5} {r['remat']:>9} {r['attn']:>17} {r['layers']:>8} "
      f"{r['variant']:>16} {numbers}  {r['status']}"
    )
  return "\n".join(lines)


def _write(rows: list[dict], args: Args) -> None:
  if not os.environ.get("OUT"):
    return
  path = pathlib.Path(os.environ["OUT"]) / "train_step.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  report = dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    args=dataclasses.asdict(args),
    rows=rows,
    variants={name: v.what for name, v in ablations.VARIANTS.items()},
  )
  from mpt_jax.atomic import write_atomically

  write_atomically(path, json.dumps(report, indent=2))


def _default_backend() -> str:
  """JAX's default backend, asked in a child process: this one must never hold a GPU, which
  each configuration's own process needs whole."""
  probe = [sys.executable, "-c", "import jax; print(jax.default_backend())"]
  return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1]


def main(args: Args) -> None:
  if not args.tiny and (backend := _default_backend()) != "gpu":
    raise SystemExit(f"this benchmark needs a GPU (or --tiny for the CPU smoke test); found {backend}")
  configurations = _configurations(args)
  deadline = time.perf_counter() + args.budget_s
  rows = [None] * len(configurations)
  with (
    tempfile.NamedTemporaryFile(prefix="gpu-lock-") as lock,
    concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool,
  ):
    futures = {
      pool.submit(_run_one, args, c, deadline=deadline, gpu_lock=lock.name): i for i, c in enumerate(configurations)
    }
    for future in concurrent.futures.as_completed(futures):
      rows[futures[future]] = future.result()
      print(_table([rows[futures[future]]]).splitlines()[1], flush=True)
      _write([r for r in rows if r is not None], args)
  first_ok = next((r for r in rows if r["status"] == "ok"), {})
  print(
    f"\n{first_ok.get('card', 'unknown device')}, jax {first_ok.get('jax', '?')}, seq_len {args.seq_len}, "
    f"median of {args.steps} steps after {args.warmup_steps} warm-up"
  )
  print(_table(rows))
  if args.ablation:
    print("\nvariants: " + "; ".join(f"{name}: {v.what}" for name, v in ablations.VARIANTS.items()))
  if args.profile_dir:
    import step_profile

    for r in rows:
      if r.get("profile"):
        print(
          f"\nprofile: {r['step']} x{r['devices']} batch {r['batch_size']} {r['remat']} {r['attn']} {r['layers']} {r['variant']}"
        )
        print(step_profile.format_summary(r["profile"]))


if __name__ == "__main__":
  parsed = tyro.cli(Args)
  _child(parsed) if parsed.one else main(parsed)
