"""Test-wide setup: 8 virtual CPU devices for the sharding tests (must precede importing jax)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

TOKENIZER_JSON = (
  pathlib.Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
)


@pytest.fixture(scope="session")
def tokenizer_json() -> pathlib.Path:
  """The real GPT-NeoX-20B tokenizer from ../shared (never copied into the project)."""
  path = pathlib.Path(os.environ.get("MPT_JAX_TOKENIZER", TOKENIZER_JSON))
  if not path.exists():
    pytest.skip(f"GPT-NeoX-20B tokenizer.json not found at {path} (set MPT_JAX_TOKENIZER)")
  return path


@pytest.fixture(scope="session")
def convert_random_mpt(tmp_path_factory):
  """Makes (once per vocabulary size) a tiny random transformers MptForCausalLM and our conversion of it.

  mpt layout, QK-LN off (transformers has none); weights drawn large enough (0.3 std) that
  log-likelihoods of different texts are far apart. Returns (the transformers model, the model
  folder that convert/torch_to_flax.py's logic wrote from its save_pretrained folder).
  """
  made = {}

  def convert(vocab_size: int):
    if vocab_size not in made:
      import torch
      import transformers

      from mpt_jax import convert, model_folder

      torch.manual_seed(vocab_size)
      hf_config = transformers.MptConfig(
        d_model=32,
        n_heads=4,
        n_layers=2,
        expansion_ratio=4,
        max_seq_len=1024,
        vocab_size=vocab_size,
        no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8},
      )
      hf = transformers.MptForCausalLM(hf_config).eval()
      with torch.no_grad():
        for name, p in hf.named_parameters():
          p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
      tmp = tmp_path_factory.mktemp(f"mpt_vocab{vocab_size}")
      hf.save_pretrained(tmp / "torch")
      model_folder.save_model(convert.load_pytorch(tmp / "torch", config_overrides={"dtype": "float32"}), tmp / "flax")
      made[vocab_size] = hf, tmp / "flax"
    return made[vocab_size]

  return convert


@pytest.fixture(scope="session")
def converted_mpt(convert_random_mpt):
  """convert_random_mpt over the GPT-NeoX vocabulary: 50432 embedding rows, so the real tokenizer's ids fit."""
  return convert_random_mpt(50432)
