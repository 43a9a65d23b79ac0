"""What a training run reports: MFU, and the writers for TensorBoard, metrics.jsonl and the loss PNG.

MFU follows llm-foundry (docs/training.md, "The run"): 6 FLOPs per parameter per token (forward
plus backward, embedding included) plus full-square attention, 12 * n_layers * d_model *
seq_len per token; 9.0766e9 for MPT-1B at 2048. Only process 0 writes files.

A workdir's history is one run's: a resumed run first drops what was logged after the
restored step (it is about to be logged again), a fresh run first moves an earlier run's
files to WORKDIR/previous/<time>/.

The workdir may be a gs:// URL (mpt_jax.paths). Object stores cannot append, so there
metrics.jsonl is kept in memory and the whole file rewritten at each write rather than
written locally and copied at the end: a preempted or crashed run (the usual end of a long
TPU run) keeps every logged step, and the file is small (a line of ~200 bytes per logged
step). tensorboardX does the same for its gs:// event files (it needs google-cloud-storage).
"""

import json
import os
import pathlib
import time

from mpt_jax import paths
from mpt_jax.atomic import atomic_file, write_atomically

# Dense bf16 peak per device (Composer's speed_monitor.py). H200 is the H100 die with more memory.
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
TENSORBOARD_DIR = "tensorboard"
PREVIOUS_DIR = "previous"  # earlier runs' history, one folder per fresh start


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
  """Training FLOPs per token: 3 * (2 * n_params + 2 * 2 * n_layers * d_model * seq_len)."""
  return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def peak_flops(device_kind: str) -> float | None:
  """Per-device peak for a ``jax.Device.device_kind`` such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
  return next((flops for name, flops in PEAK_FLOPS.items() if name in device_kind), None)


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilization of all devices together; None where the peak is unknown (CPU)."""
  if peak is None:
    return None
  return tokens_per_s * flops_per_token / (n_devices * peak)


class MetricsWriter:
  """Logged steps to TensorBoard event files and ``workdir/metrics.jsonl``; the loss PNG on close.

  A name without a slash is a training metric (TensorBoard tag ``train/<name>``); one with a
  slash, such as ``eval/loss``, is its own tag. Each ``write`` is one JSON line.

  ``resumed_step``: the step the run restored (history after it is dropped), or None for a
  fresh start (an earlier run's history is moved aside).
  """

  def __init__(self, workdir: str | os.PathLike, *, resumed_step: int | None, enabled: bool = True):
    self.workdir = paths.workdir_path(workdir)
    self.enabled = enabled
    self._remote = paths.is_remote(self.workdir)
    if enabled:
      from tensorboardX import SummaryWriter  # heavy (protobuf); only the writing process needs it

      self.workdir.mkdir(parents=True, exist_ok=True)
      if resumed_step is None:
        _move_history_aside(self.workdir)
      else:
        _keep_steps_up_to(self.workdir / METRICS_FILE, resumed_step)
      # purge_step: TensorBoard hides the events of steps after the restored one written before.
      purge_step = None if resumed_step is None else resumed_step + 1
      self._tensorboard = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step)
      if self._remote:  # no append: the lines so far, rewritten whole at each write (module docstring)
        file = self.workdir / METRICS_FILE
        self._lines = file.read_text().splitlines(keepends=True) if file.exists() else []
      else:
        self._jsonl = open(self.workdir / METRICS_FILE, "a")

  def write(self, step: int, metrics: dict[str, float | None]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      if value is not None:
        self._tensorboard.add_scalar(name if "/" in name else f"train/{name}", value, step)
    line = json.dumps({"step": step, **metrics}) + "\n"
    if self._remote:
      self._lines.append(line)
      write_atomically(self.workdir / METRICS_FILE, "".join(self._lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._tensorboard.close()
    if not self._remote:
      self._jsonl.close()
    plot_loss(self.workdir / METRICS_FILE, self.workdir / LOSS_PNG)


def _move_history_aside(workdir: pathlib.Path) -> None:
  """An earlier run's metrics.jsonl, tensorboard/ and loss.png -> workdir/previous/<time>/."""
  names = [n for n in (METRICS_FILE, TENSORBOARD_DIR, LOSS_PNG) if (workdir / n).exists()]
  if not names:
    return
  target = workdir / PREVIOUS_DIR / time.strftime("%Y%m%d-%H%M%S")
  while target.exists():  # two fresh starts within a second
    target = target.with_name(target.name + "+")
  target.mkdir(parents=True)
  for name in names:
    paths.move(workdir / name, target / name)


def _keep_steps_up_to(metrics_file: pathlib.Path, step: int) -> None:
  """Drops records after ``step`` (and half a line left by a kill mid-write), via a temp file + rename."""
  if not metrics_file.exists():
    return
  lines = metrics_file.read_bytes().split(b"\n")[:-1]  # the last element: "" or the half-written line
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  write_atomically(metrics_file, b"".join(line + b"\n" for line in kept))


def plot_loss(metrics_file: pathlib.Path, path: pathlib.Path) -> None:
  """Training loss (and the held-out eval/loss, if logged) against step from metrics.jsonl, via a temp file + rename.

  All of it, a resumed run's too; a metric logged twice for a step (replayed after a crash) counts once.
  """
  history: dict[int, dict] = {}
  for record in map(json.loads, metrics_file.read_text().splitlines()):
    history.setdefault(record["step"], {}).update(record)
  curves = {
    label: [(step, history[step][key]) for step in sorted(history) if key in history[step]]
    for label, key in (("train", "loss"), ("held-out", "eval/loss"))
  }
  if not curves["train"]:
    return
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, points in curves.items():
    if points:
      ax.plot(*zip(*points), label=label, marker="o" if label == "held-out" else None)
  ax.legend()
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
  ax.grid(alpha=0.3)
  with atomic_file(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
