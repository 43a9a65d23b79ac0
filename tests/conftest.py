"""Test-wide setup: 8 virtual CPU devices for the sharding tests (must precede importing jax)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

TOKENIZER_JSON = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer_json() -> pathlib.Path:
  """The real GPT-NeoX-20B tokenizer from ../shared (never copied into the project)."""
  path = pathlib.Path(os.environ.get("MPT_JAX_TOKENIZER", TOKENIZER_JSON))
  if not path.exists():
    pytest.skip(f"GPT-NeoX-20B tokenizer.json not found at {path} (set MPT_JAX_TOKENIZER)")
  return path
