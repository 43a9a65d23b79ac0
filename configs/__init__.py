"""Named presets: each module has ``get_config() -> TrainConfig`` and sets only what differs."""

import importlib

from mpt_jax.config import TrainConfig

PRESETS = ("tiny", "mpt_1b_redpajama_200b")


def get_config(name: str) -> TrainConfig:
  """The preset called ``name`` (a module in this package)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
  return importlib.import_module(f"configs.{name}").get_config()
