"""Tokenizers: GPT-NeoX-20B as a seqio Vocabulary, and the BPE trained for the embedded corpus."""

import numpy as np
import pytest
import tensorflow as tf
import tokenizers

from mpt_jax.config import DataConfig
from mpt_jax.data import load_tokenizer
from mpt_jax.data import tokenizer as tokenizer_lib
from mpt_jax.data.tasks import HfVocabulary

TEXTS = [
  "Who's there? Nay, answer me: stand, and unfold yourself.",
  "def f(x):\n    return x ** 2  # tabs\tand  spaces",
  "Ünïcödé ñ 日本語 emoji 🙂 and a trailing space ",
]


@pytest.fixture(scope="module")
def neox(tokenizer_json) -> tokenizer_lib.Tokenizer:
  return load_tokenizer(DataConfig(tokenizer_path=str(tokenizer_json)))


def test_neox_ids_match_the_spec(neox):
  assert neox.eos_id == 0  # docs/data.md, Tokenizer
  assert neox.vocab_size == 50277
  assert neox.encode("<|endoftext|>") == [0]


@pytest.mark.parametrize("text", TEXTS)
def test_neox_round_trips_and_equals_tokenizers(neox, tokenizer_json, text):
  ids = neox.encode(text)
  assert ids == tokenizers.Tokenizer.from_file(str(tokenizer_json)).encode(text).ids
  assert neox.decode(ids) == text


def test_seqio_vocabulary_encodes_alike_in_python_and_tensorflow(neox):
  vocabulary = HfVocabulary(neox)
  assert (vocabulary.eos_id, vocabulary.vocab_size) == (0, 50277)
  for text in TEXTS:
    ids = vocabulary.encode(text)
    np.testing.assert_array_equal(vocabulary.encode_tf(tf.constant(text)).numpy(), ids)
    assert vocabulary.decode(ids) == text
  batch = tf.constant([neox.encode("to be"), neox.encode("or not")])
  assert vocabulary.decode_tf(batch).numpy().tolist() == [b"to be", b"or not"]


def test_bpe_training_is_deterministic_with_eos_first():
  corpus = [t * 20 for t in TEXTS]
  first, second = tokenizer_lib.train_bpe(corpus, 300), tokenizer_lib.train_bpe(corpus, 300)
  assert first == second
  trained = tokenizer_lib.Tokenizer(first, source="test")
  assert trained.eos_id == 0 and trained.vocab_size == 300
  assert all(trained.decode(trained.encode(t)) == t for t in TEXTS)


def test_missing_tokenizer_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    load_tokenizer(DataConfig(tokenizer_path=str(tmp_path / "nope.json")))


@pytest.mark.parametrize(
  "content", [b"not json", b'{"version": "1.0"}', b"\xff\xfe\x00 binary"], ids=["text", "json", "binary"]
)
def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, content):
  path = tmp_path / "vocab.json"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"tokenizer file {tmp_path}/vocab.json .*not .*tokenizer.json"):
    load_tokenizer(DataConfig(tokenizer_path=str(path)))


def test_real_mixture_needs_a_tokenizer_path():
  with pytest.raises(ValueError, match="tokenizer_path"):
    load_tokenizer(DataConfig(mixture="redpajama_llama"))
