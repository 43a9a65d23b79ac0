"""train.py end to end, and a 2-process jax.distributed run against the 1-process 8-device run.

Run as a script, this file is one worker process of the 2-process run:
  python tests/test_train_cli.py PROCESS_ID PORT WORKDIR
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(workdir, **mesh_fields):
  from mpt_jax.config import MeshConfig, MPTConfig, OptimConfig, TrainConfig

  model = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32, dtype="float32", attn_impl="xla")
  return TrainConfig(
    model=model,
    mesh=MeshConfig(data=2, fsdp=4, tensor=1, **mesh_fields),
    optim=OptimConfig(lr=1e-3, warmup_steps=1),
    workdir=str(workdir),
    seq_len=32,
    global_batch_size=8,
    steps=3,
    log_every=1,
    sample_tokens=0,
  )


def _synthetic_rows(config, *, process_index: int, process_count: int):
  """make_train_iterator's contract over seeded random tokens: this process's slice of each global batch."""
  rng = np.random.default_rng(0)
  rows = config.global_batch_size // process_count
  while True:
    batch = rng.integers(0, config.model.vocab_size, (config.global_batch_size, config.seq_len), dtype=np.int32)
    yield {"input_ids": batch[process_index * rows : (process_index + 1) * rows]}


def _losses(workdir) -> list[float]:
  return [json.loads(line)["loss"] for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_on_eight_devices(tmp_path):
  from mpt_jax import trainer

  port = _free_port()
  env = {
    **os.environ,
    "JAX_NUM_CPU_DEVICES": "4",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
  }
  workers = [
    subprocess.Popen(
      [sys.executable, __file__, str(i), str(port), str(tmp_path / "two")],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  config = _config(tmp_path / "one")
  trainer.main(config, _synthetic_rows(config, process_index=0, process_count=1))
  for worker in workers:
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output[-3000:]
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(one) == 3
  np.testing.assert_allclose(two, one, rtol=1e-5)


def test_cli_parses_preset_and_overrides():
  import train

  config = train.parse_args(["--workdir", "runs/x", "--optim.lr", "1e-3", "--mesh.fsdp", "2"])
  assert config.model.d_model == 128 and config.workdir == "runs/x"  # the tiny preset by default
  assert config.optim.lr == 1e-3 and config.mesh.fsdp == 2
  published = train.parse_args(["mpt_1b_redpajama_200b", "--micro_batch_size", "11"])
  assert published.steps == round(200e9 / (published.global_batch_size * published.seq_len)) == 44_389
  assert published.micro_batch_size == 11


@pytest.mark.parametrize(
  "flags",
  [["--steps", "-5"], ["--log-every", "0"], ["--global-batch-size", "0"], ["--seq-len", "0"]],
  ids=lambda flags: " ".join(flags),
)
def test_a_bad_value_is_one_error_line_exit_2_and_writes_nothing(tmp_path, capsys, flags):
  import train

  assert train.run(["--workdir", str(tmp_path / "run"), *flags]) == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith(f"error: TrainConfig.{flags[0][2:].replace('-', '_')} must be ") and stderr.count("\n") == 1
  assert not (tmp_path / "run").exists()


def test_default_run_writes_tensorboard_jsonl_and_png(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--workdir",
      str(tmp_path),
      "--steps",
      "4",
      "--log_every",
      "2",
      "--sample_tokens",
      "4",
    ],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 4]
  assert all({"loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s"} <= r.keys() for r in records)
  assert records[0]["mfu"] is None  # CPU: no known peak
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "sample:" in result.stderr


def _worker(process_id: int, port: int, workdir: str) -> None:
  import jax

  from mpt_jax import trainer

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reach each other through gloo

  config = _config(workdir, coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  trainer.main(config, _synthetic_rows(config, process_index=process_id, process_count=2))


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
