"""Eval during training: held-out rows training never reads, eval/loss in metrics.jsonl, TensorBoard and the PNG."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from mpt_jax import metrics, trainer
from mpt_jax.config import DataConfig, EvalConfig, MPTConfig, OptimConfig, TrainConfig
from mpt_jax.data import shards
from mpt_jax.data.iterator import TrainIterator, heldout_index
from mpt_jax.data.tokenizer import train_bpe
from mpt_jax.model import MPTForCausalLM

SEQ_LEN = 32
SOURCE_ROWS = {"a": 40, "b": 25}
# max_seq_len above the training rows: the ICL prompts of a 120-token BPE are long.
MODEL = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=256, dtype="float32", attn_impl="xla")
COPA = pathlib.Path(__file__).parent / "data" / "icl" / "copa.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> shards.PreparedDataset:
  """Rows of random tokens in [1, 128): each row is told apart by its content."""
  directory = tmp_path_factory.mktemp("prepared")
  rng = np.random.default_rng(0)
  sources = {}
  for name, rows in SOURCE_ROWS.items():
    values = rng.integers(1, MODEL.vocab_size, (rows, SEQ_LEN), dtype=np.int32)
    count, sha256 = shards.write_rows(directory / f"{name}/shard-00000.bin", values)
    sources[name] = dict(
      rate=0.5, rows=count, stats={}, shards=[dict(file=f"{name}/shard-00000.bin", rows=count, sha256=sha256)]
    )
  tokenizer = dict(sha256="0" * 64, vocab_size=MODEL.vocab_size, eos_id=0)
  shards.write_manifest(
    directory, dict(format=shards.FORMAT_VERSION, mixture="test", seq_len=SEQ_LEN, tokenizer=tokenizer, sources=sources)
  )
  return shards.PreparedDataset(directory)


def _iterator(dataset, heldout_rows, **kwargs):
  return TrainIterator(
    dataset,
    seed=5,
    global_batch_size=8,
    process_index=0,
    process_count=1,
    eos_id=0,
    heldout_rows=heldout_rows,
    **kwargs,
  )


def _row_keys(dataset, rows: np.ndarray) -> set[bytes]:
  return {row.tobytes() for row in rows}


def test_training_never_reads_the_heldout_rows_and_still_reads_every_other(dataset):
  heldout = dataset.read(*heldout_index(dataset, 3))
  assert heldout.shape == (6, SEQ_LEN)
  everything = dataset.read(
    np.repeat([0, 1], list(SOURCE_ROWS.values())), np.concatenate([np.arange(n) for n in SOURCE_ROWS.values()])
  )
  iterator = _iterator(dataset, 3)
  seen = _row_keys(
    dataset, np.concatenate([next(iterator)["input_ids"] for _ in range(40)])
  )  # 320 rows: several epochs
  assert not seen & _row_keys(dataset, heldout)
  assert seen == _row_keys(dataset, everything) - _row_keys(dataset, heldout)


def test_resuming_with_another_heldout_count_is_refused(dataset):
  state = _iterator(dataset, 3).get_state()
  with pytest.raises(ValueError, match="held out 3 rows per source, this run holds out 0"):
    _iterator(dataset, 0).set_state(state)
  with pytest.raises(ValueError, match=r"leaves nothing to train on in b \(25 rows\)"):
    _iterator(dataset, 25)


def test_eval_every_n_steps_is_logged_beside_the_training_loss(dataset, tmp_path):
  tokenizer = tmp_path / "bpe.json"
  tokenizer.write_text(train_bpe([line for line in COPA.read_text().splitlines()], 120))
  config = TrainConfig(
    model=MODEL,
    data=DataConfig(tokenizer_path=str(tokenizer)),
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    eval=EvalConfig(every_steps=2, heldout_rows=3, icl_tasks=(str(COPA),), icl_max_examples=8, icl_batch_size=4),
    workdir=str(tmp_path / "run"),
    seq_len=SEQ_LEN,
    global_batch_size=8,
    steps=5,
    log_every=1,
    sample_tokens=0,
  )
  state = trainer.main(config, _iterator(dataset, 3))
  records = [json.loads(line) for line in (tmp_path / "run" / metrics.METRICS_FILE).read_text().splitlines()]
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and at the last
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
  assert all(0 <= r["eval/copa/accuracy"] <= 1 for r in evals)
  # The last eval/loss is the final parameters' mean next-token loss on exactly the held-out rows.
  graphdef, _ = nnx.split(MPTForCausalLM(MODEL, rngs=nnx.Rngs(0)))
  rows = dataset.read(*heldout_index(dataset, 3))
  logits = np.asarray(nnx.merge(graphdef, jax.device_get(state.params))(rows), np.float64)[:, :-1]
  log_probs = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  expected = -np.mean(np.take_along_axis(log_probs, rows[:, 1:, None], axis=-1))
  np.testing.assert_allclose(evals[-1]["eval/loss"], expected, rtol=1e-5)
  assert evals[0]["eval/loss"] != evals[-1]["eval/loss"]


def test_eval_needs_the_prepared_data_iterator(tmp_path):
  config = TrainConfig(
    model=MODEL,
    eval=EvalConfig(every_steps=1),
    workdir=str(tmp_path),
    seq_len=SEQ_LEN,
    global_batch_size=8,
    steps=1,
    sample_tokens=0,
  )
  synthetic = iter(lambda: {"input_ids": np.ones((8, SEQ_LEN), np.int32)}, None)
  with pytest.raises(ValueError, match="needs the prepared data's TrainIterator"):
    trainer.main(config, synthetic)


def test_metrics_writer_tags_eval_metrics_as_their_own(tmp_path, monkeypatch):
  writer = metrics.MetricsWriter(tmp_path, resumed_step=None)
  tags = []
  monkeypatch.setattr(writer._tensorboard, "add_scalar", lambda tag, value, step: tags.append((tag, value, step)))
  writer.write(4, {"loss": 2.5, "eval/loss": 2.75})
  assert tags == [("train/loss", 2.5, 4), ("eval/loss", 2.75, 4)]


def test_loss_png_draws_the_heldout_loss_beside_the_training_loss(tmp_path, monkeypatch):
  from matplotlib.axes import Axes

  lines, plot = [], Axes.plot

  def recording_plot(self, x, y, label, **kwargs):
    lines.append((label, list(x), list(y)))
    return plot(self, x, y, label=label, **kwargs)

  monkeypatch.setattr(Axes, "plot", recording_plot)
  records = [
    dict(step=1, loss=3.0),
    dict(step=2, loss=2.0),
    dict(step=2, **{"eval/loss": 2.4}),
    dict(step=3, loss=1.5),
    dict(step=2, loss=2.0),
  ]  # step 2 replayed after a restart
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  metrics.plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
  assert lines == [("train", [1, 2, 3], [3.0, 2.0, 1.5]), ("held-out", [2], [2.4])]
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_config_is_validated():
  with pytest.raises(ValueError, match="EvalConfig.every_steps must be >= 0"):
    EvalConfig(every_steps=-1)
  with pytest.raises(ValueError, match="heldout_rows must be >= 1 when every_steps > 0"):
    EvalConfig(every_steps=10, heldout_rows=0)
  assert dataclasses.replace(EvalConfig(), heldout_rows=0).every_steps == 0  # no eval, nothing held out
