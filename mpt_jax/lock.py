"""One run per workdir: an exclusive lock on WORKDIR/lock, whose contents name the holder.

Two runs writing one workdir interleave their checkpoints and metrics. The run's first
process holds ``flock`` on the lock file and writes its host, pid and start time there; a
second run cannot take the lock and refuses, naming that holder. The lock belongs to the open
file, not to the file's existence, so it cannot go stale: the kernel releases it when the
holder exits or is killed (kill -9, OOM), and an NFS server when the holder's host stops
renewing its lease. The file itself stays behind, naming the last holder.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from mpt_jax import paths

LOCK_FILE = "lock"


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir; the message names it."""


class WorkdirLock:
  """Held from ``__enter__`` to ``__exit__``; ``__enter__`` raises WorkdirLocked when another run holds it."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = paths.workdir_path(workdir) / LOCK_FILE
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    if paths.is_remote(self.path):  # object stores (gs://) have no flock
      logging.warning("cannot lock %s (not a local path): make sure no other run uses this workdir", self.path)
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace")
      os.close(fd)
      raise WorkdirLocked(
        f"{self.path.parent} is in use by {_describe(holder)}; wait for it to end, or use another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
        os.close(fd)
        raise
      logging.warning("cannot lock %s on this filesystem (%s): make sure no other run uses this workdir", self.path, e)
    holder = dict(
      host=socket.gethostname(), pid=os.getpid(), started=datetime.datetime.now().isoformat(timespec="seconds")
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"the run of pid {h['pid']} on host {h['host']} (started {h['started']})"
  except (ValueError, KeyError, TypeError):
    return "another run (it is writing its name into the lock file)"
