"""The benchmark scripts run from the repository root as README shows them, and their tools work."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if "if __name__ ==" in p.read_text())


def _run(*argv, timeout=300):
  """A fresh interpreter in the repository root, without PYTHONPATH, as a newcomer types it."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_starts_from_the_repository_root(script):
  done = _run(f"benchmarks/{script}", "--help")
  assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("script", ["attention.py", "decode_attention.py", "generate.py", "train_step.py"])
def test_gpu_benchmarks_refuse_a_machine_without_one_in_one_line(script):
  """Off a GPU the MPT-1B-sized benchmarks stop at once with one line (pointing to --tiny
  where there is one), not after minutes of a CPU run that runs out of memory."""
  done = _run(f"benchmarks/{script}", timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1].startswith("this benchmark needs a GPU"), done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_train_step_benchmark_times_ours_the_plain_step_and_ablation_variants(tmp_path):
  """--tiny runs the same code paths as on a GPU: each row in its own process, variants patched in."""
  done = subprocess.run(
    [
      sys.executable,
      "benchmarks/train_step.py",
      "--tiny",
      "--seq_len",
      "32",
      "--batch_sizes",
      "2",
      "--plain_batch_sizes",
      "2",
      "--warmup_steps",
      "1",
      "--steps",
      "1",
      "--variants",
      "no_guard",
      "f32_logits",
    ],
    cwd=ROOT,
    env={**os.environ, "OUT": str(tmp_path)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
  assert [(r["step"], r["variant"]) for r in rows] == [
    ("plain", "-"),
    ("ours", "as_is"),
    ("ours", "no_guard"),
    ("ours", "f32_logits"),
  ]
  assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows


def test_step_profile_splits_gpu_time_by_kind_of_kernel(tmp_path):
  """Kernels are tied to HLO instructions by name and bucketed by library or jax.named_scope."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import step_profile

  hlo = "\n".join(
    [
      '  %loop_add_fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(train_step)/optimizer/add"}',
      '  %fusion.7 = bf16[4]{0} fusion(%p), kind=kLoop, calls=%d, metadata={op_name="jit(train_step)/transpose(jvp(loss))/mul"}',
      '  %loop_convert_fusion.2 = bf16[4]{0} fusion(%p), kind=kLoop, calls=%e, metadata={op_name="jit(train_step)/jvp()/add"}',
    ]
  )
  kernels = [
    ("nvjet_sm90_tst_128x256", 0, 50),
    ("alibi_flash_forward", 60, 20),
    ("loop_add_fusion_3", 80, 10),
    ("fusion_7", 90, 5),
    ("layer_norm_backward", 95, 4),
    ("loop_convert_fusion_2", 99, 11),
  ]
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  events += [{"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": dur, "name": name} for name, ts, dur in kernels]
  trace = tmp_path / "host.trace.json.gz"
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = step_profile.summarize(trace, hlo, steps=2)
  assert summary["step_ms"] == pytest.approx(0.055)  # 110 us of wall time over 2 steps
  assert summary["idle_ms"] == pytest.approx(0.005)  # the 10 us gap between the matmul and the attention kernel
  assert summary["buckets"] == pytest.approx(
    {
      "dense matmuls": 0.025,
      "attention kernels": 0.010,
      "optimizer update": 0.005,
      "loss (head softmax, cross-entropy)": 0.0025,
      "LayerNorm": 0.002,
      "other fusions (residual adds, casts, slices)": 0.0055,
    }
  )
  assert step_profile.categorize("alibi_decode_attention", {}) == "attention kernels"  # decoding's kernel too


def test_decode_attention_benchmark_checks_and_times_each_split_choice():
  """--tiny runs the GPU rows' code interpreted: every row checked against decode.attention, then timed."""
  done = _run("benchmarks/decode_attention.py", "--tiny", "--splits", "auto", "1", "2")
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [line.split() for line in done.stdout.splitlines() if line.split()[:3] == ["2", "150", "70"]]
  assert [(row[3], row[4]) for row in rows] == [("auto", "3"), ("1", "1"), ("2", "2")]  # requested, actual parts
  assert all(float(row[-1]) < 2e-2 for row in rows)  # max |diff| against the float32 reference


def test_sass_profile_sums_stall_samples_and_instructions_per_opcode(tmp_path):
  """An ncu source page (a kernel-name line, then one CSV row per SASS instruction) per stall reason and opcode."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import sass_profile

  header = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_barrier","stall_long_sb","stall_barrier (Not Issued)"'
  rows = [
    '"0x10","@!P1  BRA 0x20","60","10","0","60","0"',
    '"0x20","HGMMA.64x128x16.F32.BF16 R88, R24, gdesc[UR20].tnspB","10","20","0","10","0"',
    '"0x30","WARPGROUP.DEPBAR.LE gsb0, 0x0","30","10","30","0","30"',
    '"0x40","FADD R1, R2, R3","0","60","0","0","0"',
  ]
  page = tmp_path / "forward.csv"
  page.write_text("\n".join(['"Kernel Name","alibi_flash_forward",', header, *rows]) + "\n")
  parsed = sass_profile.read(page)
  assert sass_profile.stall_shares(parsed) == pytest.approx({"long_sb": 0.7, "barrier": 0.3})
  mix = sass_profile.opcode_mix(parsed)
  assert [op for op, _, _ in mix] == ["FADD", "HGMMA", "BRA", "WARPGROUP"]  # most executed first
  assert [executed for _, executed, _ in mix] == pytest.approx([0.6, 0.2, 0.1, 0.1])
  assert [sampled for _, _, sampled in mix] == pytest.approx([0.0, 0.1, 0.6, 0.3])
  hottest = sass_profile.hot_lines(parsed, top=2)
  assert [(i, share, worst[0]) for i, share, _, worst in hottest] == [
    (0, pytest.approx(0.6), "long_sb"),
    (2, pytest.approx(0.3), "barrier"),
  ]
