"""Raw JSONL reading: bad records counted and skipped, byte-range units, missing files named."""

import collections
import gzip
import json

import numpy as np
import pytest
import zstandard

from mpt_jax.data import sources

GOOD = ["first document", "second\nwith a newline", "third ünïcode"]


def write_jsonl(path, lines: list[bytes]):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return str(path)


def test_bad_records_are_counted_and_skipped(tmp_path):
  lines = [
    json.dumps({"text": GOOD[0], "meta": {}}).encode(),
    b'{"text": "unterminated',
    json.dumps({"meta": {"no": "text"}}).encode(),
    json.dumps({"text": 42}).encode(),
    json.dumps(["not", "an", "object"]).encode(),
    json.dumps({"text": "  \n "}).encode(),
    b'{"text": "latin-1 \xe9t\xe9"}',
    json.dumps({"text": "lone \ud800 surrogate"}).encode(),
    b"",
    json.dumps({"text": GOOD[1]}).encode(),
    json.dumps({"text": GOOD[2]}, ensure_ascii=False).encode(),
  ]
  stats = collections.Counter()
  texts = list(sources.read_jsonl_unit(write_jsonl(tmp_path / "bad.jsonl", lines), stats))
  assert texts == GOOD
  assert stats == {"documents": 3, "malformed_json": 1, "missing_text": 3, "empty_text": 1, "non_utf8": 2}
  assert sources.summary(stats) == "3 documents, skipped 1 empty_text, 1 malformed_json, 3 missing_text, 2 non_utf8"


@pytest.mark.parametrize("seed", [0, 1])
def test_byte_range_units_read_every_line_exactly_once(tmp_path, seed):
  rng = np.random.default_rng(seed)
  texts = ["x" * int(n) for n in rng.integers(1, 60, size=200)]  # random record boundaries
  path = write_jsonl(tmp_path / "big.jsonl", [json.dumps({"text": t}).encode() for t in texts])
  unit_bytes = int(rng.integers(20, 300))
  units = sources.jsonl_units([path], unit_bytes)
  assert len(units) > 10 and all("@" in u for u in units)
  stats = collections.Counter()
  read = [t for unit in units for t in sources.read_jsonl_unit(unit, stats)]
  assert read == texts and stats == {"documents": len(texts)}


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstandard.compress)])
def test_compressed_files_are_read_whole(tmp_path, suffix, compress):
  path = tmp_path / f"docs.jsonl{suffix}"
  path.write_bytes(compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in GOOD)))
  assert sources.jsonl_units([str(path)], unit_bytes=1) == [str(path)]
  assert list(sources.read_jsonl_unit(str(path), collections.Counter())) == GOOD


# gzip notices the missing end; a zstd stream just ends, and its cut last line is malformed JSON.
@pytest.mark.parametrize(
  "suffix, compress, reason", [(".gz", gzip.compress, "corrupt_file"), (".zst", zstandard.compress, "malformed_json")]
)
def test_a_truncated_compressed_file_keeps_its_complete_records(tmp_path, suffix, compress, reason):
  texts = [f"document {i} " * 50 for i in range(400)]
  data = compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts))
  path = tmp_path / f"cut.jsonl{suffix}"
  path.write_bytes(data[: len(data) // 2])
  stats = collections.Counter()
  read = list(sources.read_jsonl_unit(str(path), stats))
  assert 0 < len(read) < len(texts) and read == texts[: len(read)]
  assert stats == {"documents": len(read), reason: 1}


def test_a_pattern_matching_nothing_fails_naming_it(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [b"{}"])
  assert sources.expand_patterns([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl")]
  with pytest.raises(FileNotFoundError, match="wiki/\\*.jsonl"):
    sources.expand_patterns([str(tmp_path / "*.jsonl"), str(tmp_path / "wiki/*.jsonl")])
