"""Perplexity: the trainer's mean loss on the same rows, token weighting over ragged rows, packing, sources."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mpt_jax import sharding, trainer
from mpt_jax.config import MeshConfig, MPTConfig, TrainConfig
from mpt_jax.eval import perplexity
from mpt_jax.model import MPTForCausalLM

MODEL = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=32, dtype="float32", attn_impl="xla")


def _numpy_losses(logits: np.ndarray, row: np.ndarray) -> np.ndarray:
  """Cross-entropy of each next token of one row from its logits [T, V], float64 log-softmax."""
  logits = np.asarray(logits, np.float64)[: len(row) - 1]
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(row) - 1), row[1:]]


def test_perplexity_is_exp_of_the_trainers_mean_loss_on_the_same_rows():
  config = TrainConfig(model=MODEL, mesh=MeshConfig(fsdp=1), seq_len=32, global_batch_size=8, steps=10)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rows = np.asarray(jax.random.randint(jax.random.key(0), (8, 32), 0, MODEL.vocab_size), np.int32)
  with jax.set_mesh(mesh):
    setup = trainer.make_setup(config, mesh)
    state = setup.init()
    ours, tokens = perplexity.mean_loss(
      nnx.merge(setup.graphdef, state.params), rows, batch_size=3, seq_len=32, progress=False
    )
    _, step_metrics = setup.train_step(
      state, sharding.global_batch({"input_ids": rows}, mesh)
    )  # loss before the update
  assert tokens == 8 * 31
  np.testing.assert_allclose(np.exp(ours), np.exp(float(step_metrics["loss"])), rtol=1e-5)


@pytest.fixture(scope="module")
def model():
  return MPTForCausalLM(MODEL, rngs=nnx.Rngs(1))


def test_rows_of_different_lengths_weigh_every_predicted_token_once(model):
  keys = jax.random.split(jax.random.key(2), 5)
  rows = [
    np.asarray(jax.random.randint(k, (n,), 0, MODEL.vocab_size), np.int32) for k, n in zip(keys, [5, 32, 17, 2, 1])
  ]
  loss, tokens = perplexity.mean_loss(model, rows, batch_size=2, seq_len=32, progress=False)
  forward = nnx.jit(lambda model, ids: model(ids))
  logits = [forward(model, row[None])[0] for row in rows]  # each row alone, unpadded
  expected = np.concatenate([_numpy_losses(l, row) for l, row in zip(logits, rows)])
  assert tokens == expected.size == 4 + 31 + 16 + 1
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


def test_rows_longer_than_seq_len_are_refused(model):
  with pytest.raises(ValueError, match="a row has 20 tokens; rows must have 1 to seq_len=16"):
    perplexity.mean_loss(model, [np.ones(20, np.int32)], batch_size=2, seq_len=16, progress=False)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
    perplexity.mean_loss(model, [np.ones(20, np.int32)], batch_size=2, seq_len=64, progress=False)


def test_documents_are_packed_as_training_packs_them_with_the_tail_kept():
  documents = [[1, 2, 3], [4, 5, 6, 7, 8], [], [9]]
  rows = [row.tolist() for row in perplexity.pack_documents(documents, 4, eos_id=0)]
  assert rows == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 0, 9], [0]]


def test_jsonl_texts_name_a_malformed_line(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": 2}) + "\n")
  texts = perplexity.jsonl_texts(path)
  assert next(texts) == "one"
  with pytest.raises(ValueError, match=r"docs.jsonl:3: expected an object with a string \"text\" field"):
    next(texts)


def test_seqio_task_rows():
  seqio = pytest.importorskip("seqio")
  import tensorflow as tf

  tokens = [np.arange(1, 6), np.arange(10, 13)]

  def dataset_fn(split, shuffle_files, seed=None):
    return tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant([t.tolist() for t in tokens])}).map(
      lambda x: {"targets": x["targets"]}
    )

  seqio.TaskRegistry.remove("eval_test_rows")
  seqio.TaskRegistry.add(
    "eval_test_rows",
    source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
    preprocessors=[],
    output_features={"targets": seqio.Feature(seqio.PassThroughVocabulary(97), add_eos=False, dtype=tf.int32)},
  )
  rows = list(perplexity.seqio_rows("eval_test_rows:validation", 4, tokenizer=None))
  assert [r.tolist() for r in rows] == [[1, 2, 3, 4], [10, 11, 12]]  # trimmed to seq_len, like training rows
