"""What train.py, ``python -m mpt_jax.data.prepare`` and convert/ share: how bad input ends a command.

Bad input (a config value, a data or checkpoint file, a workdir in use, a full disk) prints one
line ``error: ...`` naming it and exits with status 2, never with a traceback; Ctrl-C exits
130. Tyro's parse errors (an unknown flag, a value of the wrong type) keep tyro's own message
and status 2.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator

import tyro

from mpt_jax.lock import WorkdirLocked

USAGE_STATUS = 2
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by Ctrl-C
USER_ERRORS = (ValueError, OSError, WorkdirLocked)


@contextlib.contextmanager
def config_errors_raise() -> Iterator[None]:
  """Within: a ValueError from a config's own validation propagates, instead of tyro's multi-line box.

  tyro._errors is tyro's experimental hook API (requirements.txt pins tyro).
  """

  def hook(event) -> None:
    if isinstance(event, tyro._errors.InstantiationFailure):
      raise ValueError(event.message)

  with tyro._errors.on_parse_error(hook):
    yield


def run(command: Callable[[], object]) -> int:
  """Runs ``command``; returns the process's exit status (0, 2 for bad input, 130 for Ctrl-C)."""
  try:
    command()
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE_STATUS
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return INTERRUPTED_STATUS
  return 0
