"""mosaicml/mpt-1b-redpajama-200b, the published run (reference-mpt-1b.md §1, §5).

Model: the released config.json exactly (MPTConfig's defaults), 1,311,442,944 parameters.
Run: 200B tokens at a global batch of 2200 x 2048 = 44,389 steps; optimizer, schedule and
clipping from the public MPT-1B recipe (§5.2: decoupled AdamW 2e-4, betas 0.9/0.95, eps
1e-8, no weight decay, 100 warmup steps, cosine to 0.1x, clip 1.0; OptimConfig's defaults),
since the run's own were never published.

  python train.py mpt_1b_redpajama_200b --workdir /ckpt/mpt-1b \
      --data.data_dir /data/redpajama --data.tokenizer_path /data/gpt-neox-20b/tokenizer.json

Batch: micro_batch_size x grad_accum x (mesh data x fsdp) must be 2200 = 2^3 * 5^2 * 11, so
the data-parallel size must divide 440 (5 rows per device): 440 devices take one microbatch
per step as the original did; 8 GPUs accumulate 55 of them (override --micro_batch_size,
e.g. 11 on 8 x H100-80GB: 25 microbatches).

Hardware: the original used 440 A100-40GB for about half a day (~10.5k tokens/s/GPU).
"""

from mpt_jax.config import MPTConfig, TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=MPTConfig(),
      seq_len=2048,
      global_batch_size=2200,
      micro_batch_size=5,  # 2200 / 440 devices of the original run
      steps=44_389,  # 200e9 / (2200 * 2048)
  )
