"""Fault tolerance: exact resume after kill -9, SIGTERM and Ctrl-C, atomic async saves, damaged
checkpoints, resharded restore, the NaN guard, changed configs, one run per workdir, and
fine-tuning from converted weights."""

import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import train
from mpt_jax import MPTForCausalLM, checkpoint, integrity, model_folder, sharding, trainer
from mpt_jax.config import CheckpointConfig, MeshConfig, MPTConfig, OptimConfig, TrainConfig
from mpt_jax.lock import WorkdirLock, WorkdirLocked

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20
# train.py on the embedded corpus, a toy model: 20 steps, a checkpoint every 2, every step logged.
RUN = [
  "--model.d-model",
  "64",
  "--model.n-layers",
  "2",
  "--seq-len",
  "64",
  "--global-batch-size",
  "8",
  "--steps",
  str(STEPS),
  "--log-every",
  "1",
  "--sample-tokens",
  "0",
]


def _launch(workdir, *extra, compilation_cache=True) -> subprocess.Popen:
  """train.py in a subprocess; its stderr (the log) goes to ``process.log``, a file beside the workdir.

  ``compilation_cache=False``: compile without the session's cache (conftest.py), for a test
  that needs the compilation to take its real time.
  """
  log = pathlib.Path(workdir).with_name(f"{pathlib.Path(workdir).name}-{time.monotonic_ns()}.log")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  if not compilation_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  with open(log, "w") as stderr:
    process = subprocess.Popen(
      [sys.executable, "train.py", "--workdir", str(workdir), *RUN, *extra],
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=stderr,
    )
  process.log = log
  return process


def _finish(process: subprocess.Popen, expected=(0, -signal.SIGKILL)) -> int:
  process.wait(timeout=240)
  assert process.returncode in expected, process.log.read_text()[-3000:]
  return process.returncode


def _logged(process: subprocess.Popen, text: str) -> bool:
  return text in process.log.read_text(errors="replace")


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


def _losses_by_step(workdir) -> dict[int, float]:
  return {record["step"]: record["loss"] for record in _records(workdir)}


def _final_state(workdir) -> dict:
  """The last checkpoint's train state as host numpy arrays."""
  directory = pathlib.Path(workdir) / "checkpoints"
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == STEPS
    restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  return jax.tree.map(_host, restored.state)


def _assert_same_run(workdir, reference):
  """Each step logged once (steps replayed after a restart replace what was logged of them), with
  the uninterrupted run's loss, bit for bit; the same final state."""
  assert [record["step"] for record in _records(workdir)] == list(range(1, STEPS + 1))
  assert _losses_by_step(workdir) == reference["losses"]
  jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), reference["state"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 20-step run; it keeps the checkpoints of steps 14 to 20."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  assert _finish(_launch(workdir, "--checkpoint.every-steps", "2", "--checkpoint.keep-last", "4")) == 0
  return {"workdir": workdir, "losses": _losses_by_step(workdir), "state": _final_state(workdir)}


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


def test_ctrl_c_checkpoints_at_the_step_reached_and_a_second_ctrl_c_aborts_at_once(tmp_path, reference):
  # Twice while train_step compiles (Python runs no signal handler until that call returns).
  run = _launch(tmp_path, "--checkpoint.every-steps", "0", compilation_cache=False)
  _wait_for(lambda: _logged(run, "compile train_step ..."), run)
  run.send_signal(signal.SIGINT)
  _wait_for(lambda: _logged(run, "press Ctrl-C again"), run)
  run.send_signal(signal.SIGINT)
  start = time.monotonic()
  assert _finish(run, expected=(130,)) == 130 and time.monotonic() - start < 5
  assert _logged(run, "aborted without a checkpoint") and _latest_complete_step(tmp_path) is None
  # Once, during training: a checkpoint of the step reached, then exit 130, no traceback.
  run = _launch(tmp_path, "--checkpoint.every-steps", "0")
  _wait_for(lambda: _records(tmp_path) and _records(tmp_path)[-1]["step"] >= 7, run)
  run.send_signal(signal.SIGINT)
  assert _finish(run, expected=(130,)) == 130
  reached = _records(tmp_path)[-1]["step"]
  assert 7 <= reached < STEPS and _latest_complete_step(tmp_path) == reached
  assert _logged(run, f"Ctrl-C: checkpoint of step {reached} written") and not _logged(run, "Traceback")
  assert _finish(_launch(tmp_path, "--checkpoint.every-steps", "0")) == 0
  _assert_same_run(tmp_path, reference)


def _damage(step_dir: pathlib.Path, how: str) -> str:
  """Damages a checkpoint as disks and copies do; returns the file it hit, relative to ``step_dir``."""
  data = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
  if how == "truncate":
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  elif how == "delete metadata":
    data = step_dir / "state" / "_METADATA"
    data.unlink()
  elif how == "flip 400 bytes":
    raw = bytearray(data.read_bytes())
    raw[1000:1400] = bytes(b ^ 0xFF for b in raw[1000:1400])
    data.write_bytes(bytes(raw))
  return str(data.relative_to(step_dir))


def test_damaged_checkpoints_are_passed_over_naming_the_damage(tmp_path, reference, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  damaged = {
    20: _damage(workdir / "checkpoints" / "20", "truncate"),
    18: _damage(workdir / "checkpoints" / "18", "delete metadata"),
    16: _damage(workdir / "checkpoints" / "16", "flip 400 bytes"),
  }
  run = _launch(workdir, "--checkpoint.every-steps", "2")
  assert _finish(run) == 0
  log = run.log.read_text()
  for step, file in damaged.items():
    assert f"checkpoint of step {step} in {workdir / 'checkpoints'} is unusable: {file}" in log
  assert "resumed from the checkpoint of step 14" in log
  assert sorted(p.name.split("-")[0] for p in (workdir / "checkpoints.broken").iterdir()) == ["16", "18", "20"]
  _assert_same_run(workdir, reference)
  # None intact: one line naming each problem, exit 2, nothing moved.
  kept = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == ["16", "18", "20"]  # new ones, saved by the resumed run (keep_last 3)
  for step in kept:
    _damage(workdir / "checkpoints" / step, "truncate")
  capsys.readouterr()
  assert train.run(["--workdir", str(workdir), *RUN]) == 2
  stderr = capsys.readouterr().err
  assert stderr.splitlines()[-1].startswith(
    f"error: no intact checkpoint in {workdir / 'checkpoints'} (step 20: state/"
  )
  assert "Traceback" not in stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == kept


TINY = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=16, dtype="float32", attn_impl="xla")


def _train_config(workdir, **fields) -> TrainConfig:
  defaults = dict(
    model=TINY,
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    workdir=str(workdir),
    seq_len=16,
    global_batch_size=8,
    steps=4,
    log_every=1,
    sample_tokens=0,
  )
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
  saver = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config)
  saver.save(3, saved, {"step": 3})
  saver.wait_until_finished()
  mesh, setup = _setup(config, jax.devices()[:n_devices])
  target = sharding.with_shardings(setup.abstract_state, setup.state_shardings)
  restored = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config).restore_latest(target)
  assert (restored.step, restored.data) == (3, {"step": 3})
  for before, after in zip(jax.tree.leaves(saved), jax.tree.leaves(restored.state)):
    assert after.sharding.device_set <= set(jax.devices()[:n_devices])
    np.testing.assert_array_equal(_host(after), _host(before))


def test_a_run_checkpointed_on_8_devices_continues_on_2_with_the_losses_it_would_have_had(tmp_path):
  """The 8-GPU -> 2-GPU rehearsal on 8 virtual CPU devices: train on 8, checkpoint at step 3,
  restore that checkpoint on a 2-device mesh and train on; steps 4-6 give the 8-device run's
  losses (float32, so only reduction order differs) and the data position carries over."""
  config = _train_config(tmp_path, steps=6)
  batches = [rows for _, rows in zip(range(6), _batches(config))]

  def train_steps(devices, state, steps):
    mesh, setup = _setup(config, devices)
    with jax.set_mesh(mesh):
      state = setup.init() if state is None else state
      losses = []
      for step in steps:
        state, step_metrics = setup.train_step(state, sharding.global_batch(batches[step - 1], mesh))
        losses.append(float(step_metrics["loss"]))
    return state, losses

  state, losses_8 = train_steps(jax.devices(), None, range(1, 4))
  saver = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config)
  saver.save(3, state, {"batches_read": 3})
  saver.wait_until_finished()
  _, later_8 = train_steps(jax.devices(), state, range(4, 7))

  two = jax.devices()[:2]
  mesh, setup = _setup(config, two)
  restored = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config).restore_latest(
    sharding.with_shardings(setup.abstract_state, setup.state_shardings)
  )
  assert (restored.step, restored.data) == (3, {"batches_read": 3})
  assert all(x.sharding.device_set == set(two) for x in jax.tree.leaves(restored.state.params))
  _, later_2 = train_steps(two, restored.state, range(4, 7))
  assert losses_8[-1] != later_8[0]  # the run trains, so equal losses are not trivially equal
  np.testing.assert_allclose(later_2, later_8, rtol=1e-5)


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
  saver = checkpoint.TrainCheckpointer(tmp_path, _train_config(tmp_path))
  with pytest.raises(FloatingPointError, match="step 7"):
    saver.save(7, {"w": np.array([1.0, np.nan])}, {})
  saver.wait_until_finished()
  assert saver.all_steps() == []


@pytest.fixture(scope="module")
def tiny_state():
  """A TINY train state on one device and the abstract target to restore it into."""
  config = _train_config("unused")
  mesh, setup = _setup(config, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = setup.init()
  return state, sharding.with_shardings(setup.abstract_state, setup.state_shardings)


def test_a_checkpoint_holding_nan_is_passed_over_and_none_intact_fails_naming_each(
  tmp_path, tiny_state, monkeypatch, caplog
):
  state, target = tiny_state
  saver = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", _train_config(tmp_path))
  saver.save(1, state, {"step": 1})
  with monkeypatch.context() as m:  # as an older mpt-jax, or a state damaged in memory, could have written
    m.setattr(checkpoint, "_all_finite", lambda tree: True)
    saver.save(2, state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params)), {"step": 2})
    saver.wait_until_finished()
  assert integrity.verify(tmp_path / "checkpoints" / "2") is None  # written whole: the checksums match
  with caplog.at_level(logging.WARNING):
    restored = saver.restore_latest(target)
  assert (
    restored.step == 1
    and "checkpoint of step 2 in" in caplog.text
    and "its train state holds NaN or inf" in caplog.text
  )
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.broken").iterdir()] == ["2"]
  _damage(tmp_path / "checkpoints" / "1", "flip 400 bytes")
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"no intact checkpoint in .* \(step 1: state/ocdbt.process_0/d/\w+ has other contents",
  ):
    saver.restore_latest(target)
  saver.close()


def test_a_save_that_fails_for_lack_of_space_names_the_cause_and_the_earlier_checkpoints_stay(
  tmp_path, tiny_state, monkeypatch
):
  state, target = tiny_state
  config = _train_config(tmp_path)
  saver = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", config)
  saver.save(1, state, {"step": 1})
  saver.wait_until_finished()

  def full_disk(folder):  # the last write of a save: everything else is on disk, not yet renamed into place
    raise OSError(errno.ENOSPC, "No space left on device", str(folder / integrity.MANIFEST))

  monkeypatch.setattr(integrity, "write", full_disk)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"could not write a checkpoint in .*No space left on device.*rerun the same command",
  ):
    saver.save(2, state, {"step": 2})
    saver.wait_until_finished()
  monkeypatch.undo()
  saver.close()
  resumer = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", config)
  assert resumer.all_steps() == [1] and resumer.restore_latest(target).step == 1
  resumer.close()


def test_resuming_with_another_config_is_refused_naming_each_changed_field(tmp_path, tiny_state, caplog):
  state, target = tiny_state
  config = _train_config(tmp_path)
  saver = checkpoint.TrainCheckpointer(tmp_path, config)
  saver.save(2, state, {"step": 2})
  saver.close()

  def resume(**fields):
    resumer = checkpoint.TrainCheckpointer(tmp_path, dataclasses.replace(config, **fields))
    try:
      return resumer.restore_latest(target)
    finally:
      resumer.close()

  lr, allow = dataclasses.replace(config.optim, lr=1e-3), CheckpointConfig(allow_config_changes=True)
  with pytest.raises(
    ValueError,
    match=r"global_batch_size=8 \(this run: 16\), optim.lr=0.01 \(this run: 0.001\).*"
    r"global_batch_size cannot change when resuming.*optim.lr may change with --checkpoint.allow-config-changes",
  ):
    resume(global_batch_size=16, optim=lr)
  with pytest.raises(
    ValueError, match=r"optim.name='decoupled_adamw' \(this run: 'decoupled_lionw'\).*optim.name cannot change"
  ):
    resume(
      optim=dataclasses.replace(config.optim, name="decoupled_lionw"), checkpoint=allow
    )  # the flag cannot allow it
  with pytest.raises(ValueError, match=r"checkpoint.init_from='' \(this run: 'converted'\)"):
    resume(checkpoint=CheckpointConfig(init_from="converted"))  # never silently ignored
  with pytest.raises(ValueError, match=r"model.n_layers=2 \(this run: 3\)"):
    resume(model=dataclasses.replace(TINY, n_layers=3))
  assert (
    resume(mesh=MeshConfig(fsdp=2), log_every=5, checkpoint=CheckpointConfig(every_steps=7)).step == 2
  )  # how, not what
  with caplog.at_level(logging.WARNING):
    assert resume(optim=lr, steps=8, checkpoint=allow).step == 2
  assert "optim.lr changed from 0.01 to 0.001" in caplog.text and "steps changed from 4 to 8" in caplog.text
  assert not (tmp_path.parent / f"{tmp_path.name}.broken").exists()  # refusals move nothing aside


def test_a_workdir_without_checkpoints_takes_any_config(tmp_path, tiny_state):
  """As after a run refused at start (say --steps -5) or killed before its first checkpoint."""
  _, target = tiny_state
  checkpoint.TrainCheckpointer(tmp_path, _train_config(tmp_path)).close()
  other = checkpoint.TrainCheckpointer(
    tmp_path, _train_config(tmp_path, model=dataclasses.replace(TINY, d_model=64, n_layers=3))
  )
  assert other.restore_latest(target) is None
  other.close()


def test_a_second_run_on_a_workdir_in_use_refuses_naming_the_first(tmp_path, capsys):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from mpt_jax.lock import WorkdirLock; "
      "WorkdirLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(300)",
      str(tmp_path),
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "held\n"
    assert train.run(["--workdir", str(tmp_path), *RUN]) == 2
    expected = f"error: {tmp_path} is in use by the run of pid {holder.pid} on host {socket.gethostname()}"
    assert capsys.readouterr().err.startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]  # the second run wrote nothing
    with pytest.raises(WorkdirLocked):
      WorkdirLock(tmp_path).__enter__()
  finally:
    holder.kill()  # SIGKILL: the lock goes with the process, none is left stale
    holder.wait()
  with WorkdirLock(tmp_path):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"saved_scan={s}")
def test_a_run_starts_from_converted_weights_and_resumes_without_reloading_them(tmp_path, scan_layers, caplog):
  source = MPTForCausalLM(dataclasses.replace(TINY, scan_layers=scan_layers), rngs=nnx.Rngs(5))
  model_folder.save_model(source, tmp_path / "converted")
  config = _train_config(tmp_path / "run", checkpoint=CheckpointConfig(init_from=str(tmp_path / "converted")))
  mesh, setup = _setup(config, jax.devices())
  saver = checkpoint.TrainCheckpointer(tmp_path / "ckpt", config)
  with jax.set_mesh(mesh):
    state, resumed_step = trainer._restore_or_init(config, setup, saver, iter(()))
  expected = nnx.to_pure_dict(nnx.state(checkpoint.load_model(tmp_path / "converted", scan_layers=True), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(state.params)), expected)
  assert int(state.step) == 0 and resumed_step is None
  saver.save(2, state.replace(step=state.step + 2), {})
  saver.wait_until_finished()
  with jax.set_mesh(mesh), caplog.at_level(logging.INFO):
    state, resumed_step = trainer._restore_or_init(config, setup, saver, iter(()))
  assert int(state.step) == 2 and resumed_step == 2
  assert f"checkpoint.init_from={tmp_path / 'converted'} is not loaded again" in caplog.text
  saver.close()
