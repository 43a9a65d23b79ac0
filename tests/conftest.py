"""Test-wide setup (must precede importing jax): 8 virtual CPU devices for the sharding tests,
XLA's CPU code unoptimized, and one XLA compilation cache for the session."""

import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny, so compiling takes most of their time, and XLA's CPU backend
# compiles ~1.5x faster without LLVM's optimizations (fast math stays off either way). The
# processes the tests start (xdist's workers too, which import this file again) inherit the
# flag once, so bit-for-bit comparisons stay like for like.
UNOPTIMIZED = "--xla_backend_optimization_level=0"
if UNOPTIMIZED not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMIZED}"
# The train.py processes the tests start compile the same small steps again and again: with
# a cache shared through the environment, a 20-step run takes ~8 s instead of ~15 s on 2 cores.
# A fresh directory per session, so no test ever reads what another version of the code compiled.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="mpt-jax-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


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
