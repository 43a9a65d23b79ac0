"""Telling an intact checkpoint from a damaged one, and saying in one line what is wrong.

Orbax renames a checkpoint into place only once every file is written, so a save cut short is
never restored. Nothing in it notices a file damaged afterwards: a truncated copy fails deep in
tensorstore (a 150-line error), a deleted metadata file as a pytree mismatch, and flipped bytes
restore silently as wrong numbers. ``write`` records the size and sha256 of every file in a
checkpoint's item folders (state/, data/, ...) when it is saved; ``verify`` names the first
file that differs. The files directly in the checkpoint folder are orbax's commit bookkeeping,
rewritten as it commits: not covered. ``describe_failure`` shortens orbax's own errors for a
checkpoint without checksums (a model folder, or one an older mpt-jax wrote).
"""

import concurrent.futures
import hashlib
import json
import os
import pathlib
import sys

from mpt_jax import paths
from mpt_jax.atomic import write_atomically

MANIFEST = "checksums.json"
_CHUNK = 16 << 20


def write(directory: str | os.PathLike) -> None:
  """Records every file under ``directory``'s subfolders in ``directory``/checksums.json (temp + rename)."""
  directory = paths.workdir_path(directory)
  files = _files(directory)
  manifest = dict(zip(files, _digests(directory, files)))
  write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def exists(directory: str | os.PathLike) -> bool:
  return (paths.workdir_path(directory) / MANIFEST).is_file()


def verify(directory: str | os.PathLike) -> str | None:
  """None if every recorded file is there with its size and sha256; else what is wrong, naming the file."""
  directory = paths.workdir_path(directory)
  try:
    manifest = json.loads((directory / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    return f"{MANIFEST} unreadable ({e})"
  for name, (size, _) in sorted(manifest.items()):
    path = directory / name
    if not path.is_file():
      return f"{name} is missing"
    actual = paths.file_size(path)
    if actual != size:
      return f"{name} has {actual} bytes, {size} were written"
  names = sorted(manifest)
  for name, found in zip(names, _digests(directory, names)):
    if found != manifest[name]:
      return f"{name} has other contents than were written (sha256 differs)"
  return None


def _files(directory: pathlib.Path) -> list[str]:
  """The files in the subfolders (orbax's items) of ``directory``, relative to it; a gs:// URL too."""
  return sorted(
    p.relative_to(directory).as_posix() for sub in directory.iterdir() if sub.is_dir() for p in paths.files_under(sub)
  )


def _digests(directory: pathlib.Path, names: list[str]) -> list[list]:
  """[size, sha256] of each file, several files at once (hashlib and reads release the GIL)."""

  def digest(name):
    sha, size = hashlib.sha256(), 0
    with (directory / name).open("rb") as f:
      while chunk := f.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return [size, sha.hexdigest()]

  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(digest, names))


def describe_failure(error: Exception) -> str:
  """The type and first line of an error orbax raised reading damaged files (tensorstore's run to dozens of lines)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def quiet_abandoned_reads() -> None:
  """Drops the "Event loop is closed" errors of reads a failed orbax restore left in flight.

  When one read fails, orbax closes its asyncio loop; tensorstore's other reads complete later
  and each reports to the closed loop through sys.unraisablehook: a traceback apiece, printed
  after the real error (or amid training after a fallback), about nothing. Call it before a
  restore that may fail: a read can complete before the failure reaches the caller.
  """
  previous = sys.unraisablehook
  if getattr(previous, "quiets_abandoned_reads", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook
