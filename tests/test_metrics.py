"""The history a workdir keeps: one run's, whether it resumed or started over."""

import json

from mpt_jax import metrics


def _steps(workdir) -> list[int]:
  return [json.loads(line)["step"] for line in (workdir / metrics.METRICS_FILE).read_text().splitlines()]


def _log(workdir, steps, *, resumed_step):
  writer = metrics.MetricsWriter(workdir, resumed_step=resumed_step)
  for step in steps:
    writer.write(step, {"loss": 10.0 / step})
  writer.close()


def test_a_resumed_run_replaces_what_was_logged_after_its_step(tmp_path):
  _log(tmp_path, range(1, 9), resumed_step=None)
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 9, "lo')  # killed mid-write
  _log(tmp_path, range(6, 11), resumed_step=5)  # the checkpoint of step 5; steps 6-9 are replayed
  assert _steps(tmp_path) == list(range(1, 11))


def test_a_fresh_start_moves_an_earlier_runs_history_aside(tmp_path):
  _log(tmp_path, range(1, 9), resumed_step=None)
  _log(tmp_path, range(1, 4), resumed_step=None)  # e.g. after rm -r WORKDIR/checkpoints
  assert _steps(tmp_path) == [1, 2, 3]
  (previous,) = (tmp_path / metrics.PREVIOUS_DIR).iterdir()
  assert _steps(previous) == list(range(1, 9))
  assert sorted(p.name for p in previous.iterdir()) == [metrics.LOSS_PNG, metrics.METRICS_FILE, metrics.TENSORBOARD_DIR]
  assert len(list((tmp_path / metrics.TENSORBOARD_DIR).iterdir())) == 1  # the new run's event file only
