"""benchmarks/generate.py --tiny: runs as a script from anywhere, times both implementations (ours
first), writes $OUT/generate.json, and never imports mpt_jax.data or TensorFlow (absent on the GPU
machines)."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_run_writes_every_row_without_data_or_tensorflow_imports(tmp_path):
  flags = ["--tiny", "--batch_sizes", "1", "3", "--prompt_tokens", "8", "--new_tokens", "6", "--repeats", "1"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-X", "importtime", str(ROOT / "benchmarks" / "generate.py"), *flags],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
  assert "mpt_jax.generate" in imported
  assert not {m for m in imported if m.startswith(("mpt_jax.data", "tensorflow", "seqio"))}
  report = json.loads((tmp_path / "generate.json").read_text())
  assert [(r["impl"], r["batch"], r["status"]) for r in report["rows"]] == [
    ("mpt-jax", 1, "ok"),
    ("transformers", 1, "ok"),
    ("mpt-jax", 3, "ok"),
    ("transformers", 3, "ok"),
  ]
  assert all(
    math.isfinite(r["decode_ms_per_step"]) and r["prefill_tokens_per_s"] > 0 for r in report["rows"]
  )  # CPU: noisy
  assert "decode ms/step" in result.stdout
  # Measured in this order, all of ours before transformers' model exists (it slowed ours on a GPU).
  progress = [line.split()[:2] for line in result.stdout.splitlines() if line.startswith(("mpt-jax", "transformers"))]
  assert progress[:4] == [["mpt-jax", "1"], ["mpt-jax", "3"], ["transformers", "1"], ["transformers", "3"]]
