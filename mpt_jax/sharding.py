"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names (mpt_jax.model); ``LOGICAL_RULES`` is the only place they
meet mesh axes. FSDP (ZeRO-3) shards every weight along ``embed`` over ``fsdp``; ``tensor``
splits heads, the MLP hidden and the vocabulary; the batch is split over (data, fsdp). A
dimension that a mesh axis does not divide stays whole (a tiny test model on a big mesh).
"""

import logging

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mpt_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every data-parallel axis

# logical parameter axis -> mesh axis (None: not split).
LOGICAL_RULES = {
  "vocab": "tensor",
  "embed": "fsdp",
  "heads": "tensor",
  "mlp": "tensor",
  "head_dim": None,
  "layers": None,
  "norm": None,
}


def initialize_distributed(config: MeshConfig) -> None:
  """Joins a multi-process run (GPU cluster, TPU pod) before any other JAX call.

  With ``coordinator_address`` set, the three fields say everything; with only
  ``multi_process`` set, JAX detects the cluster (Slurm, Open MPI, Cloud TPU, ...) or reads
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Otherwise a no-op.
  """
  if config.coordinator_address is None and not config.multi_process:
    return
  jax.distributed.initialize(
    coordinator_address=config.coordinator_address,
    num_processes=config.num_processes,
    process_id=config.process_id,
  )
  logging.info("process %d of %d joined %s", jax.process_index(), jax.process_count(), config.coordinator_address)


def mesh_shape(config: MeshConfig, device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 axis resolved; raises unless the product is the device count."""
  sizes = [config.data, config.fsdp, config.tensor]  # MeshConfig checked: positive, at most one -1
  if -1 in sizes:
    known = -int(np.prod(sizes))
    if device_count % known:
      raise ValueError(f"MeshConfig {config}: {device_count} devices are not divisible by the fixed axes ({known})")
    sizes[sizes.index(-1)] = device_count // known
  if int(np.prod(sizes)) != device_count:
    raise ValueError(
      f"MeshConfig (data, fsdp, tensor) = {tuple(sizes)} needs {int(np.prod(sizes))} devices, but there are {device_count}"
    )
  return tuple(sizes)


def slice_index(device) -> int:
  """The TPU slice a device sits in (multislice); 0 on one slice, CPU and GPU.

  A module-level function so that a CPU test can pretend its virtual devices are several slices.
  """
  return getattr(device, "slice_index", 0)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

  With ``config.dcn_data`` > 1 the data axis spans that many slices (hybrid ICI x DCN mesh):
  see ``hybrid_device_array``.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  if config.dcn_data == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return jax.sharding.Mesh(hybrid_device_array(shape, config.dcn_data, devices), MESH_AXES, axis_types=axis_types)


def hybrid_device_array(shape: tuple[int, int, int], dcn_data: int, devices) -> np.ndarray:
  """Devices as a (data, fsdp, tensor) array whose data axis crosses ``dcn_data`` slices.

  Every fsdp x tensor group (and data / dcn_data rows of data) lies inside one slice, so the
  per-layer all-gathers and reduce-scatters of FSDP and tensor parallelism stay on ICI; only
  the gradient all-reduce over data crosses DCN. Slice i is rows [i * data / dcn_data, ...) of
  the data axis. jax's own create_hybrid_device_mesh does the same but needs TPU devices; this
  one takes ``slice_index`` so that it can be tested on CPU.
  """
  data, fsdp, tensor = shape
  if data % dcn_data:
    raise ValueError(f"MeshConfig.dcn_data={dcn_data} slices must divide the data axis, which has {data} devices")
  by_slice: dict[int, list] = {}
  for device in devices:
    by_slice.setdefault(slice_index(device), []).append(device)
  if len(by_slice) != dcn_data:
    raise ValueError(
      f"MeshConfig.dcn_data={dcn_data}, but the {len(devices)} devices are in {len(by_slice)} slice(s) "
      f"{sorted(by_slice)}: set --mesh.dcn-data to the number of slices"
    )
  sizes = {index: len(slice_devices) for index, slice_devices in sorted(by_slice.items())}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"slices of unequal size (slice index: devices) {sizes}: a hybrid mesh needs equal slices")
  # mesh_shape checked data * fsdp * tensor == len(devices), so this ICI shape fills one slice exactly.
  ici_shape = (data // dcn_data, fsdp, tensor)
  return np.concatenate([_slice_device_array(by_slice[index], ici_shape) for index in sorted(by_slice)], axis=0)


def _slice_device_array(devices: list, ici_shape: tuple[int, int, int]) -> np.ndarray:
  """One slice's devices in the ICI shape: TPU topology-aware (neighbours on fast links), else in order."""
  if devices[0].platform == "tpu":
    from jax.experimental import mesh_utils

    return mesh_utils.create_device_mesh(ici_shape, devices=devices)
  return np.array(devices, dtype=object).reshape(ici_shape)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over (data, fsdp), everything else whole: [B, T] token arrays."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (ndim - 1)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """Logical axis names -> mesh axes through LOGICAL_RULES; axes that do not divide stay whole."""
  axes = []
  for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"logical axis {name!r} has no rule in mpt_jax.sharding.LOGICAL_RULES ({sorted(LOGICAL_RULES)})")
    axis = LOGICAL_RULES.get(name)
    axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
  return PartitionSpec(*axes)


def tree_shardings(abstract_tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a tree whose arrays sit in nnx Variables (params, Adam moments) or bare.

  Variables are sharded from their logical names; bare leaves (step counters, rng keys) are
  replicated. The result mirrors the tree, so it can be jit's out_shardings directly.
  """
  logical = nnx.get_partition_spec(abstract_tree)

  def to_sharding(spec, leaf):
    return NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh))

  return jax.tree.map(to_sharding, logical, abstract_tree)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that also say where each array goes: a restore target (orbax, device_put)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def global_batch(local_rows: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp); each process feeds its part."""
  out = {}
  for name, rows in local_rows.items():
    global_shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, rows.ndim), rows, global_shape)
  return out
