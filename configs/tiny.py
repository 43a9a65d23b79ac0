"""A tiny MPT for tests and the newcomer's first run: same architecture, toy sizes.

  python train.py              # or: python train.py tiny --workdir runs/tiny

A 0.5M-parameter MPT on the embedded Shakespeare corpus (prepared on first use, ~25 s), 200
steps of 16 x 128 tokens. On a 2-core CPU: about 1.5-2.5 minutes; the loss falls from ~8.0
to ~4.4 nats/token; writes workdir/metrics.jsonl, workdir/tensorboard/, workdir/loss.png
and logs a short sample.
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
