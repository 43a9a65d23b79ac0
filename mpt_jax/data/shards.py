"""Prepared data on disk: raw int32 token rows per source plus a JSON manifest.

Layout of one prepared dataset (a directory, renamed into place only when complete):

  manifest.json           seq_len, tokenizer, per source: rate, rows, documents, skipped
                          records, shards (file, rows, sha256); `fingerprint` hashes it all
  inputs.json             the glob patterns read and each file they matched (path, size,
                          modification time): `changed_inputs` tells stale data from current
  <task>/shard-00000.bin  int32 [rows, seq_len], C order, no header

Rows are read with `os.preadv` straight into the batch buffer: no TensorFlow, no memory maps
(which would hold one file descriptor per shard for thousands of shards).
"""

import glob
import hashlib
import json
import os
import pathlib
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from mpt_jax.config import DataConfig
from mpt_jax.data.tokenizer import Tokenizer, write_atomically

MANIFEST = "manifest.json"
INPUTS = "inputs.json"
FORMAT_VERSION = 1


def dataset_dir(config: DataConfig, seq_len: int, tokenizer: Tokenizer) -> pathlib.Path:
  """Where `config`'s data packed to `seq_len` lives: keyed by everything that changes the rows.

  Except the input files' contents, which inputs.json records: a directory prepared from other
  files than the patterns match now is stale (`changed_inputs`), and prepared again.
  """
  sources = [config.mixture, config.data_dir, config.source_patterns, config.tfds_data_dir]
  key = json.dumps([FORMAT_VERSION, *sources, tokenizer.sha256, seq_len])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return pathlib.Path(config.prepared_dir).expanduser() / f"{config.mixture}-L{seq_len}-{digest}"


def input_files(patterns: Sequence[str]) -> list[list]:
  """[path, size, modification time in ns] of each file the glob patterns match, sorted by path."""
  paths = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern), recursive=True)})
  return [[p, st.st_size, st.st_mtime_ns] for p, st in ((p, os.stat(p)) for p in paths)]


def write_inputs(directory: pathlib.Path, patterns: Sequence[str], files: list[list]) -> None:
  """Records the input `files` (from `input_files(patterns)`, taken before reading them) in inputs.json."""
  write_atomically(directory / INPUTS, json.dumps(dict(patterns=list(patterns), files=files), indent=1).encode())


def changed_inputs(directory: pathlib.Path) -> str | None:
  """How the files matching the recorded patterns differ from those prepared; None if they do not.

  None too when none of the patterns matches anything: the raw data is not on this machine
  (prepared elsewhere and copied), so there is nothing to compare.
  """
  path = directory / INPUTS
  if not path.exists():
    return f"{path} is missing (prepared by an older mpt-jax), so its input files are unknown"
  record = json.loads(path.read_text())
  now = input_files(record["patterns"])
  if record["patterns"] and not now:
    return None
  before, after = {p: (size, mtime) for p, size, mtime in record["files"]}, {p: (size, mtime) for p, size, mtime in now}
  changes = {
      "added": sorted(after.keys() - before.keys()),
      "removed": sorted(before.keys() - after.keys()),
      "modified": sorted(p for p in before.keys() & after.keys() if before[p] != after[p]),
  }
  listed = [f"{len(files)} {what} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" for what, files in changes.items() if files]
  return ", ".join(listed) or None


def write_rows(path: pathlib.Path, rows: Iterable[np.ndarray]) -> tuple[int, str]:
  """Streams int32 rows to `path` (temp name, then rename); returns (row count, sha256)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique: a duplicated unit may write it on another host
  digest, count = hashlib.sha256(), 0
  with open(tmp, "wb") as f:
    for row in rows:
      data = np.ascontiguousarray(row, np.int32).tobytes()
      digest.update(data)
      f.write(data)
      count += 1
  os.replace(tmp, path)
  return count, digest.hexdigest()


def write_manifest(directory: pathlib.Path, manifest: dict) -> dict:
  """Adds the fingerprint (sha256 of the rest, shard hashes included) and writes manifest.json."""
  manifest = dict(manifest, fingerprint=hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest())
  write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
  return manifest


class PreparedDataset:
  """Random access to the packed rows of each source of a prepared dataset."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    path = self.directory / MANIFEST
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: run `python -m mpt_jax.data.prepare` for this DataConfig")
    self.manifest = json.loads(path.read_text())
    if self.manifest.get("format") != FORMAT_VERSION:
      raise ValueError(f"{path} has format {self.manifest.get('format')!r}; expected {FORMAT_VERSION}")
    self.seq_len: int = self.manifest["seq_len"]
    self.fingerprint: str = self.manifest["fingerprint"]
    self.names = sorted(self.manifest["sources"])
    self.rates = np.array([self.manifest["sources"][n]["rate"] for n in self.names])
    self.rows = np.array([self.manifest["sources"][n]["rows"] for n in self.names], np.int64)
    self._shards = []  # per source: (files, first row of each shard)
    for name in self.names:
      shards = self.manifest["sources"][name]["shards"]
      starts = np.cumsum([0] + [s["rows"] for s in shards])
      self._shards.append(([str(self.directory / s["file"]) for s in shards], starts))
    empty = [n for n, r in zip(self.names, self.rows) if r == 0]
    if empty:
      raise ValueError(f"{path}: sources {empty} have no full row of {self.seq_len} tokens")

  def read(self, source: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Rows `row[i]` of sources `source[i]`: int32 [len(row), seq_len]."""
    out = np.empty((len(row), self.seq_len), np.int32)
    row_bytes = self.seq_len * 4
    for s in np.unique(source):
      files, starts = self._shards[s]
      picked = np.flatnonzero(source == s)
      shard = np.searchsorted(starts, row[picked], side="right") - 1
      for k in np.unique(shard):
        fd = os.open(files[k], os.O_RDONLY)
        try:
          for i in picked[shard == k]:
            offset = (int(row[i]) - int(starts[k])) * row_bytes
            if os.preadv(fd, [out[i]], offset) != row_bytes:
              raise IOError(f"{files[k]} is shorter than its manifest says (row {row[i]})")
        finally:
          os.close(fd)
    return out
