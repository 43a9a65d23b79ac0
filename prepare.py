"""Prepare a preset's training data: ``python prepare.py [PRESET] [--data.FIELD VALUE ...] [--workers N] [--runner R]``.

PRESET is a module of configs/, as for train.py; it supplies ``data`` and ``seq_len``, so the
shards are the ones that run will look for. The flags that follow override it like train.py's
and are those of ``python -m mpt_jax.data.prepare`` (which takes flags only), e.g.

  python prepare.py mpt_1b_redpajama_200b --data.data-dir /data/RedPajama-Data-1T \\
      --data.tokenizer-path /data/gpt-neox-20b/tokenizer.json --data.prepared-dir /data/prepared --workers 64

The presets live beside this file, outside the installed library; mpt_jax.data.prepare does the work.
"""

import dataclasses
import sys

import configs
from mpt_jax.data import prepare


def parse_args(argv: list[str]) -> tuple[prepare.PrepareArgs, list[str]]:
  """PrepareArgs from an optional leading preset name and the flags that follow, and Beam's options."""
  default = prepare.PrepareArgs()
  if argv and not argv[0].startswith("-"):
    preset = configs.get_config(argv.pop(0))
    default = dataclasses.replace(default, data=preset.data, seq_len=preset.seq_len)
  return prepare.parse_args(argv, default=default)


def main(argv: list[str]) -> int:
  """Prepares what ``argv`` asks for and prints its directory; returns the exit status (mpt_jax.cli)."""
  return prepare.main(argv, parse=parse_args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
