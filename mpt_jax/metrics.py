"""What a training run reports: MFU, and the writers for TensorBoard, metrics.jsonl and the loss PNG.

MFU follows llm-foundry (reference-mpt-1b.md §7): 6 FLOPs per parameter per token (forward
plus backward, embedding included) plus full-square attention, 12 * n_layers * d_model *
seq_len per token; 9.0766e9 for MPT-1B at 2048. Only process 0 writes files.
"""

import json
import os
import pathlib

# Dense bf16 peak per device (Composer's speed_monitor.py). H200 is the H100 die with more memory.
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


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
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter  # heavy (protobuf); only the writing process needs it

      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))
      _drop_partial_last_line(self.workdir / METRICS_FILE)
      self._jsonl = open(self.workdir / METRICS_FILE, "a")

  def write(self, step: int, metrics: dict[str, float | None]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      if value is not None:
        self._tensorboard.add_scalar(name if "/" in name else f"train/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._tensorboard.close()
    self._jsonl.close()
    plot_loss(self.workdir / METRICS_FILE, self.workdir / LOSS_PNG)


def _drop_partial_last_line(metrics_file: pathlib.Path) -> None:
  """A run killed mid-write leaves half a line; cut it so the resumed run appends whole lines."""
  if not metrics_file.exists():
    return
  data = metrics_file.read_bytes()
  if data and not data.endswith(b"\n"):
    with open(metrics_file, "r+b") as f:
      f.truncate(data.rfind(b"\n") + 1)


def plot_loss(metrics_file: pathlib.Path, path: pathlib.Path) -> None:
  """Training loss (and the held-out eval/loss, if logged) against step from metrics.jsonl, via a temp file + rename.

  All of it, a resumed run's too; a metric logged twice for a step (replayed after a crash) counts once.
  """
  history: dict[int, dict] = {}
  for record in map(json.loads, metrics_file.read_text().splitlines()):
    history.setdefault(record["step"], {}).update(record)
  curves = {label: [(step, history[step][key]) for step in sorted(history) if key in history[step]]
            for label, key in (("train", "loss"), ("held-out", "eval/loss"))}
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
  tmp = path.with_name(f".{path.name}.tmp")
  fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  tmp.rename(path)
