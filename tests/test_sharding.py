"""Mesh construction, logical-axis rules and born-sharded state (8 virtual CPU devices, conftest)."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mpt_jax import sharding, trainer
from mpt_jax.config import MeshConfig, MPTConfig, TrainConfig

TINY = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32, dtype="float32", attn_impl="xla")


@pytest.mark.parametrize(
  "config, expected",
  [
    (MeshConfig(), (1, 8, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (MeshConfig(data=-1, fsdp=4, tensor=1), (2, 4, 1)),
    (MeshConfig(data=1, fsdp=4, tensor=2), (1, 4, 2)),
  ],
  ids=lambda x: str(x).split(", multi")[0] if isinstance(x, MeshConfig) else None,
)
def test_mesh_shape_resolves_the_free_axis(config, expected):
  assert sharding.mesh_shape(config, 8) == expected
  mesh = sharding.make_mesh(config)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == expected


@pytest.mark.parametrize(
  "config, message",
  [
    (MeshConfig(data=2, fsdp=2, tensor=1), r"needs 4 devices, but there are 8"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), r"not divisible by the fixed axes \(3\)"),
  ],
  ids=lambda x: str(x).split(", multi")[0] if isinstance(x, MeshConfig) else None,
)
def test_mesh_shape_names_the_mismatch(config, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(config, 8)


def test_logical_axes_map_to_mesh_axes_and_indivisible_axes_stay_whole():
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  assert sharding.mesh_spec(P("layers", "embed", None, "heads", "head_dim"), (2, 64, 3, 4, 16), mesh) == P(
    None, "fsdp", None, "tensor", None
  )
  assert sharding.mesh_spec(P("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
  assert sharding.mesh_spec(P("vocab", "embed"), (127, 6), mesh) == P(None, None)
  with pytest.raises(ValueError, match="'experts' has no rule"):
    sharding.mesh_spec(P("experts"), (8,), mesh)


def test_state_is_born_sharded_and_moments_follow_their_params():
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  config = TrainConfig(model=TINY, seq_len=32, global_batch_size=8, steps=3)
  with jax.set_mesh(mesh):
    state = trainer.make_setup(config, mesh).init()
  params = jax.tree.leaves(state.params)
  assert all(x.sharding.mesh == mesh for x in params)
  for weight in (
    state.params["wte"],
    state.params["blocks"]["mlp"]["up_proj"],
    state.params["blocks"]["attn"]["qkv_proj"],
  ):
    # Each device holds 1/8 of a weight sharded over fsdp (4) and tensor (2): nothing replicated.
    assert weight[...].addressable_shards[0].data.size == weight[...].size // 8
  for moment in (optax.tree_utils.tree_get(state.opt_state, "mu"), optax.tree_utils.tree_get(state.opt_state, "nu")):
    assert jax.tree.map(lambda m: m.sharding, moment) == jax.tree.map(lambda p: p.sharding, state.params)


def test_global_batch_puts_each_process_rows_in_place():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
  rows = np.asarray(jax.random.randint(jax.random.key(0), (16, 32), 0, 128), np.int32)
  batch = sharding.global_batch({"input_ids": rows}, mesh)["input_ids"]
  assert batch.sharding.spec == P(("data", "fsdp"), None)
  assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 32)}
  np.testing.assert_array_equal(np.asarray(batch), rows)


def test_initialize_distributed_is_a_no_op_for_one_process():
  sharding.initialize_distributed(MeshConfig())
  assert jax.process_count() == 1


def test_published_run_fits_eight_devices_with_every_large_weight_split_eight_ways():
  import configs

  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  setup = trainer.make_setup(configs.get_config("mpt_1b_redpajama_200b"), mesh)  # abstract: nothing allocated
  assert setup.grad_accum == 11  # 2200 = 25 rows x 11 microbatches x 8 devices
  params, shardings = setup.abstract_state.params, setup.state_shardings.params
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    if x.size >= 2**20:  # every weight matrix; LayerNorm scales (at most 24 x 2048) stay whole
      assert np.prod(s.shard_shape(x.shape)) == x.size // 8, (x.shape, s.spec)


def _two_slices_of_four(monkeypatch):
  """Pretends the 8 virtual CPU devices are 2 TPU slices of 4, interleaved so plain order would mix them."""
  monkeypatch.setattr(sharding, "slice_index", lambda device: device.id % 2)


@pytest.mark.parametrize(
  "config",
  [
    MeshConfig(data=2, fsdp=4, tensor=1, dcn_data=2),
    MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=2),
    MeshConfig(data=4, fsdp=-1, tensor=1, dcn_data=2),
    MeshConfig(data=-1, fsdp=2, tensor=1, dcn_data=2),
  ],
  ids=lambda x: str(x).split(", multi")[0],
)
def test_hybrid_mesh_keeps_fsdp_and_tensor_inside_one_slice(monkeypatch, config):
  _two_slices_of_four(monkeypatch)
  mesh = sharding.make_mesh(config)
  data, fsdp, tensor = sharding.mesh_shape(config, 8)
  assert tuple(mesh.shape.values()) == (data, fsdp, tensor)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  slices = np.vectorize(sharding.slice_index)(mesh.devices)
  for row in slices:  # one data index: the fsdp x tensor group that all-gathers every layer's weights
    assert len(set(row.flat)) == 1, slices
  # The data axis crosses slices: its first half lies in one slice, its second in the other.
  per_slice = data // 2
  assert set(slices[:per_slice].flat) != set(slices[per_slice:].flat)


def test_state_is_born_sharded_over_a_hybrid_mesh(monkeypatch):
  """The hybrid mesh is an ordinary mesh to the trainer; each fsdp shard group is one slice."""
  _two_slices_of_four(monkeypatch)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1, dcn_data=2))
  config = TrainConfig(model=TINY, seq_len=32, global_batch_size=8, steps=3)
  with jax.set_mesh(mesh):
    state = trainer.make_setup(config, mesh).init()
  wte = state.params["wte"][...]
  assert wte.sharding.mesh == mesh
  # The 4 shards of a weight over fsdp sit in one slice; the other slice holds a replica.
  for shard in wte.addressable_shards:
    assert shard.data.size == wte.size // 4
  by_index = {}
  for shard in wte.addressable_shards:
    by_index.setdefault(str(shard.index), set()).add(sharding.slice_index(shard.device))
  assert all(slices == {0, 1} for slices in by_index.values())


def test_hybrid_mesh_errors_are_clear(monkeypatch):
  _two_slices_of_four(monkeypatch)
  with pytest.raises(ValueError, match="devices are in 2 slice"):
    sharding.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1, dcn_data=4))
  with pytest.raises(ValueError, match="must divide the data axis, which has 1"):
    sharding.make_mesh(MeshConfig(data=-1, fsdp=8, tensor=1, dcn_data=2))
  monkeypatch.setattr(sharding, "slice_index", lambda device: int(device.id >= 3))
  with pytest.raises(ValueError, match=r"slices of unequal size .* \{0: 3, 1: 5\}"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1, dcn_data=2))
  with pytest.raises(ValueError, match="dcn_data=2 slices must divide data=3"):
    MeshConfig(data=3, fsdp=1, tensor=1, dcn_data=2)
  with pytest.raises(ValueError, match="dcn_data must be a positive integer"):
    MeshConfig(dcn_data=0)
