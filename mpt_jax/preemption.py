"""SIGTERM, as GPU and TPU schedulers send before preempting, turned into a step-boundary stop.

The handler only sets a flag; the training loop asks ``requested()`` after each step, saves a
checkpoint and exits cleanly. With several processes they agree (any process signalled
means all stop at the same step), since a checkpoint needs every process.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Catches SIGTERM while active; ``requested()`` says whether any process received one."""

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None

  def __enter__(self) -> "PreemptionWatcher":
    self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)

  def requested(self) -> bool:
    flag = self._signalled.is_set()
    if jax.process_count() == 1:
      return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
