"""Packing (docs/data.md) and the embedded corpus run through the real Task machinery."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from mpt_jax.data import corpus, load_tokenizer, make_train_iterator, shards
from mpt_jax.data.tasks import pack_rows


def packed(documents, length):
  dataset = tf.data.Dataset.from_generator(
    lambda: ({"targets": np.array(d, np.int32)} for d in documents),
    output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  return [row["targets"].tolist() for row in pack_rows(dataset, {"targets": length}, None).as_numpy_iterator()]


def test_pack_concatenates_documents_and_cuts_exact_rows():
  documents = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0]]  # EOS (0) already appended
  assert packed(documents, 4) == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]  # tail [0] dropped
  assert packed(documents, 13) == [[1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]]
  assert packed(documents, 14) == []


def test_pack_splits_a_document_longer_than_several_rows():
  assert packed([[9, 8], list(range(1, 8)) + [0]], 3) == [[9, 8, 1], [2, 3, 4], [5, 6, 7]]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  config = tiny.get_config()
  data = dataclasses.replace(config.data, prepared_dir=str(tmp_path_factory.mktemp("cache")))
  return dataclasses.replace(config, data=data)


@pytest.fixture(scope="module")
def tiny_iterator(tiny_config):
  """The default run's data: BPE trained and corpus prepared on first use."""
  return make_train_iterator(tiny_config, process_index=0, process_count=1)


def test_embedded_corpus_rows_equal_direct_tokenizers_encoding(tiny_config, tiny_iterator):
  tokenizer = load_tokenizer(tiny_config.data)
  documents = corpus.shakespeare()
  direct = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_id] for d in documents])  # no TensorFlow
  length = tiny_config.seq_len
  rows = len(direct) // length
  source = tiny_iterator.dataset
  assert source.manifest["sources"]["shakespeare"]["stats"] == {"documents": len(documents)} and len(documents) == 42
  assert source.rows.tolist() == [rows]
  stored = source.read(np.zeros(rows, np.int64), np.arange(rows))
  np.testing.assert_array_equal(stored, direct[: rows * length].reshape(rows, length))


def test_default_run_batches_are_shakespeare(tiny_config, tiny_iterator):
  batch = next(tiny_iterator)
  assert batch["input_ids"].shape == (tiny_config.global_batch_size, tiny_config.seq_len)
  assert batch["input_ids"].max() < tiny_config.model.vocab_size
  tokenizer, plays = load_tokenizer(tiny_config.data), corpus.shakespeare()
  for row in batch["input_ids"]:
    for piece in tokenizer.decode(row).split("<|endoftext|>"):
      assert any(piece in play for play in plays), piece


def test_prepared_data_and_bpe_live_in_the_cache_dir(tiny_config, tiny_iterator):
  tokenizer = load_tokenizer(tiny_config.data)
  directory = shards.dataset_dir(tiny_config.data, tiny_config.seq_len, tokenizer)
  assert tiny_iterator.dataset.directory == directory
  assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name, "shakespeare-bpe1024.tokenizer.json"]


def test_importing_the_data_package_loads_no_tensorflow():
  code = "import sys, mpt_jax.data; assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
