"""mosaicml/mpt-1b-redpajama-200b, the published run.

Model: the released config.json exactly (MPTConfig's defaults), 1,311,442,944 parameters.
Run: 200B tokens at a global batch of 2200 x 2048 = 44,389 steps; optimizer, schedule and
clipping from the public MPT-1B recipe (decoupled AdamW 2e-4, betas 0.9/0.95, eps 1e-8, no
weight decay, 100 warmup steps, cosine to 0.1x, clip 1.0; OptimConfig's defaults), since
the run's own were never published.

  python train.py mpt_1b_redpajama_200b --workdir /ckpt/mpt-1b \\
      --data.data-dir /data/redpajama --data.tokenizer-path /data/gpt-neox-20b/tokenizer.json

Speed settings: the fastest measured on one H200 (docs/performance.md, benchmarks/RESULTS.md):
no activation checkpointing, 25 rows per device per pass (63.1k tokens/s, 57.9% MFU, 100
GiB peak; 16 rows: 62.4k, 11 rows: 62.2k, 57 GiB), the layer scan unrolled into
straight-line code (+13% over one block per scan iteration; compiles in ~25 s instead of
~8 s), Pallas attention and LayerNorm kernels (``auto`` on GPUs).

Batch: micro_batch_size x grad_accum x (mesh data x fsdp) must be 2200 = 2^3 * 5^2 * 11, so
25 rows per pass fit 1, 2, 4, 8, 11, 22, 44 or 88 devices (88 of them: one pass per step).
On 80 GB cards pass --micro-batch-size 11 (1, 2, 4, 8 devices); the original's 440 devices
take --micro-batch-size 5.

Hardware: the original used 440 A100-40GB for about half a day (~10.5k tokens/s/GPU).
"""

from mpt_jax.config import MPTConfig, TrainConfig

N_LAYERS = MPTConfig().n_layers


def get_config() -> TrainConfig:
  return TrainConfig(
    model=MPTConfig(scan_unroll=N_LAYERS),
    seq_len=2048,
    global_batch_size=2200,
    micro_batch_size=25,
    steps=44_389,  # 200e9 / (2200 * 2048)
  )
