"""Workdir paths that may be local folders or object-store URLs (gs://bucket/run on Cloud TPU).

``pathlib.Path("gs://b/run")`` silently becomes the local relative path ``gs:/b/run``, so
anything of ours that joins or checks paths under a workdir goes through ``workdir_path``:
a URL becomes an ``etils.epath.Path`` (orbax's own path type; gs:// needs ``gcsfs`` or
TensorFlow's gfile installed, see README "TPU"), a local path an absolute ``pathlib.Path``.
Both support ``/``, ``exists``, ``is_file``, ``mkdir``, ``iterdir``, ``rglob``, ``open``, ``rename``.
"""

import os
import pathlib

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL with a scheme (gs://, s3://, memory://...), False for a local path."""
  return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
  """An absolute local path, or an epath.Path for a URL (its scheme kept)."""
  if isinstance(path, epath.Path) or is_remote(path):
    return epath.Path(path)
  return pathlib.Path(path).absolute()
