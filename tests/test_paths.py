"""Workdir paths: URLs keep their scheme (pathlib would make gs://b/run the local gs:/b/run), and a
training run, its checkpoints, metrics and model folders work on an object store (gs://)."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from etils import epath
from flax import nnx

from mpt_jax import MPTForCausalLM, checkpoint, lock, metrics, model_folder, paths, trainer
from mpt_jax.config import CheckpointConfig, MeshConfig, MPTConfig, OptimConfig, TrainConfig


def test_urls_keep_their_scheme():
  path = paths.workdir_path("gs://bucket/run") / "checkpoints"
  assert isinstance(path, epath.Path) and str(path) == "gs://bucket/run/checkpoints"
  assert paths.is_remote(path) and not paths.is_remote("/tmp/run")


def test_local_paths_are_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.workdir_path("run") == pathlib.Path(tmp_path, "run")


def test_remote_workdir_is_not_locked():
  """Object stores have no flock: the lock warns and holds nothing, creating no local gs:/ folder."""
  with lock.WorkdirLock("gs://bucket/run") as held:
    assert held._fd is None
  assert not pathlib.Path("gs:").exists()


def _as_object_store(monkeypatch, root: pathlib.Path) -> None:
  """Sends every path under ``root`` down the object-store branch (gs://): epath only, no append,
  no folder rename. etils.epath has no scheme that works offline (memory:// is unregistered),
  and orbax writes arrays through tensorstore, which would not know one, so the remote code
  runs on a local folder. Appending to a file under it fails, as on GCS."""
  real = paths.is_remote
  monkeypatch.setattr(paths, "is_remote", lambda path: real(path) or os.fspath(path).startswith(str(root)))

  def no_append(file, mode="r", *args, **kwargs):
    if "a" in mode and os.fspath(file).startswith(str(root)):
      raise OSError(f"object stores cannot append: {file}")
    return open(file, mode, *args, **kwargs)

  monkeypatch.setattr(metrics, "open", no_append, raising=False)


def _config(workdir, steps: int) -> TrainConfig:
  """A toy run checkpointing every 2 steps; ``steps`` may grow on resuming (a run extended)."""
  model = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=16, dtype="float32", attn_impl="xla")
  return TrainConfig(
    model=model,
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    checkpoint=CheckpointConfig(every_steps=2, async_save=False, allow_config_changes=True),
    workdir=workdir,
    seq_len=16,
    global_batch_size=8,
    steps=steps,
    log_every=1,
    sample_tokens=0,
  )


def _rows(config, start: int = 0):
  """Seeded random batches, from batch ``start`` (the resumed run reads on where the first stopped)."""
  rng = np.random.default_rng(0)
  for step in range(10**6):
    batch = rng.integers(0, config.model.vocab_size, (config.global_batch_size, config.seq_len), dtype=np.int32)
    if step >= start:
      yield {"input_ids": batch}


def test_a_run_on_an_object_store_workdir_checkpoints_logs_and_resumes(tmp_path, monkeypatch):
  bucket = tmp_path / "bucket"
  _as_object_store(monkeypatch, bucket)
  workdir = str(bucket / "run")
  trainer.main(_config(workdir, steps=4), _rows(_config(workdir, 4)))
  run = bucket / "run"
  first = (run / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in first] == [1, 2, 3, 4]
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert (run / "loss.png").stat().st_size > 0 and list((run / "tensorboard").iterdir())

  # The newest checkpoint damaged: the next run passes it over, moves it aside (a folder: copied
  # file by file, no rename), resumes from step 2 and rewrites the history after it.
  (run / "checkpoints" / "4" / "state" / "_METADATA").unlink()
  state = trainer.main(_config(workdir, steps=6), _rows(_config(workdir, 6), start=2))
  assert int(state.step) == 6
  assert [p.name.split("-")[0] for p in (run / "checkpoints.broken").iterdir()] == ["4"]
  second = (run / "metrics.jsonl").read_text().splitlines()
  assert second[:2] == first[:2]  # steps 1-2 kept, the rest logged again by the resumed run
  assert [json.loads(line)["step"] for line in second] == [1, 2, 3, 4, 5, 6]
  # Step 3 again: the restored step-2 parameters on the same batch (later steps differ: with 6
  # steps the cosine schedule, so the learning rate, is another).
  assert json.loads(second[2])["loss"] == pytest.approx(json.loads(first[2])["loss"], rel=1e-5)
  assert not (run / "previous").exists()  # resumed, not started over
  # What generation and evaluation read: the workdir URL's newest checkpoint.
  saved, params = checkpoint.load_params(workdir)
  assert saved.d_model == 32 and params["wte"].shape == (96, 32)


def test_a_model_folder_on_an_object_store_is_written_whole_and_read_back(tmp_path, monkeypatch):
  bucket = tmp_path / "bucket"
  _as_object_store(monkeypatch, bucket)
  config = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=16, dtype="float32")
  model = MPTForCausalLM(config, rngs=nnx.Rngs(0))
  folder = str(bucket / "model")
  model_folder.save_model(model, folder)
  assert not [p for p in bucket.iterdir() if p.name.startswith(".")]  # no temporary sibling left on the store
  loaded = checkpoint.load_model(folder)
  np.testing.assert_array_equal(loaded.wte[...], model.wte[...])
  with pytest.raises(FileExistsError, match="already exists"):
    model_folder.save_model(model, folder)


def test_move_copies_a_folder_file_by_file_on_an_object_store(tmp_path, monkeypatch):
  _as_object_store(monkeypatch, tmp_path / "bucket")
  source = tmp_path / "bucket" / "a"
  (source / "sub").mkdir(parents=True)
  (source / "x").write_text("x")
  (source / "sub" / "y").write_text("y")
  monkeypatch.setattr(shutil, "move", None)  # the local branch would need it
  paths.move(source, tmp_path / "bucket" / "b" / "a")
  assert not source.exists()
  assert (tmp_path / "bucket" / "b" / "a" / "sub" / "y").read_text() == "y"
  assert (tmp_path / "bucket" / "b" / "a" / "x").read_text() == "x"
