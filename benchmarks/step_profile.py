"""Where a jitted step's GPU time goes: a jax.profiler trace split by kind of kernel.

  python benchmarks/step_profile.py TRACE_DIR [--hlo compiled_step.txt] [--steps N]

``trace`` runs a step function under ``jax.profiler`` and keeps the compiled HLO beside the
trace; ``summarize`` reads the trace's GPU kernel events and sums their time per step into
dense matmuls, attention kernels, the optimizer update, the loss, other fusions (by fusion
kind), copies, and idle gaps (wall time the GPU ran no kernel). Kernels are tied to HLO
instructions by name (XLA names a fusion's kernel after the instruction, '.' -> '_') and
to model code by the instruction's ``op_name`` metadata, where ``jax.named_scope`` put
"optimizer" and "loss".
"""

import collections
import gzip
import json
import pathlib
import re
import sys

HLO_FILE = "compiled_step.hlo.txt"
_MATMUL_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas", re.I)
_ATTENTION_KERNEL = re.compile(r"alibi_flash|alibi_decode|fmha|flash_fprop|flash_bprop|cudnn", re.I)


def trace(step, carry, log_dir: pathlib.Path, *, steps: int, compiled_text: str) -> pathlib.Path:
  """Runs ``carry = step(carry)`` ``steps`` times under the profiler; returns the trace file."""
  import jax

  log_dir.mkdir(parents=True, exist_ok=True)
  (log_dir / HLO_FILE).write_text(compiled_text)
  jax.block_until_ready(carry)
  jax.profiler.start_trace(str(log_dir))
  try:
    for _ in range(steps):
      carry = step(carry)
    jax.block_until_ready(carry)
  finally:
    jax.profiler.stop_trace()
  return newest_trace(log_dir)


def newest_trace(log_dir: pathlib.Path) -> pathlib.Path:
  traces = sorted(pathlib.Path(log_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}")
  return traces[-1]


def _hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Sanitized instruction name -> (what it is, op_name) for every instruction of the compiled HLO."""
  table = {}
  for line in hlo_text.splitlines():
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
    if not match:
      continue
    name, opcode = match.groups()
    kind = re.search(r"kind=(k\w+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    what = target.group(1) if target else (kind.group(1) if kind else opcode)
    table[re.sub(r"[^\w]", "_", name)] = (what, op_name.group(1) if op_name else "")
  return table


# Buckets by the jax.named_scope a kernel's HLO came from (mpt_jax.train_step, mpt_jax.ops).
SCOPES = (
  ("optimizer", "optimizer update"),
  ("loss", "loss (head softmax, cross-entropy)"),
  ("layer_norm", "LayerNorm"),
  ("gelu", "GELU"),
)


def categorize(kernel: str, instructions: dict[str, tuple[str, str]]) -> str:
  """The bucket of one kernel launch: matmul and attention libraries by kernel name, fusions by scope."""
  what, op_name = instructions.get(re.sub(r"[^\w]", "_", kernel), ("", ""))
  if _ATTENTION_KERNEL.search(kernel):
    return "attention kernels"
  if _MATMUL_KERNEL.search(kernel) or "gemm" in what.lower():
    return "dense matmuls"
  for scope, bucket in SCOPES:  # "jit(train_step)/transpose(jvp(loss))/..." is in scope "loss"
    if re.search(rf"\b{scope}\b", op_name) or kernel.startswith(scope):  # Pallas kernels: layer_norm_forward
      return bucket
  if re.search(r"copy|memcpy|memset", kernel, re.I) or what == "copy":
    return "copies and memsets"
  return "other fusions (residual adds, casts, slices)"


def summarize(trace_file: pathlib.Path, hlo_text: str, *, steps: int) -> dict:
  """Per-step milliseconds by bucket, plus the busiest kernels, from a Chrome-format trace."""
  with gzip.open(trace_file, "rt") as f:
    events = json.load(f)["traceEvents"]
  gpu_pids = {
    e["pid"]
    for e in events
    if e.get("ph") == "M"
    and e.get("name") == "process_name"
    and re.search(r"/device:GPU:0\b", str(e.get("args", {}).get("name", "")))
  }
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
  if not kernels:
    raise ValueError(f"{trace_file} has no GPU:0 kernel events")
  instructions = _hlo_instructions(hlo_text)
  per_bucket, per_kernel = collections.Counter(), collections.Counter()
  intervals = []
  for e in kernels:
    bucket = categorize(e["name"], instructions)
    per_bucket[bucket] += e["dur"]
    per_kernel[(bucket, e["name"][:60])] += e["dur"]
    intervals.append((e["ts"], e["ts"] + e["dur"]))
  intervals.sort()
  busy, end = 0.0, -float("inf")
  for start, stop in intervals:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  wall = intervals[-1][1] - intervals[0][0]
  ms = lambda us: us / 1e3 / steps  # noqa: E731 - trace times are microseconds
  return dict(
    step_ms=ms(wall),
    buckets={name: ms(us) for name, us in per_bucket.most_common()},
    idle_ms=ms(wall - busy),
    top_kernels=[(bucket, name, ms(us)) for (bucket, name), us in per_kernel.most_common(40)],
  )


def format_summary(summary: dict) -> str:
  if "error" in summary:
    return f"no profile: {summary['error']}"
  lines = [
    f"step {summary['step_ms']:.1f} ms (GPU wall, first to last kernel / steps)",
    "| where | ms/step | share |",
    "|---|---|---|",
  ]
  total = summary["step_ms"]
  for name, value in list(summary["buckets"].items()) + [("idle gaps", summary["idle_ms"])]:
    lines.append(f"| {name} | {value:.1f} | {100 * value / total:.1f}% |")
  lines.append("\nbusiest kernels (ms/step):")
  lines += [f"  {value:7.2f}  {bucket:32s} {name}" for bucket, name, value in summary["top_kernels"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir", type=pathlib.Path)
  parser.add_argument("--steps", type=int, required=True, help="steps the trace holds")
  parsed = parser.parse_args(argv)
  hlo = next(parsed.trace_dir.rglob(HLO_FILE), None)
  summary = summarize(newest_trace(parsed.trace_dir), hlo.read_text() if hlo else "", steps=parsed.steps)
  print(format_summary(summary))


if __name__ == "__main__":
  main(sys.argv[1:])
