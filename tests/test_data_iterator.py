"""The training iterator: mixture rates, per-source order, exact resume, the multi-host split.

The prepared data here is written by hand (no TensorFlow): row r of source s holds the value
1000 * s + r in every position, so each token names the row it came from.
"""

import json

import numpy as np
import pytest

from mpt_jax.data import sampler, shards, tasks
from mpt_jax.data.iterator import TrainIterator, document_ids

SEQ_LEN = 8
SOURCE_ROWS = {"a": 37, "b": 5, "c": 120}  # "b" wraps into new epochs within a few steps
RATES = {"a": 0.5, "b": 0.2, "c": 0.3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> shards.PreparedDataset:
  directory = tmp_path_factory.mktemp("prepared")
  sources = {}
  for s, (name, rows) in enumerate(SOURCE_ROWS.items()):
    # two shards per source, so reads cross shard boundaries
    cut = rows // 2
    entries = []
    for k, (lo, hi) in enumerate([(0, cut), (cut, rows)]):
      file = f"{name}/shard-{k:05d}.bin"
      values = (1000 * s + np.arange(lo, hi))[:, None] * np.ones(SEQ_LEN, np.int32)
      count, sha256 = shards.write_rows(directory / file, values)
      entries.append(dict(file=file, rows=count, sha256=sha256))
    sources[name] = dict(rate=RATES[name], rows=rows, stats={"documents": rows}, shards=entries)
  tokenizer = dict(sha256="0" * 64, vocab_size=4096, eos_id=0)
  shards.write_manifest(
    directory, dict(format=shards.FORMAT_VERSION, mixture="test", seq_len=SEQ_LEN, tokenizer=tokenizer, sources=sources)
  )
  return shards.PreparedDataset(directory)


def make_iterator(dataset, *, seed=3, global_batch_size=12, process_index=0, process_count=1, **outputs):
  return TrainIterator(
    dataset,
    seed=seed,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
    eos_id=0,
    **outputs,
  )


def take(iterator, n):
  return [next(iterator)["input_ids"] for _ in range(n)]


def test_redpajama_mixture_rates_within_one_percent_over_20k_rows():
  names = list(tasks.REDPAJAMA_RATES)
  rates = np.array([tasks.REDPAJAMA_RATES[n] for n in names]) / 100
  draws = np.concatenate([sampler.mixture_draw(17, step, rates, 100) for step in range(200)])  # 20k rows
  empirical = np.bincount(draws, minlength=len(rates)) / draws.size
  np.testing.assert_allclose(empirical, rates, atol=0.01)
  assert rates.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 5, 37, 1000, 4097])
def test_permute_is_a_bijection_that_changes_with_the_epoch(n):
  orders = [sampler.permute(np.arange(n), n, seed=5, source=1, epoch=e) for e in range(2)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  if n >= 37:
    assert not np.array_equal(*orders)


def test_rows_are_whole_rows_of_one_source_and_each_epoch_reads_every_row_once(dataset):
  iterator = make_iterator(dataset)
  batches = np.concatenate(take(iterator, 60))  # [720, T]
  assert (batches == batches[:, :1]).all()  # rows are read whole, never spliced
  values = batches[:, 0]
  consumed = iterator.get_state()["consumed"]
  for s, (name, rows) in enumerate(SOURCE_ROWS.items()):
    seen = values[values // 1000 == s] - 1000 * s
    assert len(seen) == consumed[name]
    for epoch in range(len(seen) // rows):  # complete epochs are permutations of the source
      np.testing.assert_array_equal(np.sort(seen[epoch * rows : (epoch + 1) * rows]), np.arange(rows))


def test_same_seed_same_batches_other_seed_other_batches(dataset):
  first, again, other = (take(make_iterator(dataset, seed=seed), 4) for seed in (3, 3, 4))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_restore_continues_exactly(dataset):
  iterator = make_iterator(dataset)
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
  expected = take(iterator, 5)
  restored = make_iterator(dataset)
  restored.set_state(state)
  np.testing.assert_array_equal(take(restored, 5), expected)
  np.testing.assert_array_equal(take(make_iterator(dataset), 12)[7:], expected)  # no restart at all


def test_restore_refuses_other_data_or_seed(dataset):
  state = make_iterator(dataset).get_state()
  with pytest.raises(ValueError, match="prepared data"):
    make_iterator(dataset).set_state(dict(state, fingerprint="f" * 64))
  with pytest.raises(ValueError, match="seed"):
    make_iterator(dataset, seed=4).set_state(state)


def test_two_hosts_read_disjoint_halves_that_make_the_global_batch(dataset):
  whole = take(make_iterator(dataset), 3)
  hosts = [take(make_iterator(dataset, process_index=p, process_count=2), 3) for p in range(2)]
  for step in range(3):
    assert hosts[0][step].shape == (6, SEQ_LEN)
    np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), whole[step])
  first = [set(h[0][:, 0].tolist()) for h in hosts]
  assert len(set(whole[0][:, 0].tolist())) == 12  # the first global batch reads 12 distinct rows
  assert first[0].isdisjoint(first[1])


def test_batch_size_must_split_over_hosts(dataset):
  with pytest.raises(ValueError, match="divisible"):
    make_iterator(dataset, global_batch_size=12, process_count=5)


def test_document_ids_restart_after_each_eos():
  input_ids = np.array([[1, 2, 3, 0], [4, 5, 0, 6], [0, 7, 0, 0]], np.int32)
  segment_ids = document_ids(input_ids, eos_id=0)
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 1], [1, 1, 1, 2], [1, 2, 2, 3]])


def test_iterator_adds_segment_ids_when_asked(dataset):
  batch = next(make_iterator(dataset, segment_ids=True))
  assert set(batch) == {"input_ids", "segment_ids"}
  for value in batch.values():
    assert value.shape == (12, SEQ_LEN) and value.dtype == np.int32
  assert set(next(make_iterator(dataset))) == {"input_ids"}
