"""SIGTERM and Ctrl-C turned into a step-boundary stop, so an interrupted run keeps its progress.

SIGTERM is what GPU and TPU schedulers send before preempting; SIGINT is Ctrl-C. The training
loop asks ``requested()`` after each step, saves a checkpoint and exits cleanly. A second
Ctrl-C aborts at once, without that checkpoint (one being written is never restored: orbax
commits a checkpoint by a rename). With several processes they agree (any process signalled
means all stop at the same step), since a checkpoint needs every process.

Python runs signal handlers only between bytecodes of the main thread, which can sit for
minutes in one compile or restore; so the signals are read from ``signal.set_wakeup_fd``'s
pipe by a thread instead, which sees each one as it arrives.
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from mpt_jax.cli import INTERRUPTED_STATUS


class PreemptionWatcher:
  """Catches SIGTERM and SIGINT while active; ``requested()`` says whether any process received one."""

  def __init__(self):
    self._signalled = threading.Event()
    self.interrupted = False  # this process got Ctrl-C (SIGINT), not only SIGTERM

  def __enter__(self) -> "PreemptionWatcher":
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)  # set_wakeup_fd requires it
    self._previous_fd = signal.set_wakeup_fd(self._write_fd)
    # The handlers do nothing: the wakeup fd carries the signal numbers to _listen.
    self._previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    self._listener = threading.Thread(target=self._listen, name="preemption", daemon=True)
    self._listener.start()
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._write_fd)  # _listen reads end-of-file and returns
    self._listener.join()
    os.close(self._read_fd)

  def _listen(self) -> None:
    while signals := os.read(self._read_fd, 64):
      for signum in signals:  # set_wakeup_fd writes each signal's number as one byte
        if signum == signal.SIGINT and self.interrupted:
          os.write(2, b"\nCtrl-C again: aborted without a checkpoint\n")
          os._exit(INTERRUPTED_STATUS)
        if signum == signal.SIGINT:
          self.interrupted = True
          os.write(
            2, b"\nCtrl-C: saving a checkpoint at the end of this step; press Ctrl-C again to abort without it\n"
          )
        self._signalled.set()

  def requested(self) -> bool:
    flag = self._signalled.is_set()
    if jax.process_count() == 1:
      return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
