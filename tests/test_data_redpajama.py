"""The RedPajama Tasks and mixture end to end on tiny JSONL subsets: prepare CLI, manifest, iterator,
stale prepared data, inputs that yield nothing.

Every subset writes one letter only ("aaaa a aaa"), so a decoded row shows which sources it mixes.
"""

import dataclasses
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import zstandard

from mpt_jax.config import DataConfig, MPTConfig, TrainConfig
from mpt_jax.data import load_tokenizer, make_train_iterator, prepare, shards, tasks, tokenizer

SEQ_LEN = 16
LETTERS = {s: chr(ord("a") + i) for i, s in enumerate(tasks.REDPAJAMA_RATES)}
COMPRESSION = {"common_crawl": (".zst", zstandard.compress), "c4": (".gz", gzip.compress)}  # as downloaded


def documents(rng, letter):
  return [" ".join(letter * int(k) for k in rng.integers(1, 6, size=n)) for n in rng.integers(1, 30, size=40)]


def letters(vocabulary, ids) -> set[str]:
  return set(vocabulary.decode(ids).replace("<|endoftext|>", "").replace(" ", ""))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfig:
  root = tmp_path_factory.mktemp("redpajama")
  rng = np.random.default_rng(0)
  texts = []
  for subset, pattern in tasks.REDPAJAMA_LAYOUT.items():
    docs = documents(rng, LETTERS[subset])
    texts += docs
    lines = [json.dumps({"text": d, "meta": {"subset": subset}}).encode() for d in docs] + [b"{broken", b'{"meta": 1}']
    path = root / pattern.replace("*/", "2019-30/").replace("*.jsonl*", "part-0.jsonl")
    path.parent.mkdir(parents=True)
    suffix, compress = COMPRESSION.get(subset, ("", bytes))
    path.with_name(path.name + suffix).write_bytes(compress(b"".join(line + b"\n" for line in lines)))
  tokenizer_json = root / "tokenizer.json"
  tokenizer_json.write_text(tokenizer.train_bpe(texts, 300))
  return DataConfig(data_dir=str(root), tokenizer_path=str(tokenizer_json), prepared_dir=str(root / "prepared"))


@pytest.fixture(scope="module")
def prepared(config) -> shards.PreparedDataset:
  """Prepared by the CLI with 2 worker processes."""
  command = [sys.executable, "-m", "mpt_jax.data.prepare", "--workers", "2", "--seq-len", str(SEQ_LEN)]
  for field in ("data_dir", "tokenizer_path", "prepared_dir"):
    command += [f"--data.{field.replace('_', '-')}", getattr(config, field)]
  result = subprocess.run(command, check=True, capture_output=True, text=True)
  directory = shards.dataset_dir(config, SEQ_LEN, load_tokenizer(config))
  assert result.stdout.strip().endswith(str(directory))
  return shards.PreparedDataset(directory)


def test_manifest_has_the_published_rates_and_counts_bad_records(prepared):
  manifest = prepared.manifest["sources"]
  assert sorted(manifest) == sorted(f"redpajama_{s}" for s in tasks.REDPAJAMA_RATES)
  for subset, percent in tasks.REDPAJAMA_RATES.items():
    source = manifest[f"redpajama_{subset}"]
    assert source["rate"] == pytest.approx(percent / 100)
    assert source["stats"] == {"documents": 40, "malformed_json": 1, "missing_text": 1}
    assert source["rows"] > 10


def test_every_row_comes_from_one_source(config, prepared):
  vocabulary = load_tokenizer(config)
  for s, name in enumerate(prepared.names):
    rows = prepared.read(np.full(prepared.rows[s], s), np.arange(prepared.rows[s]))
    assert letters(vocabulary, rows.ravel()) == {LETTERS[name.removeprefix("redpajama_")]}


def test_training_iterator_reads_the_prepared_mixture(config, prepared):
  train = TrainConfig(model=MPTConfig(vocab_size=384), data=config, seq_len=SEQ_LEN, global_batch_size=32)
  iterator = make_train_iterator(train, process_index=1, process_count=2)
  assert iterator.dataset.fingerprint == prepared.fingerprint
  vocabulary = load_tokenizer(config)
  for row in next(iterator)["input_ids"]:  # [16, T]
    assert len(letters(vocabulary, row)) == 1


def test_unprepared_data_is_an_error_naming_the_command(config):
  train = TrainConfig(
    data=dataclasses.replace(config, seed=1, prepared_dir=config.prepared_dir + "-none"), seq_len=SEQ_LEN
  )
  with pytest.raises(FileNotFoundError, match="mpt_jax.data.prepare"):
    make_train_iterator(train, process_index=0, process_count=1)


def test_a_subset_pattern_matching_nothing_fails_at_start(config):
  bad = dataclasses.replace(config, source_patterns=("wikipedia=/nonexistent/wiki/*.jsonl",))
  with pytest.raises(FileNotFoundError, match="/nonexistent/wiki"):
    tasks.register(bad, load_tokenizer(config))


def test_a_single_subset_is_a_task(config):
  task = tasks.register(dataclasses.replace(config, mixture="redpajama_arxiv"), load_tokenizer(config))
  assert tasks.tasks_of(task) == {"redpajama_arxiv": 1.0}
  with pytest.raises(ValueError, match="redpajama_llama"):
    tasks.register(dataclasses.replace(config, mixture="redpajama_books"), load_tokenizer(config))


class TinyWiki(tfds.core.GeneratorBasedBuilder):
  """A dataset registered with tensorflow-datasets: 30 documents, 5 of them empty."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(30):
      yield i, {"text": " ".join(["dd"] * (i % 6))}


def test_a_tfds_dataset_is_a_source(config, tmp_path):
  TinyWiki(data_dir=str(tmp_path)).download_and_prepare()
  data = dataclasses.replace(
    config,
    mixture="redpajama_wikipedia",
    source_patterns=("wikipedia=tfds:tiny_wiki",),
    tfds_data_dir=str(tmp_path),
    prepared_dir=str(tmp_path / "prepared"),
  )
  vocabulary = load_tokenizer(data)
  dataset = shards.PreparedDataset(prepare.prepare(data, SEQ_LEN))
  source = dataset.manifest["sources"]["redpajama_wikipedia"]
  assert source["stats"] == {"documents": 25, "empty_text": 5}
  ordered = tfds.builder("tiny_wiki", data_dir=str(tmp_path)).as_dataset(split="train", shuffle_files=False)
  direct = np.concatenate(
    [vocabulary.encode(t.decode()) + [0] for t in (ex["text"] for ex in tfds.as_numpy(ordered)) if t]
  )
  rows = len(direct) // SEQ_LEN
  np.testing.assert_array_equal(
    dataset.read(np.zeros(rows, int), np.arange(rows)), direct[: rows * SEQ_LEN].reshape(rows, SEQ_LEN)
  )


def _write_jsonl(path, texts):
  with open(path, "ab") as f:
    f.write(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts))


def _c4_only(config, tmp_path) -> DataConfig:
  return dataclasses.replace(
    config,
    mixture="redpajama_c4",
    source_patterns=(f"c4={tmp_path}/c4/*.jsonl*",),
    prepared_dir=str(tmp_path / "prepared"),
  )


def test_prepared_data_is_redone_after_its_input_files_change(config, tmp_path):
  (tmp_path / "c4").mkdir()
  rng = np.random.default_rng(1)
  _write_jsonl(tmp_path / "c4" / "a.jsonl", documents(rng, "c"))
  data = _c4_only(config, tmp_path)
  train = TrainConfig(model=MPTConfig(vocab_size=384), data=data, seq_len=SEQ_LEN, global_batch_size=4)
  first = shards.PreparedDataset(prepare.prepare(data, SEQ_LEN))
  assert make_train_iterator(train, process_index=0, process_count=1).dataset.fingerprint == first.fingerprint

  _write_jsonl(tmp_path / "c4" / "b.jsonl", documents(rng, "c"))  # a file added
  with pytest.raises(
    ValueError,
    match=r"is stale, its input files changed since: 1 added \(.*/c4/b.jsonl\); run `python -m mpt_jax.data.prepare`",
  ):
    make_train_iterator(train, process_index=0, process_count=1)
  second = shards.PreparedDataset(prepare.prepare(data, SEQ_LEN))
  _write_jsonl(tmp_path / "c4" / "a.jsonl", documents(rng, "c"))  # a file grown
  third = shards.PreparedDataset(prepare.prepare(data, SEQ_LEN))
  assert first.directory == second.directory == third.directory
  assert [d.manifest["sources"]["redpajama_c4"]["stats"]["documents"] for d in (first, second, third)] == [40, 80, 120]
  assert make_train_iterator(train, process_index=0, process_count=1).dataset.fingerprint == third.fingerprint


def test_inputs_that_yield_no_row_fail_naming_each_file_and_cache_nothing(config, tmp_path, capsys):
  (tmp_path / "c4").mkdir()
  files = {
    "empty.jsonl": (b"", "0 documents, skipped none"),
    "malformed.jsonl": (b"{broken\n[1, 2]\n", "0 documents, skipped 1 malformed_json, 1 missing_text"),
    "binary.jsonl": (bytes(range(256)) * 8, "0 documents, skipped "),
    "fake.jsonl.zst": (b"this is not zstd", "0 documents, skipped 1 corrupt_file"),
  }
  for name, (content, _) in files.items():
    (tmp_path / "c4" / name).write_bytes(content)
  data = _c4_only(config, tmp_path)
  argv = [
    "--data.mixture",
    data.mixture,
    "--data.source-patterns",
    *data.source_patterns,
    "--data.tokenizer-path",
    data.tokenizer_path,
    "--data.prepared-dir",
    data.prepared_dir,
    "--seq-len",
    str(SEQ_LEN),
    "--workers",
    "1",
  ]
  assert prepare.main(argv) == 2
  error = capsys.readouterr().err.split("\n")[-2]  # after the progress bar, one line
  assert error.startswith(
    f"error: redpajama_c4 yields no full row of {SEQ_LEN} tokens, so nothing was prepared; per file: "
  )
  for name, (_, summary) in files.items():
    assert f"{tmp_path / 'c4' / name}: {summary}" in error
  assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())
