"""Checkpoints on disk: model folders (config.json + orbax parameters) and training checkpoints.

``save_model`` / ``load_model`` are the Flax format that convert/torch_to_flax.py writes and
that training (to start fine-tuning) and generation restore. The folder holds

  config.json   MPTConfig.to_hf_dict (mosaic_gpt schema, or mpt for the mpt ALiBi slope rule)
                plus "mpt_jax": the run-time fields the parameters were stored with
  params/       orbax PyTree of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``

Restoring goes straight into an abstract model (nnx.eval_shape), as in flax's
examples/nnx_toy_examples/08_save_load_checkpoints.py, so nothing is allocated twice.

``TrainCheckpointer`` keeps a run's train state and data position (WORKDIR/checkpoints).
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mpt_jax.config import CheckpointConfig, MPTConfig
from mpt_jax.model import MPTForCausalLM, stack_layers, unstack_layers
from mpt_jax.sharding import with_shardings

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Fields that say how the stored tree looks (not part of the PyTorch config schema).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "attn_impl", "norm_impl", "scan_layers", "scan_unroll", "remat")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of ``path`` to fill; renames it to ``path`` only on success.

  A crash or error leaves nothing at ``path`` (and removes the temporary folder).
  """
  path = pathlib.Path(path)
  if path.exists():
    raise FileExistsError(f"{path} already exists; remove it or choose another output path")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    tmp.rename(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_config(config: MPTConfig, folder: pathlib.Path) -> None:
  """config.json in the schema that keeps the ALiBi slope rule, plus the run-time fields."""
  d = config.to_hf_dict(config.alibi_slope_rule)
  d["mpt_jax"] = {name: getattr(config, name) for name in _RUNTIME_FIELDS}
  (folder / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")


def read_config(folder: str | os.PathLike) -> MPTConfig:
  """The MPTConfig a save_model folder was written with."""
  file = pathlib.Path(folder) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: is {folder} a folder written by save_model?")
  d = json.loads(file.read_text())
  return MPTConfig.from_hf_dict(d, **d.get("mpt_jax", {}))


def save_params(params: dict[str, Any], config: MPTConfig, path: str | os.PathLike) -> None:
  """Writes a pure parameter dict (numpy or jax arrays, laid out per config.scan_layers).

  Saved as host numpy arrays, synchronously, so orbax's defensive copy of each array is
  skipped (the 1.3B model would otherwise need twice its size), and uncompressed: float
  weights shrink by only a few percent under zstd, for seconds of CPU per GB.
  """
  no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  handler = ocp.PyTreeCheckpointHandler(
      use_compression=False, type_handler_registry=ocp.type_handlers.create_type_handler_registry((np.ndarray, no_copy))
  )
  with atomic_directory(path) as tmp:
    write_config(config, tmp)
    with ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, params)))


def save_model(model: MPTForCausalLM, path: str | os.PathLike) -> None:
  """Writes ``model``'s config and parameters to the folder ``path`` (which must not exist)."""
  save_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, path)


def abstract_params(config: MPTConfig) -> dict[str, Any]:
  """The parameter tree of ``config`` as ShapeDtypeStructs; nothing allocated."""
  # jax.eval_shape, not nnx.eval_shape: the latter shards by the logical names under an active mesh.
  return jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(MPTForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)))


def load_params(path: str | os.PathLike) -> tuple[MPTConfig, dict[str, Any]]:
  """Host numpy parameters as stored (no device copies): for exporting to PyTorch."""
  config = read_config(path)
  target = abstract_params(config)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    params = checkpointer.restore(pathlib.Path(path).absolute() / PARAMS_DIR, item=target, restore_args=restore_args)
  return config, params


def load_model(path: str | os.PathLike, **config_overrides) -> MPTForCausalLM:
  """The model saved at ``path``, restored into an abstract model.

  Args:
    path: a folder written by save_model (or convert/torch_to_flax.py).
    **config_overrides: MPTConfig fields to change, e.g. dtype="float32", attn_impl="xla",
      scan_layers=False (the stored layer layout is converted), param_dtype (cast on restore).
  """
  saved = read_config(path)
  config = dataclasses.replace(saved, **config_overrides)
  stored = dataclasses.replace(config, scan_layers=saved.scan_layers)  # the saved layout; orbax casts the dtype
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params(stored))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(pathlib.Path(path).absolute() / PARAMS_DIR, target)
  if stored.scan_layers != config.scan_layers:
    params["blocks"] = _relayout_blocks(params["blocks"], config)
  return model_from_params(config, params)


def _relayout_blocks(blocks: dict[str, Any], config: MPTConfig) -> dict[str, Any]:
  """Block parameters from the other layer layout into ``config.scan_layers``'s (host numpy)."""
  if config.scan_layers:
    return stack_layers(list(blocks.values()))
  return dict(enumerate(unstack_layers(blocks, config.n_layers)))


def restore_params(path: str | os.PathLike, config: MPTConfig, shardings: dict[str, Any]) -> dict[str, Any]:
  """The parameters of the model folder ``path``, placed straight into ``shardings`` (a pure dict).

  Starts fine-tuning from converted weights: the folder's architecture must be ``config``'s.
  """
  saved = read_config(path)
  differ = [k for k in dataclasses.asdict(config) if k not in _RUNTIME_FIELDS and getattr(saved, k) != getattr(config, k)]
  if differ:
    raise ValueError(f"{path} holds a different model: " + ", ".join(f"{k}={getattr(saved, k)!r} (run: {getattr(config, k)!r})" for k in differ))
  if saved.scan_layers != config.scan_layers:  # change the layer layout on the host, then place
    _, params = load_params(path)
    params["blocks"] = _relayout_blocks(params["blocks"], config)
    return jax.device_put(jax.tree.map(lambda x: x.astype(config.param_dtype), params), shardings)
  stored = abstract_params(dataclasses.replace(config, scan_layers=saved.scan_layers))
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(pathlib.Path(path).absolute() / PARAMS_DIR, with_shardings(stored, shardings))


def model_from_params(config: MPTConfig, params: dict[str, Any]) -> MPTForCausalLM:
  """An MPTForCausalLM holding ``params`` (a pure dict laid out per config.scan_layers)."""
  graphdef, state = jax.eval_shape(lambda: nnx.split(MPTForCausalLM(config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------- training checkpoints

# Fields that may change between a run and its resumption; every other MPTConfig field
# decides the function or the shape of the stored state.
_RESUMABLE_FIELDS = ("dtype", "attn_impl", "norm_impl", "scan_unroll", "remat")
MODEL_CONFIG_FILE = "model_config.json"


class TrainCheckpointer:
  """The train state and the data iterator's position, every N steps, via orbax's CheckpointManager.

  A checkpoint is ``<directory>/<step>/{state,data}``; orbax writes it under a temporary name
  and renames it when complete, so one being written when the process died is never
  restored. Saves are asynchronous (the device-to-host copy blocks, the writing does not),
  restores go straight into the shardings asked for, whatever mesh saved the checkpoint.
  """

  def __init__(self, directory: str | os.PathLike, config: CheckpointConfig, model_config: MPTConfig):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    _check_model_config(self.directory, model_config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last,
        keep_period=config.keep_every or None,
        enable_async_checkpointing=config.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves ``state`` (any pytree of arrays) and the iterator position; refuses non-finite values."""
    if not _all_finite(state):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the train state holds NaN or inf")
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """The state at ``step`` laid out like ``abstract_state`` (ShapeDtypeStructs with shardings)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored.state, restored.data

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _check_model_config(directory: pathlib.Path, config: MPTConfig) -> None:
  """Records the model config beside the checkpoints; a different one refuses to start."""
  file = directory / MODEL_CONFIG_FILE
  current = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_FIELDS}
  if file.exists():
    saved = json.loads(file.read_text())
    differ = {k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
    if differ:
      lines = "\n".join(f"  {k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in sorted(differ))
      raise ValueError(f"{directory} holds checkpoints of a different model config:\n{lines}\n"
                       "use another workdir, or the config the checkpoints were written with")
    return
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    tmp.rename(file)
