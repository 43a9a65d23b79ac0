"""Raw documents: JSONL files (RedPajama-1T: one `{"text": ..., "meta": ...}` per line) split into units.

A unit is the piece of a source one `prepare` worker reads: a whole compressed file (`.gz`,
or `.zst` as RedPajama's CommonCrawl ships), or a
byte range of a plain `.jsonl` file (`path@start-end`; a line belongs to the range holding its
first byte), so a single 100 GB file (RedPajama's wiki.jsonl, book.jsonl) still spreads over all
cores. Bad records are counted in a `collections.Counter` under a reason and skipped: a
long run never stops for one broken line.
"""

import collections
import glob
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import zstandard

DEFAULT_UNIT_BYTES = 256 << 20  # plain JSONL files are split into ranges of this size
DOCUMENTS = "documents"  # the Counter key of documents kept; every other key is a skip reason
COMPRESSED = (".gz", ".zst")


def expand_patterns(patterns: Sequence[str]) -> list[str]:
  """The sorted files matching each glob; a pattern that matches nothing is an error naming it."""
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
      raise FileNotFoundError(f"data file pattern {pattern!r} matches no file")
    files.extend(matches)
  return files


def jsonl_units(files: Sequence[str], unit_bytes: int = DEFAULT_UNIT_BYTES) -> list[str]:
  """Units of `files`: byte ranges of at most `unit_bytes` for plain files, whole compressed files."""
  units = []
  for path in files:
    size = os.path.getsize(path)
    if path.endswith(COMPRESSED) or size <= unit_bytes:
      units.append(path)
    else:
      units.extend(f"{path}@{start}-{min(start + unit_bytes, size)}" for start in range(0, size, unit_bytes))
  return units


def read_jsonl_unit(unit: str, stats: collections.Counter) -> Iterator[str]:
  """The `text` of each good record of `unit`; skipped records are counted in `stats` by reason."""
  path, start, end = _parse_unit(unit)
  with _open(path) as f:
    position = start
    if start:
      f.seek(start - 1)
      position += len(f.readline()) - 1  # finish the line that began in the previous range
    try:
      for line in f:
        if end is not None and position >= end:
          break
        position += len(line)
        text = _parse_record(line, stats)
        if text is not None:
          stats[DOCUMENTS] += 1
          yield text
    except (EOFError, gzip.BadGzipFile, zstandard.ZstdError):  # a truncated download: keep what was read
      stats["corrupt_file"] += 1


def read_texts(texts: Iterable[str], stats: collections.Counter) -> Iterator[str]:
  """The same accounting for documents that are already strings (embedded corpus, TFDS)."""
  for text in texts:
    if checked := _check_text(text, stats):
      stats[DOCUMENTS] += 1
      yield checked


def summary(stats: collections.Counter) -> str:
  """One line: documents kept and each skip reason with its count."""
  skipped = {k: v for k, v in sorted(stats.items()) if k != DOCUMENTS}
  return f"{stats[DOCUMENTS]:,} documents, skipped " + (", ".join(f"{v:,} {k}" for k, v in skipped.items()) or "none")


def unit_path(unit: str) -> str:
  """The file a unit reads (the unit itself for whole files)."""
  return _parse_unit(unit)[0]


def _open(path: str) -> io.BufferedIOBase:
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    return io.BufferedReader(zstandard.open(path, "rb"))
  return open(path, "rb")


def _parse_unit(unit: str) -> tuple[str, int, int | None]:
  path, _, span = unit.rpartition("@")
  if not path or "-" not in span:
    return unit, 0, None
  start, end = span.split("-")
  return path, int(start), int(end)


def _parse_record(line: bytes, stats: collections.Counter) -> str | None:
  if not line.strip():
    return None  # blank lines separate nothing: not a record
  try:
    record = json.loads(line)
  except UnicodeDecodeError:
    stats["non_utf8"] += 1
    return None
  except json.JSONDecodeError:
    stats["malformed_json"] += 1
    return None
  text = record.get("text") if isinstance(record, dict) else None
  if not isinstance(text, str):
    stats["missing_text"] += 1
    return None
  return _check_text(text, stats)


def _check_text(text: str, stats: collections.Counter) -> str | None:
  if not text.strip():
    stats["empty_text"] += 1
    return None
  try:
    text.encode("utf-8")  # lone surrogates from "\ud800" escapes cannot be tokenized
  except UnicodeEncodeError:
    stats["non_utf8"] += 1
    return None
  return text
