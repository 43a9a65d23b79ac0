"""Training checkpoints: a run's train state, data position and TrainConfig, and reading them back.

``TrainCheckpointer`` keeps them under WORKDIR/checkpoints, each checkpoint with checksums of
its files (mpt_jax.integrity); a restore takes the newest checkpoint that is intact and
refuses one written with a config this run may not change (mpt_jax.resume).

``load_model`` / ``load_params`` read either a model folder (mpt_jax.model_folder: what the
converters write) or, given a training workdir, the parameters of its newest intact
checkpoint: what generation, evaluation and export take.

One idea, near 300 lines: a run's checkpoints on disk, written and read back intact.
"""

import collections
import contextlib
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mpt_jax import integrity, paths, resume
from mpt_jax.config import MPTConfig, TrainConfig, dtype_name
from mpt_jax.model import MPTForCausalLM
from mpt_jax.model_folder import (
  CONFIG_FILE,
  PARAMS_DIR,
  CheckpointError,
  abstract_params,
  model_from_params,
  read_config,
  read_model,
  read_params,
  relayout_blocks,
)

CHECKPOINT_DIR = "checkpoints"  # a training workdir's checkpoints


def load_params(path: str | os.PathLike) -> tuple[MPTConfig, dict[str, Any]]:
  """Host numpy parameters as stored (no device copies): for exporting to PyTorch.

  ``path`` is a model folder or a training workdir (the newest intact checkpoint's parameters).
  """
  if _is_workdir(path):
    return _workdir_params(paths.workdir_path(path) / CHECKPOINT_DIR)
  return read_params(path)


def load_model(path: str | os.PathLike, **config_overrides) -> MPTForCausalLM:
  """The model saved at ``path``, restored into an abstract model.

  Args:
    path: a folder written by model_folder.save_model (or convert/torch_to_flax.py), or a
      training workdir (WORKDIR of train.py: the parameters of its newest intact checkpoint).
    **config_overrides: MPTConfig fields to change, e.g. dtype="float32" (or jnp.float32),
      attn_impl="xla", scan_layers=False (the stored layer layout is converted), param_dtype
      (cast on restore).
  """
  for name in ("dtype", "param_dtype"):
    if name in config_overrides:
      config_overrides[name] = dtype_name(config_overrides[name])
  if not _is_workdir(path):
    return read_model(path, dataclasses.replace(read_config(path), **config_overrides))
  saved, params = load_params(path)
  config = dataclasses.replace(saved, **config_overrides)
  if saved.scan_layers != config.scan_layers:
    params["blocks"] = relayout_blocks(params["blocks"], config)
  return model_from_params(config, jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params))


def _is_workdir(path: str | os.PathLike) -> bool:
  """True for a training workdir, False for a model folder; neither is an error naming both."""
  path = paths.workdir_path(path)
  if (path / CONFIG_FILE).is_file():
    return False
  if (path / CHECKPOINT_DIR).is_dir():
    return True
  raise FileNotFoundError(
    f"{path} is neither a model folder ({CONFIG_FILE} + {PARAMS_DIR}/, written by save_model or "
    f"convert/torch_to_flax.py) nor a training workdir ({CHECKPOINT_DIR}/, written by train.py)"
  )


CONFIG_ITEM = "config"  # each checkpoint's item holding the TrainConfig that wrote it


class Restored(NamedTuple):
  step: int
  state: Any  # laid out like the abstract state asked for
  data: dict  # the data iterator's position


class TrainCheckpointer:
  """The train state, the data iterator's position and the TrainConfig, every N steps, via orbax.

  A checkpoint is ``<directory>/<step>/{state,data,config}``; orbax writes it under a temporary
  name and renames it when complete, so one being written when the process died is never
  restored. Just before that rename, the checksums of its files are recorded (orbax's commit
  callback), so a checkpoint in place always has them. Saves are asynchronous (the
  device-to-host copy blocks, the writing does not); restores go straight into the shardings
  asked for, whatever mesh saved the checkpoint.
  """

  def __init__(self, directory: str | os.PathLike, config: TrainConfig):
    self.directory = paths.workdir_path(directory)
    self.config = config
    self._record = resume.record(config)
    self._committing = collections.deque()  # steps saved whose checksums are not written yet (process 0)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep_last,
      keep_period=config.checkpoint.keep_every or None,
      enable_async_checkpointing=True,  # also for async_save=False (then waited for): the commit callback needs it
      async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves ``state`` (any pytree of arrays), the iterator position and the config; refuses non-finite values."""
    if not _all_finite(state):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the train state holds NaN or inf")
    if jax.process_index() == 0:
      self._committing.append(step)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(self._record)
    )
    with self._writing():
      self._manager.save(step, args=args, force=True)  # waits for the previous save: its error surfaces here
      if not self.config.checkpoint.async_save:
        self._manager.wait_until_finished()

  def _write_checksums(self) -> None:
    """Orbax's commit callback (process 0, background thread): every file is written, not yet renamed."""
    step = self._committing.popleft()  # saves commit one at a time, in order
    folder = next(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"), self.directory / str(step))
    integrity.write(folder)

  def restore_latest(self, abstract_state) -> Restored | None:
    """The newest intact checkpoint, laid out like ``abstract_state`` (ShapeDtypeStructs with shardings).

    Intact: its files match their checksums, it restores, and its state is finite. Newer
    checkpoints that are not are logged with what is wrong and moved to
    ``<directory>.broken/``, out of the way of the steps the run will save again.

    Returns:
      None when there is no checkpoint at all.

    Raises:
      CheckpointError: there are checkpoints but none is intact.
      ValueError: the checkpoint was written with a config this run may not change
        (mpt_jax.resume); nothing is restored or moved.
    """

    def check(step, recorded):
      if recorded is None:
        logging.warning(
          "checkpoint of step %d records no TrainConfig (an older mpt-jax wrote it): config not checked", step
        )
      else:
        resume.check(recorded, self.config, where=f"{self.directory} holds step {step}")

    def restore(step, recorded):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      restored = self._manager.restore(step, args=args)
      if not _all_finite(restored.state):
        raise CheckpointError("its train state holds NaN or inf")
      return Restored(step, restored.state, restored.data)

    found = _newest_intact(self._manager, self.directory, check=check, restore=restore)
    if found is not None and found.broken:
      self._set_aside(found.broken)
    return None if found is None else found.restored

  def _set_aside(self, broken: dict[int, str]) -> None:
    aside = self.directory.with_name(f"{self.directory.name}.broken")
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in broken:
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.move(self.directory / str(step), target)  # a folder: copied file by file on an object store
        logging.warning("moved the unusable checkpoint of step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mpt_jax.checkpoint.set_aside")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _writing(self):
    """A save that fails (a full disk, say) ends the run naming the cause; what it wrote is never restored."""
    try:
      yield
    except Exception as e:
      raise CheckpointError(
        f"could not write a checkpoint in {self.directory} ({integrity.describe_failure(e)}); the complete "
        "checkpoints there are intact: once the cause is fixed, rerun the same command to resume from the newest"
      ) from e

  def close(self) -> None:
    self._manager.close()


def _workdir_params(directory: pathlib.Path) -> tuple[MPTConfig, dict[str, Any]]:
  """The model config and host numpy parameters of the newest intact checkpoint under ``directory``."""

  def restore(step, recorded):
    if recorded is None:
      raise CheckpointError("it records no TrainConfig (an older mpt-jax wrote it), so its model is unknown")
    config = MPTConfig(**recorded["model"])
    # The state stores each parameter as params/<path>/value (an nnx.Param); only those are read.
    target = {"params": jax.tree.map(lambda x: {"value": x}, abstract_params(config))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    params = manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]
    params = jax.tree.map(lambda v: v["value"], params, is_leaf=lambda x: isinstance(x, dict) and "value" in x)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
      raise CheckpointError("its parameters hold NaN or inf")
    logging.info("parameters of the checkpoint of step %d in %s", step, directory)
    return config, params

  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    found = _newest_intact(manager, directory, restore=restore)
  if found is None:
    raise FileNotFoundError(f"{directory} holds no checkpoint")
  return found.restored


class _Found(NamedTuple):
  restored: Any  # what restore(step, recorded config) returned
  broken: dict[int, str]  # newer checkpoints passed over: step -> what is wrong with it


def _newest_intact(
  manager: ocp.CheckpointManager,
  directory: pathlib.Path,
  *,
  restore: Callable[[int, dict | None], Any],
  check: Callable[[int, dict | None], None] = lambda step, recorded: None,
) -> _Found | None:
  """The newest usable checkpoint: None when there is none at all; CheckpointError naming each problem when none is usable.

  Tries the checkpoints newest first: checksums (on process 0; the others follow its verdict),
  then ``check(step, recorded config)``, whose errors propagate (a refused config is not a
  damaged checkpoint), then ``restore(step, recorded config)``, where a CheckpointError or an
  orbax error marks the step broken.
  """
  integrity.quiet_abandoned_reads()
  broken = {}
  for step in sorted(manager.all_steps(), reverse=True):
    folder = directory / str(step)
    problem = _verify(folder, step) if jax.process_index() == 0 else None
    if _everywhere(problem is None):
      try:
        recorded = (
          manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
          if (folder / CONFIG_ITEM).is_dir()
          else None
        )
      except Exception as e:
        problem = f"its {CONFIG_ITEM} cannot be read ({integrity.describe_failure(e)})"
    if _everywhere(problem is None):
      check(step, recorded)
      try:
        restored = restore(step, recorded)
      except CheckpointError as e:
        problem = str(e)
      except Exception as e:  # orbax and tensorstore raise many types for damaged files
        problem = f"it cannot be restored ({integrity.describe_failure(e)})"
    if _everywhere(problem is None):
      return _Found(restored, broken)
    broken[step] = problem or "it is damaged on another process"
    logging.warning("checkpoint of step %d in %s is unusable: %s", step, directory, broken[step])
  if broken:
    problems = "; ".join(f"step {step}: {problem}" for step, problem in broken.items())
    raise CheckpointError(f"no intact checkpoint in {directory} ({problems}); move it aside to start the run over")
  return None


def _verify(folder: pathlib.Path, step: int) -> str | None:
  if not integrity.exists(folder):
    logging.warning(
      "checkpoint of step %d has no %s (an older mpt-jax wrote it, or it was deleted): not verified",
      step,
      integrity.MANIFEST,
    )
    return None
  return integrity.verify(folder)


def _everywhere(ok: bool) -> bool:
  """True only if ``ok`` on every process, so all processes take the same branch."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
