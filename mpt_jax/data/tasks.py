"""seqio Tasks and Mixtures: one Task per RedPajama subset, the `redpajama_llama` mixture, the embedded corpus.

Every Task is source -> tokenize -> append EOS -> pack: documents are concatenated within the
one source and cut into rows of exactly `sequence_length["targets"]` tokens, the recipe of
`ConcatTokensDataset` (docs/data.md), so each row comes from a single source.
`prepare` runs these Tasks once to write token shards; training never runs TensorFlow.
Tasks are registered by `register(config, tokenizer)` because file patterns and the
vocabulary come from the run's DataConfig. A subset can also come from a dataset prepared
with tensorflow-datasets: `source_patterns=("c4=tfds:c4/en:3.1.0",)` with `tfds_data_dir`.
"""

import collections
import functools
import itertools
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from mpt_jax.config import DataConfig
from mpt_jax.data import corpus, sources
from mpt_jax.data.tokenizer import Tokenizer

# The published mix of mpt-1b-redpajama-200b (docs/data.md), in percent.
REDPAJAMA_RATES = {
  "common_crawl": 67.0,
  "c4": 15.0,
  "github": 4.5,
  "wikipedia": 4.5,
  "book": 4.5,
  "arxiv": 2.5,
  "stackexchange": 2.0,
}
# Where each subset's files sit under DataConfig.data_dir in the RedPajama-1T download.
REDPAJAMA_LAYOUT = {
  "common_crawl": "common_crawl/*/*.jsonl*",
  "c4": "c4/*.jsonl*",
  "github": "github/*.jsonl*",
  "wikipedia": "wikipedia/*.jsonl*",
  "book": "book/*.jsonl*",
  "arxiv": "arxiv/*.jsonl*",
  "stackexchange": "stackexchange/*.jsonl*",
}
REDPAJAMA_MIXTURE = "redpajama_llama"
TFDS_PREFIX = "tfds:"
_DOCUMENTS_PER_CROSSING = 256


class HfVocabulary(seqio.Vocabulary):
  """A `seqio.Vocabulary` over a Hugging Face tokenizer (GPT-NeoX-20B: EOS 0, 50277 ids)."""

  def __init__(self, tokenizer: Tokenizer):
    super().__init__()
    self.tokenizer = tokenizer

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def unk_id(self) -> None:
    return None  # byte-level BPE: every string has ids

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s)

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(int(i) for i in ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    encode = lambda text: np.asarray(self.tokenizer.encode(text.numpy().decode("utf-8")), np.int32)
    ids = tf.py_function(encode, [s], tf.int32)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    decode = lambda rows: np.array([self.tokenizer.decode(r) for r in rows.numpy().reshape(-1, rows.shape[-1])], object)
    texts = tf.py_function(decode, [ids], tf.string)
    return tf.reshape(texts, tf.shape(ids)[:-1])

  def __eq__(self, other) -> bool:
    return isinstance(other, HfVocabulary) and other.tokenizer.sha256 == self.tokenizer.sha256


class DocumentSource(seqio.DataSource):
  """Documents `{"text": str}` read in Python from units, skipped records counted in `stats`.

  A shard of the split is every `num_shards`-th unit; `prepare` gives each unit its own shard.
  """

  def __init__(self, units: Sequence[str], read_unit: Callable[[str, collections.Counter], Iterator[str]]):
    super().__init__(splits=("train",))
    self.units = tuple(units)
    self.stats = collections.Counter()
    self._read_unit = read_unit

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self.units

  def get_dataset(
    self,
    split="train",
    shuffle=True,
    seed=None,
    shard_info=None,
    *,
    sequence_length=None,
    use_cached=False,
    num_epochs=1,
  ) -> tf.data.Dataset:
    units = self.units if shard_info is None else self.units[shard_info.index :: shard_info.num_shards]

    def chunks():  # a Python->TF crossing costs ~0.5 ms: cross with many documents at once
      for unit in units:
        documents = self._read_unit(unit, self.stats)
        while chunk := list(itertools.islice(documents, _DOCUMENTS_PER_CROSSING)):
          yield {"text": np.array(chunk, object)}

    # File order is kept (shuffle is ignored): the iterator samples rows, prepare only packs.
    spec = {"text": tf.TensorSpec([None], tf.string)}
    return tf.data.Dataset.from_generator(chunks, output_signature=spec).unbatch()


def pack_rows(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
  """Concatenates the documents' tokens and emits rows of exactly `sequence_length["targets"]`.

  No padding; the tail that does not fill a last row is dropped (ConcatTokensDataset, docs/data.md).
  """
  del output_features
  length = sequence_length["targets"]

  def cut(leftover, example):  # leftover: [< length] tokens carried into the next document
    tokens = tf.concat([leftover, example["targets"]], axis=0)
    full = tf.size(tokens) // length * length
    return tokens[full:], tf.reshape(tokens[:full], [-1, length])  # [rows, T]

  rows = dataset.scan(tf.zeros([0], tf.int32), cut).unbatch()
  return rows.map(lambda row: {"targets": row})


def register(
  config: DataConfig, tokenizer: Tokenizer, *, unit_bytes: int = sources.DEFAULT_UNIT_BYTES
) -> seqio.Task | seqio.Mixture:
  """(Re)registers the Tasks and Mixture that `config.mixture` names and returns it.

  Plain JSONL files are split into units (seqio shards) of `unit_bytes`.

  Raises:
    FileNotFoundError: a file pattern of a needed RedPajama subset matches nothing.
    ValueError: unknown mixture, or no data_dir / source pattern for a needed subset.
  """
  vocabulary = HfVocabulary(tokenizer)
  if config.mixture in corpus.EMBEDDED:
    texts = corpus.EMBEDDED[config.mixture]
    source = DocumentSource((config.mixture,), lambda unit, stats: sources.read_texts(texts(), stats))
    return _add_task(config.mixture, source, vocabulary)
  subsets = _redpajama_subsets(config.mixture)
  patterns = _subset_patterns(config, subsets)
  subset_tasks = {
    subset: _add_task(f"redpajama_{subset}", _source(patterns[subset], config, unit_bytes), vocabulary)
    for subset in subsets
  }
  if config.mixture != REDPAJAMA_MIXTURE:
    return subset_tasks[subsets[0]]
  seqio.MixtureRegistry.remove(REDPAJAMA_MIXTURE)
  rates = [(subset_tasks[s].name, rate) for s, rate in REDPAJAMA_RATES.items()]
  return seqio.MixtureRegistry.add(REDPAJAMA_MIXTURE, rates)


def input_patterns(config: DataConfig) -> list[str]:
  """The glob patterns of `config`'s file sources (none for the embedded corpus and TFDS sources)."""
  if config.mixture in corpus.EMBEDDED:
    return []
  patterns = _subset_patterns(config, _redpajama_subsets(config.mixture)).values()
  return [p for p in patterns if not p.startswith(TFDS_PREFIX)]


def tasks_of(provider: seqio.Task | seqio.Mixture) -> dict[str, float]:
  """Task name -> sampling rate (normalized to sum to 1)."""
  if isinstance(provider, seqio.Task):
    return {provider.name: 1.0}
  rates = {task.name: float(provider.get_rate(task)) for task in provider.tasks}
  return {name: rate / sum(rates.values()) for name, rate in rates.items()}


def _redpajama_subsets(mixture: str) -> list[str]:
  if mixture == REDPAJAMA_MIXTURE:
    return list(REDPAJAMA_RATES)
  subset = mixture.removeprefix("redpajama_")
  if subset not in REDPAJAMA_RATES or subset == mixture:
    names = (REDPAJAMA_MIXTURE, *(f"redpajama_{s}" for s in REDPAJAMA_RATES), *corpus.EMBEDDED)
    raise ValueError(f"DataConfig.mixture={mixture!r} is unknown; expected one of {names}")
  return [subset]


def _subset_patterns(config: DataConfig, subsets: Sequence[str]) -> dict[str, str]:
  overrides = {}
  for entry in config.source_patterns:
    subset, sep, pattern = entry.partition("=")
    if not sep or subset not in REDPAJAMA_RATES:
      raise ValueError(
        f"DataConfig.source_patterns entry {entry!r} must be 'subset=glob' with subset in {tuple(REDPAJAMA_RATES)}"
      )
    overrides[subset] = pattern
  patterns = {}
  for subset in subsets:
    if subset in overrides:
      patterns[subset] = overrides[subset]
    elif config.data_dir:
      patterns[subset] = os.path.join(config.data_dir, REDPAJAMA_LAYOUT[subset])
    else:
      raise ValueError(
        f"RedPajama subset {subset!r} has no files: set DataConfig.data_dir or a source_patterns entry '{subset}=glob'"
      )
  return patterns


def _source(pattern: str, config: DataConfig, unit_bytes: int) -> DocumentSource:
  if pattern.startswith(TFDS_PREFIX):
    return _tfds_source(pattern.removeprefix(TFDS_PREFIX), config.tfds_data_dir)
  return DocumentSource(sources.jsonl_units(sources.expand_patterns([pattern]), unit_bytes), sources.read_jsonl_unit)


def _tfds_source(name: str, data_dir: str) -> DocumentSource:
  """The `text` feature of a prepared tensorflow-datasets dataset's train split, one unit per file shard."""
  builder = tfds.builder(name, data_dir=data_dir or None)  # a registered builder, or read from data_dir
  if "text" not in builder.info.features:
    raise ValueError(f"TFDS dataset {name!r} has no 'text' feature; it has {sorted(builder.info.features)}")
  units = [f"train[{i}shard]" for i in range(builder.info.splits["train"].num_shards)]

  def read_unit(unit: str, stats: collections.Counter) -> Iterator[str]:
    def texts():
      for example in tfds.as_numpy(builder.as_dataset(split=unit, shuffle_files=False)):
        try:
          yield example["text"].decode("utf-8")
        except UnicodeDecodeError:
          stats["non_utf8"] += 1

    return sources.read_texts(texts(), stats)

  return DocumentSource(units, read_unit)


def _add_task(name: str, source: DocumentSource, vocabulary: HfVocabulary) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
      pack_rows,
    ],
    output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
  )
