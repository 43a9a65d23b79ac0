"""Fault tolerance: exact resume after kill -9 and SIGTERM, atomic async saves, resharded restore,
the NaN guard, config mismatch, and fine-tuning from converted weights."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mpt_jax import MPTForCausalLM, checkpoint, sharding, trainer
from mpt_jax.config import CheckpointConfig, MeshConfig, MPTConfig, OptimConfig, TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20
# train.py on the embedded corpus, a toy model: 20 steps, a checkpoint every 2, every step logged.
RUN = ["--model.d-model", "64", "--model.n-layers", "2", "--seq-len", "64", "--global-batch-size", "8",
       "--steps", str(STEPS), "--log-every", "1", "--sample-tokens", "0"]


def _launch(workdir, *extra) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "train.py", "--workdir", str(workdir), *RUN, *extra],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )


def _finish(process: subprocess.Popen) -> int:
  _, stderr = process.communicate(timeout=240)
  assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
  return process.returncode


def _records(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for(condition, process, timeout=180.0):
  start = time.monotonic()
  while not condition():
    assert process.poll() is None, "the run ended before the moment to interrupt it"
    assert time.monotonic() - start < timeout
    time.sleep(0.005)


def _losses_by_step(workdir) -> dict[int, set[float]]:
  """Every loss logged for each step; a step replayed after a restart appears twice."""
  losses: dict[int, set[float]] = {}
  for record in _records(workdir):
    losses.setdefault(record["step"], set()).add(record["loss"])
  return losses


def _final_state(workdir) -> dict:
  """The last checkpoint's train state as host numpy arrays."""
  directory = pathlib.Path(workdir) / "checkpoints"
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == STEPS
    restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  return jax.tree.map(_host, restored.state)


def _assert_same_run(workdir, reference):
  losses = _losses_by_step(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step, values in losses.items():
    assert values == {reference["losses"][step]}, step  # replayed steps too: bit-identical
  jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), reference["state"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 20-step run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  assert _finish(_launch(workdir, "--checkpoint.every-steps", "2")) == 0
  losses = {step: values.pop() for step, values in _losses_by_step(workdir).items()}
  return {"losses": losses, "state": _final_state(workdir)}


def _saving(workdir) -> bool:
  """True while an async save is in flight: orbax writes under a temporary name, then renames."""
  return any(".orbax-checkpoint-tmp" in p.name for p in (pathlib.Path(workdir) / "checkpoints").glob("*"))


def _latest_complete_step(workdir) -> int | None:
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
    return manager.latest_step()


def test_kill_9_at_three_steps_then_resume_is_bit_identical(tmp_path, reference):
  """Killed at steps 5 and 10, then while an async save is in flight; the restarts resume exactly."""
  for target in (5, 10):
    run = _launch(tmp_path, "--checkpoint.every-steps", "2")
    _wait_for(lambda: _records(tmp_path) and _records(tmp_path)[-1]["step"] >= target, run)
    run.send_signal(signal.SIGKILL)
    assert _finish(run) == -signal.SIGKILL
  run = _launch(tmp_path, "--checkpoint.every-steps", "1")
  _wait_for(lambda: _records(tmp_path) and _records(tmp_path)[-1]["step"] >= 14 and _saving(tmp_path), run)
  run.send_signal(signal.SIGKILL)
  assert _finish(run) == -signal.SIGKILL
  in_flight = [int(p.name.split(".")[0]) for p in (tmp_path / "checkpoints").glob("*.orbax-checkpoint-tmp*")]
  assert in_flight and _latest_complete_step(tmp_path) < max(in_flight)  # the half-written one is not used
  assert _finish(_launch(tmp_path, "--checkpoint.every-steps", "2")) == 0
  _assert_same_run(tmp_path, reference)


def test_sigterm_checkpoints_at_the_step_reached_and_exits_0(tmp_path, reference):
  run = _launch(tmp_path, "--checkpoint.every-steps", "0")  # no periodic saves: only SIGTERM's
  _wait_for(lambda: _records(tmp_path) and _records(tmp_path)[-1]["step"] >= 7, run)
  run.send_signal(signal.SIGTERM)
  assert _finish(run) == 0
  reached = _records(tmp_path)[-1]["step"]
  assert 7 <= reached < STEPS
  assert _latest_complete_step(tmp_path) == reached
  assert _finish(_launch(tmp_path, "--checkpoint.every-steps", "0")) == 0
  _assert_same_run(tmp_path, reference)


TINY = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=16, dtype="float32", attn_impl="xla")


def _train_config(workdir, **fields) -> TrainConfig:
  defaults = dict(model=TINY, optim=OptimConfig(lr=1e-2, warmup_steps=1), workdir=str(workdir), seq_len=16,
                  global_batch_size=8, steps=4, log_every=1, sample_tokens=0)
  return TrainConfig(**{**defaults, **fields})


def _setup(config, devices):
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=len(devices), tensor=1), devices=devices)
  return mesh, trainer.make_setup(dataclasses.replace(config, mesh=MeshConfig(fsdp=len(devices))), mesh)


@pytest.mark.parametrize("n_devices", [1, 4])
def test_checkpoint_saved_on_8_devices_restores_on_fewer(tmp_path, n_devices):
  config = _train_config(tmp_path)
  mesh8, setup8 = _setup(config, jax.devices())
  with jax.set_mesh(mesh8):
    saved = setup8.init()
  saver = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config.checkpoint, TINY)
  saver.save(3, saved, {"step": 3})
  saver.wait_until_finished()
  mesh, setup = _setup(config, jax.devices()[:n_devices])
  target = sharding.with_shardings(setup.abstract_state, setup.state_shardings)
  restored, data_state = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config.checkpoint, TINY).restore(3, target)
  assert data_state == {"step": 3}
  for before, after in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    assert after.sharding.device_set <= set(jax.devices()[:n_devices])
    np.testing.assert_array_equal(_host(after), _host(before))


def _host(x):
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _batches(config, *, poisoned_steps=()):
  """Seeded random rows; at poisoned steps an out-of-vocabulary id makes the loss NaN."""
  rng = np.random.default_rng(0)
  for step in range(1, 10**6):
    batch = rng.integers(0, config.model.vocab_size, (config.global_batch_size, config.seq_len), dtype=np.int32)
    if step in poisoned_steps:
      batch[0, 3] = config.model.vocab_size  # jnp.take fills out-of-range rows with NaN
    yield {"input_ids": batch}


def test_a_nan_batch_is_skipped_and_counted_and_the_run_continues(tmp_path):
  config = _train_config(tmp_path, steps=5)
  mesh, setup = _setup(config, jax.devices())
  params_after = {}

  def record(step, state):
    params_after[step] = jax.device_get(nnx.to_pure_dict(state.params))
    return False

  with jax.set_mesh(mesh):
    state = trainer.train(config, setup, _batches(config, poisoned_steps={3}), hooks=[record])
  assert int(state.step) == 5 and int(state.nonfinite_steps) == 1 and int(state.nonfinite_streak) == 0
  jax.tree.map(np.testing.assert_array_equal, params_after[3], params_after[2])  # step 3's update skipped
  assert not np.array_equal(params_after[4]["wte"], params_after[3]["wte"])  # and training goes on
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_after[5]))


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(tmp_path):
  config = _train_config(tmp_path, steps=6, checkpoint=CheckpointConfig(max_consecutive_nonfinite=2))
  mesh, setup = _setup(config, jax.devices())
  with jax.set_mesh(mesh), pytest.raises(FloatingPointError, match="max_consecutive_nonfinite=2"):
    trainer.train(config, setup, _batches(config, poisoned_steps={2, 3}))


def test_checkpoints_with_non_finite_values_are_never_written(tmp_path):
  saver = checkpoint.TrainCheckpointer(tmp_path, CheckpointConfig(), TINY)
  with pytest.raises(FloatingPointError, match="step 7"):
    saver.save(7, {"w": np.array([1.0, np.nan])}, {})
  saver.wait_until_finished()
  assert saver.all_steps() == []


def test_a_workdir_of_another_model_config_fails_naming_the_fields(tmp_path):
  checkpoint.TrainCheckpointer(tmp_path, CheckpointConfig(), TINY).close()
  checkpoint.TrainCheckpointer(tmp_path, CheckpointConfig(), dataclasses.replace(TINY, remat="full")).close()  # run-time only
  with pytest.raises(ValueError, match=r"(?s)d_model: checkpoint has 32, this run has 64.*n_layers"):
    checkpoint.TrainCheckpointer(tmp_path, CheckpointConfig(), dataclasses.replace(TINY, d_model=64, n_layers=3))


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"saved_scan={s}")
def test_a_run_starts_from_converted_weights(tmp_path, scan_layers):
  source = MPTForCausalLM(dataclasses.replace(TINY, scan_layers=scan_layers), rngs=nnx.Rngs(5))
  checkpoint.save_model(source, tmp_path / "converted")
  config = _train_config(tmp_path / "run", checkpoint=CheckpointConfig(init_from=str(tmp_path / "converted")))
  mesh, setup = _setup(config, jax.devices())
  with jax.set_mesh(mesh):
    state = trainer._restore_or_init(config, setup, checkpoint.TrainCheckpointer(tmp_path / "ckpt", config.checkpoint, TINY), iter(()))
  expected = nnx.to_pure_dict(nnx.state(checkpoint.load_model(tmp_path / "converted", scan_layers=True), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(state.params)), expected)
  assert int(state.step) == 0
