"""Model folders: an MPTConfig and its parameters on disk, what converters, fine-tuning and generation read.

The folder holds

  config.json   mpt_jax.hf_config.to_hf_dict (mosaic_gpt schema, or mpt for the mpt ALiBi
                slope rule) plus "mpt_jax": the run-time fields (config.RUNTIME_FIELDS) the
                parameters were stored with
  params/       orbax PyTree of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``

convert/torch_to_flax.py writes one; mpt_jax.checkpoint.load_model reads one (or a training
workdir). Restoring goes straight into an abstract model (model.abstract_model), as in flax's
examples/nnx_toy_examples/08_save_load_checkpoints.py, so nothing is allocated twice.
Training checkpoints are mpt_jax.checkpoint's.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mpt_jax import integrity, paths
from mpt_jax.atomic import atomic_directory
from mpt_jax.config import RUNTIME_FIELDS, MPTConfig
from mpt_jax.hf_config import from_hf_dict, to_hf_dict
from mpt_jax.model import MPTForCausalLM, abstract_model, stack_layers, unstack_layers
from mpt_jax.sharding import with_shardings

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
  """A model folder or training checkpoint that cannot be used; the message names it and the problem."""


def write_config(config: MPTConfig, folder: pathlib.Path) -> None:
  """config.json in the schema that keeps the ALiBi slope rule, plus the run-time fields."""
  d = to_hf_dict(config, config.alibi_slope_rule)
  d["mpt_jax"] = {name: getattr(config, name) for name in RUNTIME_FIELDS}
  (folder / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")


def read_config(folder: str | os.PathLike) -> MPTConfig:
  """The MPTConfig a save_model folder was written with."""
  file = paths.workdir_path(folder) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: is {folder} a folder written by save_model?")
  d = json.loads(file.read_text())
  return from_hf_dict(d, **d.get("mpt_jax", {}))


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
  """The parameter tree of ``config`` as a pure dict of ShapeDtypeStructs; nothing allocated."""
  return nnx.to_pure_dict(abstract_model(config)[1])


def read_params(path: str | os.PathLike) -> tuple[MPTConfig, dict[str, Any]]:
  """The folder's config and host numpy parameters as stored (no device copies)."""
  config = read_config(path)
  target = abstract_params(config)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with reading(path), ocp.PyTreeCheckpointer() as checkpointer:
    params = checkpointer.restore(paths.workdir_path(path) / PARAMS_DIR, item=target, restore_args=restore_args)
  return config, params


def read_model(path: str | os.PathLike, config: MPTConfig) -> MPTForCausalLM:
  """The folder's parameters on the default device, in a model of ``config`` (its run-time fields may differ)."""
  saved = read_config(path)
  stored = dataclasses.replace(config, scan_layers=saved.scan_layers)  # the saved layout; orbax casts the dtype
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params(stored))
  with reading(path), ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(paths.workdir_path(path) / PARAMS_DIR, target)
  if stored.scan_layers != config.scan_layers:
    params["blocks"] = relayout_blocks(params["blocks"], config)
  return model_from_params(config, params)


def restore_params(path: str | os.PathLike, config: MPTConfig, shardings: dict[str, Any]) -> dict[str, Any]:
  """The parameters of the model folder ``path``, placed straight into ``shardings`` (a pure dict).

  Starts fine-tuning from converted weights: the folder's architecture must be ``config``'s.
  """
  saved = read_config(path)
  differ = [
    k for k in dataclasses.asdict(config) if k not in RUNTIME_FIELDS and getattr(saved, k) != getattr(config, k)
  ]
  if differ:
    raise ValueError(
      f"{path} holds a different model: "
      + ", ".join(f"{k}={getattr(saved, k)!r} (run: {getattr(config, k)!r})" for k in differ)
    )
  if saved.scan_layers != config.scan_layers:  # change the layer layout on the host, then place
    _, params = read_params(path)
    params["blocks"] = relayout_blocks(params["blocks"], config)
    return jax.device_put(jax.tree.map(lambda x: x.astype(config.param_dtype), params), shardings)
  stored = abstract_params(dataclasses.replace(config, scan_layers=saved.scan_layers))
  with reading(path), ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(paths.workdir_path(path) / PARAMS_DIR, with_shardings(stored, shardings))


def model_from_params(config: MPTConfig, params: dict[str, Any]) -> MPTForCausalLM:
  """An MPTForCausalLM holding ``params`` (a pure dict laid out per config.scan_layers)."""
  graphdef, state = abstract_model(config)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def relayout_blocks(blocks: dict[str, Any], config: MPTConfig) -> dict[str, Any]:
  """Block parameters from the other layer layout into ``config.scan_layers``'s (host numpy)."""
  if config.scan_layers:
    return stack_layers(list(blocks.values()))
  return dict(enumerate(unstack_layers(blocks, config.n_layers)))


@contextlib.contextmanager
def reading(path):
  """Turns orbax / tensorstore failures on damaged files into one CheckpointError naming ``path``."""
  integrity.quiet_abandoned_reads()
  try:
    yield
  except Exception as e:
    raise CheckpointError(
      f"{path}: parameters cannot be read, truncated or damaged? ({integrity.describe_failure(e)})"
    ) from e
