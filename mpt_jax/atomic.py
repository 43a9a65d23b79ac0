"""Write to a temporary sibling, then rename: readers never see half a file or half a folder.

Every output of the project that a later run reads (model folders, prepared shards and their
manifests, tokenizers, metrics, plots, evaluation reports, checksums) goes through one of
these. A rename within one folder is atomic on POSIX file systems, so a crash leaves either
the old content or the new, and the temporary sibling (a dot-name with the process id) is
removed on error.
"""

import contextlib
import os
import pathlib
import shutil
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside ``path`` to write; on success it replaces ``path``.

  On error the temporary file is removed and ``path`` is left as it was.
  """
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
  temporary folder.
  """
  path = pathlib.Path(path)
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
  if pathlib.Path(path).exists():
    raise FileExistsError(f"{path} already exists; remove it or choose another output path")
