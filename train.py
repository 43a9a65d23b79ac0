"""Train an MPT: ``python train.py [PRESET] [--section.field VALUE ...]``.

PRESET is a module of configs/ (default: tiny, a few minutes on a laptop CPU); any field of
TrainConfig can be overridden, e.g.

  python train.py tiny --workdir runs/tiny --optim.lr 1e-3 --steps 100
  python train.py mpt_1b_redpajama_200b --workdir /ckpt/mpt-1b --mesh.fsdp 8 --micro_batch_size 11

Multi-host: run the same command on every host with --mesh.multi_process (JAX detects Slurm,
Open MPI, Cloud TPU) or with --mesh.coordinator_address host:port --mesh.num_processes N
--mesh.process_id I.

Bad input (a config value, data, a checkpoint, a workdir in use) prints one line
``error: ...`` and exits 2 (mpt_jax.cli); Ctrl-C saves a checkpoint at the end of the step,
then exits 130.
"""

import importlib
import logging
import sys

import tyro

import configs
from mpt_jax import cli, trainer
from mpt_jax.config import TrainConfig

DEFAULT_PRESET = "tiny"


def parse_args(argv: list[str]) -> TrainConfig:
  """The preset named first in ``argv`` (default: tiny) with the flags that follow applied."""
  if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
    argv = [DEFAULT_PRESET, *argv]
  presets = {
    name: (importlib.import_module(f"configs.{name}").__doc__.strip().splitlines()[0], configs.get_config(name))
    for name in configs.PRESETS
  }
  with cli.config_errors_raise():  # a bad value raises ValueError
    return tyro.extras.overridable_config_cli(presets, args=argv, prog="train.py")


def run(argv: list[str]) -> int:
  """Parses ``argv`` and trains; returns the exit status."""
  return cli.run(lambda: trainer.main(parse_args(argv)))


if __name__ == "__main__":
  # force: importing orbax installs absl's handler on the root logger first.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  sys.exit(run(sys.argv[1:]))
