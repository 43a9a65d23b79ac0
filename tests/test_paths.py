"""Workdir paths: URLs keep their scheme (pathlib would make gs://b/run the local gs:/b/run)."""

import pathlib

from etils import epath

from mpt_jax import lock, paths


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
