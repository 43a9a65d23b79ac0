"""What may change when a run resumes: a changed field either changes nothing the checkpoint
holds, or changes the updates from the restored step on, or makes the checkpoint another run's.

Every training checkpoint records the TrainConfig that wrote it (mpt_jax.checkpoint); a run
that resumes compares the two field by field, by dotted name ("optim.lr", "mesh.fsdp"). A
field listed in neither tuple below decides the train state's shape or contents (the model's
architecture, scan_layers, param_dtype, seed, the optimizer's kind, init_from) or which rows
come next (seq_len, global_batch_size, the data): changing it is always refused, which is
also what a field added to TrainConfig gets until it is listed here.
"""

import dataclasses
import fnmatch
import json
import logging
from typing import Any, Literal

from mpt_jax.config import RUNTIME_FIELDS, STORED_LAYOUT_FIELDS, TrainConfig

# How the run executes, not what it computes: change freely. The model's run-time fields are
# free except those that decide the stored parameters' layout (mpt_jax.config.RUNTIME_FIELDS).
FREE = (
  "workdir",
  "mesh.*",
  "micro_batch_size",
  "log_every",
  "peak_flops",
  "sample_tokens",
  *(f"model.{name}" for name in RUNTIME_FIELDS if name not in STORED_LAYOUT_FIELDS),
  "data.prepared_dir",
  "data.positions",  # a field older runs recorded (it produced an array nothing read); gone since
  "checkpoint.every_steps",
  "checkpoint.keep_last",
  "checkpoint.keep_every",
  "checkpoint.async_save",
  "checkpoint.max_consecutive_nonfinite",
  "checkpoint.allow_config_changes",
)
# What the updates do from the restored step on (the LR schedule, ...), not the state's layout:
# refused unless CheckpointConfig.allow_config_changes, then logged.
ALLOWED = (
  "steps",
  "z_loss",
  "optim.lr",
  "optim.betas",
  "optim.eps",
  "optim.weight_decay",
  "optim.warmup_steps",
  "optim.alpha_f",
  "optim.grad_clip_norm",
  "data.segment_ids",
)


def record(config: TrainConfig) -> dict[str, Any]:
  """``config`` as the JSON-compatible nested dict a checkpoint records."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def changes(recorded: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
  """Dotted field name -> (recorded value, ``config``'s value), for each field that differs."""
  saved, current = _flatten(recorded), _flatten(record(config))
  return {
    k: (saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)
  }


def tier(field: str) -> Literal["free", "allowed", "refused"]:
  """How a change of the dotted ``field`` is treated when resuming (see FREE, ALLOWED)."""
  if any(fnmatch.fnmatchcase(field, pattern) for pattern in FREE):
    return "free"
  return "allowed" if field in ALLOWED else "refused"


def check(recorded: dict[str, Any], config: TrainConfig, *, where: str) -> None:
  """Raises ValueError naming every changed field unless ``config`` may resume ``recorded``'s
  checkpoint (``where``, e.g. "DIR holds step 8"); logs the changes it allows."""
  changed = changes(recorded, config)
  refused = [k for k in changed if tier(k) == "refused"]
  allowed = [k for k in changed if tier(k) == "allowed"]
  permitted = config.checkpoint.allow_config_changes
  if refused or (allowed and not permitted):
    listed = ", ".join(f"{k}={changed[k][0]!r} (this run: {changed[k][1]!r})" for k in refused + allowed)
    why = []
    if refused:
      why.append(
        f"{', '.join(refused)} cannot change when resuming (the train state or the data position depends on it): "
        "use another --workdir"
      )
    if allowed and not permitted:
      why.append(f"{', '.join(allowed)} may change with --checkpoint.allow-config-changes")
    raise ValueError(f"{where} of a run with another config: {listed}; {'; '.join(why)}")
  for k in allowed:
    logging.warning(
      "%s: resuming with %s changed from %r to %r (checkpoint.allow_config_changes)", where, k, *changed[k]
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _flatten(value, f"{prefix}{key}.")
    else:
      flat[f"{prefix}{key}"] = value
  return flat
