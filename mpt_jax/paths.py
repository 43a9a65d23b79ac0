"""Workdir paths that may be local folders or object-store URLs (gs://bucket/run on Cloud TPU).

``pathlib.Path("gs://b/run")`` silently becomes the local relative path ``gs:/b/run``, so
anything of ours that joins or checks paths under a workdir or model folder goes through
``workdir_path``: a URL becomes an ``etils.epath.Path`` (orbax's own path type; gs:// needs
``gcsfs`` or TensorFlow's gfile installed, see README "TPU"), a local path an absolute
``pathlib.Path``. Both support ``/``, ``exists``, ``is_file``, ``mkdir``, ``iterdir``,
``open``, ``read_text``; not ``rglob`` (epath refuses ``**`` on URLs): use ``files_under``.

Object stores have neither append nor an atomic rename of folders, so what needs those on a
local disk branches on ``is_remote`` (always called through this module, so that a test can
send a local folder down the remote branch) and uses ``move`` / ``upload_tree`` there.
"""

import os
import pathlib
import shutil

from etils import epath

_COPY_CHUNK = 16 << 20  # bytes per read when copying a file: a model's shard never sits whole in memory


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL with a scheme (gs://, s3://, memory://...), False for a local path."""
  return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
  """An absolute local path, or an epath.Path for a URL (its scheme kept) or a path ``is_remote`` calls remote."""
  if isinstance(path, epath.Path) or is_remote(path):
    return epath.Path(path)
  return pathlib.Path(path).absolute()


def files_under(directory: str | os.PathLike) -> list:
  """Every file below ``directory``, at any depth, sorted; a walk of ``iterdir`` since epath has no rglob."""
  directory = workdir_path(directory)
  found = []
  for entry in directory.iterdir():
    found.extend(files_under(entry) if entry.is_dir() else [entry])
  return sorted(found, key=str)


def file_size(path: pathlib.Path | epath.Path) -> int:
  """Bytes in a file: epath's stat() has ``length`` where pathlib's has ``st_size``."""
  info = path.stat()
  return info.length if isinstance(path, epath.Path) else info.st_size


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies one file between any two paths (local or URL), creating ``dst``'s folder; streamed."""
  src, dst = workdir_path(src), workdir_path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open("rb") as reader, dst.open("wb") as writer:
    shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def upload_tree(local: pathlib.Path, dst: str | os.PathLike) -> None:
  """Copies the local folder ``local`` to ``dst`` file by file, the deepest files first.

  An object store shows each file whole once written but no folder at once, so a reader may
  see part of the folder. Deepest first puts a folder's top-level files (a model folder's
  config.json, a manifest) last: a folder with them is complete.
  """
  for file in sorted(files_under(local), key=lambda p: (-len(p.relative_to(local).parts), p.as_posix())):
    copy_file(file, workdir_path(dst) / file.relative_to(local).as_posix())


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or folder to ``dst`` (whose parent exists or is created).

  Locally a rename (shutil.move). On an object store, where a folder is only a name prefix and
  cannot be renamed, each file is copied, then the source deleted: a crash in between leaves
  both copies, never neither.
  """
  if not is_remote(src) and not is_remote(dst):
    pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
    return
  src, dst = workdir_path(src), workdir_path(dst)
  if src.is_dir():
    for file in files_under(src):
      copy_file(file, dst / file.relative_to(src).as_posix())
    src.rmtree()
  else:
    copy_file(src, dst)
    src.unlink()
