"""A short training run of a small MPT on one device: its loss curve, to compare versions of the step.

  python benchmarks/loss_curve.py --steps 50 --out new.json
  python benchmarks/loss_curve.py --code /path/to/older/checkout --layers scan --out old.json
  python benchmarks/loss_curve.py --compare new.json old.json [old_loop.json]

The data are synthetic but learnable (each token has a few likely successors under a fixed
random Markov chain), so the loss falls from ln(V) and any change of the maths shows as a
diverging curve. ``--code`` imports mpt_jax from another checkout, so an older step runs on
the same data; between two versions, differences as large as between two reduction orders
of the same version (scan against a Python loop over the layers) are bf16 noise. Never
imports mpt_jax.data.
"""

import dataclasses
import json
import pathlib
import sys
from typing import Literal

import numpy as np
import tyro


@dataclasses.dataclass(frozen=True)
class Args:
  steps: int = 50
  batch_size: int = 8
  seq_len: int = 512
  layers: Literal["unrolled", "scan", "loop"] = "unrolled"
  code: str = str(pathlib.Path(__file__).resolve().parents[1])  # the checkout whose mpt_jax runs
  out: str = ""  # where to write the losses (JSON)
  compare: tuple[str, ...] = ()  # instead of training: the first file against each of the others


def markov_batches(vocab: int, batch: int, length: int, *, successors: int = 4, seed: int = 0):
  """Endless int32 [batch, length] rows from a fixed random chain: ~ln(successors) nats/token learnable."""
  rng = np.random.default_rng(seed)
  table = rng.integers(0, vocab, (vocab, successors))
  while True:
    rows = np.empty((batch, length), np.int64)
    rows[:, 0] = rng.integers(0, vocab, batch)
    for t in range(1, length):
      rows[:, t] = table[rows[:, t - 1], rng.integers(0, successors, batch)]
    yield {"input_ids": rows.astype(np.int32)}


def train(args: Args) -> list[float]:
  sys.path.insert(0, args.code)
  import jax

  from mpt_jax import sharding, trainer
  from mpt_jax.config import MeshConfig, MPTConfig, OptimConfig, TrainConfig

  model = MPTConfig(d_model=512, n_heads=8, n_layers=8, max_seq_len=args.seq_len, scan_layers=args.layers != "loop")
  if args.layers == "unrolled":
    model = dataclasses.replace(model, scan_unroll=model.n_layers)
  config = TrainConfig(
    model=model,
    mesh=MeshConfig(fsdp=1),
    optim=OptimConfig(lr=1e-3, warmup_steps=10),
    seq_len=args.seq_len,
    global_batch_size=args.batch_size,
    steps=args.steps,
    z_loss=1e-4,
  )
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  losses = []
  with jax.set_mesh(mesh):
    setup = trainer.make_setup(config, mesh)
    state = setup.init()
    for _, rows in zip(range(args.steps), markov_batches(model.vocab_size, args.batch_size, args.seq_len)):
      state, step_metrics = setup.train_step(state, sharding.global_batch(rows, mesh))
      losses.append(float(step_metrics["loss"]))
  return losses


def compare(files: tuple[str, ...]) -> None:
  curves = {f: np.array(json.loads(pathlib.Path(f).read_text())["losses"]) for f in files}
  first = curves[files[0]]
  print(f"{files[0]}: loss {first[0]:.4f} -> {first[-1]:.4f} over {len(first)} steps")
  for f in files[1:]:
    diff = np.abs(curves[f] - first)
    print(
      f"{f}: max |difference| {diff.max():.4f} (step {int(diff.argmax()) + 1}), mean {diff.mean():.4f}, "
      f"last {curves[f][-1]:.4f}"
    )


def main(args: Args) -> None:
  if args.compare:
    compare(args.compare)
    return
  losses = train(args)
  import jax

  print(f"{args.layers} ({args.code}): " + " ".join(f"{x:.3f}" for x in losses))
  if args.out:
    record = dict(losses=losses, args=dataclasses.asdict(args), card=jax.devices()[0].device_kind, jax=jax.__version__)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
  main(tyro.cli(Args))
