"""A tiny MPT for tests and the newcomer's first run: same architecture, toy sizes.

  python train.py tiny

Runs on a 2-core CPU in a few minutes.
"""

import dataclasses

from mpt_jax.config import DataConfig, MPTConfig, OptimConfig, TrainConfig

# vocab_size: the 1024 ids of the BPE trained on the embedded corpus (DataConfig.bpe_vocab_size).
MODEL = MPTConfig(d_model=128, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=1024, dtype="float32")


def get_config() -> TrainConfig:
  return TrainConfig(
      model=MODEL,
      data=DataConfig(mixture="shakespeare"),  # embedded corpus, BPE trained on it (offline)
      optim=dataclasses.replace(OptimConfig(), lr=3e-3, warmup_steps=20),
      seq_len=128,
      global_batch_size=16,
      steps=200,
  )
