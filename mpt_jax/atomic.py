"""Write to a temporary sibling, then rename: readers never see half a file or half a folder.

Every output of the project that a later run reads (model folders, prepared shards and their
manifests, tokenizers, metrics, plots, evaluation reports, checksums) goes through one of
these. A rename within one folder is atomic on POSIX file systems, so a crash leaves either
the old content or the new, and the temporary sibling (a dot-name with the process id) is
removed on error.

On an object store (a gs:// URL, mpt_jax.paths) there is no rename to make a write atomic,
but each object appears only once its upload is complete: the temporary file or folder is
local, and is uploaded when finished (a folder file by file, see paths.upload_tree).
"""

import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Iterator

from mpt_jax import paths


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside ``path`` to write; on success it replaces ``path``.

  On error the temporary file is removed and ``path`` is left as it was.
  """
  if paths.is_remote(path):
    with tempfile.TemporaryDirectory() as local:
      tmp = pathlib.Path(local) / paths.workdir_path(path).name
      yield tmp
      paths.copy_file(tmp, path)
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across processes and hosts (data units)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes ``data`` (bytes, or text as UTF-8) to ``path`` through a temporary file and a rename."""
  with atomic_file(path) as tmp:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder of ``path`` to fill; renames it to ``path`` only on success.

  Args:
    path: the folder to create.
    replace: False: ``path`` must not exist (nothing a user has is overwritten). True: an
      existing ``path`` is moved aside and deleted once the new folder is in place; if another
      process put a complete folder there first (``path`` exists again when renaming), theirs
      is kept.

  A crash or error leaves nothing at ``path`` that was not there before, and removes the
  temporary folder. On an object store, only a crash during the final upload leaves part of
  the folder (its top-level files last: paths.upload_tree), and ``replace`` deletes the old
  folder before uploading the new one.
  """
  if paths.is_remote(path):
    yield from _remote_directory(paths.workdir_path(path), replace)
    return
  path = pathlib.Path(path).absolute()  # orbax, writing into the folder, takes absolute paths only
  if not replace:
    refuse_existing(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if replace:
      _replace_directory(tmp, path)
    else:
      tmp.rename(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _remote_directory(path, replace: bool) -> Iterator[pathlib.Path]:
  """atomic_directory for a URL: fill a local temporary folder, then upload it."""
  if not replace:
    refuse_existing(path)
  with tempfile.TemporaryDirectory() as local:
    tmp = pathlib.Path(local) / path.name
    tmp.mkdir()
    yield tmp
    if replace and path.exists():
      path.rmtree()
    paths.upload_tree(tmp, path)


def _replace_directory(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Renames ``tmp`` to ``path``, moving an existing ``path`` out of the way first."""
  stale = path.with_name(f".{path.name}.{os.getpid()}.stale")
  if path.exists():
    os.rename(path, stale)
  try:
    os.rename(tmp, path)
  except OSError:
    if not path.exists():
      raise
    # another process finished the same folder first: keep theirs
  finally:
    shutil.rmtree(stale, ignore_errors=True)


def refuse_existing(path: str | os.PathLike) -> None:
  """An output folder must be new: nothing a user has is overwritten."""
  if paths.workdir_path(path).exists():
    raise FileExistsError(f"{path} already exists; remove it or choose another output path")
