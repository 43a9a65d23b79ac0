"""Data pipeline throughput: `prepare` (tokens/s per core) and the training iterator (tokens/s per host).

  python benchmarks/data.py --tokenizer-path ../shared/tokenizers/gpt-neox-20b/tokenizer.json
  python benchmarks/data.py --runners pool DirectRunner   # the Beam DirectRunner too (requirements-beam.txt)

The input is web-page-sized documents (paragraph groups of the embedded Shakespeare corpus,
~4 KB each, like RedPajama's CommonCrawl) written as JSONL, tokenized with GPT-NeoX-20B. The
iterator target is 4.8M tokens/s per host: 10x what 8 H100s at 60k tokens/s each consume.
"""

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import tyro

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mpt_jax.config import DataConfig, MPTConfig, TrainConfig  # noqa: E402
from mpt_jax.data import corpus, load_tokenizer, make_train_iterator  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
  tokenizer_path: str = "../shared/tokenizers/gpt-neox-20b/tokenizer.json"
  corpus_copies: int = 4  # JSONL size: this many copies of the ~5 MB corpus
  workers: tuple[int, ...] = (1, 2)  # prepare runs, one per worker count
  runners: tuple[str, ...] = ("pool",)  # prepare runs, one per runner: "pool" and/or a Beam runner ("DirectRunner")
  unit_mb: int = 4  # small units so the one file spreads over the workers like a 100 GB RedPajama file
  seq_len: int = 2048
  global_batch_size: int = 2200  # the published run's batch; one host reads all of it
  steps: int = 50  # iterator steps timed (after 5 warm-up steps)


def write_jsonl(path: pathlib.Path, copies: int, doc_chars: int = 4000) -> int:
  """Shakespeare cut into ~doc_chars documents at paragraph breaks; returns the document count."""
  documents = []
  for play in corpus.shakespeare():
    chunk = ""
    for paragraph in play.split("\n\n"):
      chunk += paragraph + "\n\n"
      if len(chunk) >= doc_chars:
        documents.append(chunk)
        chunk = ""
  lines = [json.dumps({"text": d, "meta": {"copy": c}}) + "\n" for c in range(copies) for d in documents]
  path.write_text("".join(lines))
  return len(lines)


def bench_prepare(args: Args, root: pathlib.Path, data: DataConfig, workers: int, runner: str = "pool") -> dict:
  from mpt_jax.data import prepare as prepare_lib  # TensorFlow: bench_iterator runs without it

  config = dataclasses.replace(data, prepared_dir=str(root / f"prepared-{runner}-{workers}"))
  start = time.perf_counter()
  directory = prepare_lib.prepare(config, args.seq_len, workers=workers, unit_bytes=args.unit_mb << 20, runner=runner)
  seconds = time.perf_counter() - start
  manifest = json.loads((directory / "manifest.json").read_text())
  tokens = sum(s["rows"] for s in manifest["sources"].values()) * args.seq_len
  return dict(
    workers=workers,
    seconds=seconds,
    tokens=tokens,
    tokens_per_s_per_core=tokens / seconds / workers,
    manifest=manifest["fingerprint"],
  )


def bench_raw_tokenizer(args: Args, jsonl: pathlib.Path) -> float:
  """Ceiling: `tokenizers` alone, one thread, on the same documents (no TensorFlow, no packing)."""
  tokenizer = load_tokenizer(DataConfig(tokenizer_path=args.tokenizer_path))
  texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
  start = time.perf_counter()
  tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)
  return tokens / (time.perf_counter() - start)


def bench_iterator(args: Args, data: DataConfig, **outputs) -> dict:
  config = TrainConfig(
    model=MPTConfig(),
    data=dataclasses.replace(data, **outputs),
    seq_len=args.seq_len,
    global_batch_size=args.global_batch_size,
  )
  iterator = make_train_iterator(config, process_index=0, process_count=1)
  for _ in range(5):
    next(iterator)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    batch = next(iterator)
    times.append(time.perf_counter() - start)
  tokens = batch["input_ids"].size
  return dict(
    outputs=sorted(batch), median_step_s=statistics.median(times), tokens_per_s=tokens / statistics.median(times)
  )


def main(args: Args) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    jsonl = root / "web" / "part-0.jsonl"
    jsonl.parent.mkdir()
    documents = write_jsonl(jsonl, args.corpus_copies)
    print(
      f"{platform.node()}: {os.cpu_count()} cores; {documents:,} documents, {jsonl.stat().st_size / 1e6:.1f} MB JSONL"
    )
    print(f"raw tokenizers encode, 1 thread: {bench_raw_tokenizer(args, jsonl):,.0f} tokens/s")
    data = DataConfig(mixture="redpajama_c4", source_patterns=(f"c4={jsonl}",), tokenizer_path=args.tokenizer_path)
    for runner in args.runners:
      for workers in args.workers:
        result = bench_prepare(args, root, data, workers, runner)
        print(
          f"prepare --runner {runner}, {workers} worker(s): {result['tokens']:,} tokens in {result['seconds']:.1f} s "
          f"= {result['tokens_per_s_per_core']:,.0f} tokens/s per core (manifest {result['manifest'][:12]})"
        )
    data = dataclasses.replace(data, prepared_dir=str(root / f"prepared-{args.runners[0]}-{args.workers[0]}"))
    for outputs in ({}, dict(segment_ids=True)):
      result = bench_iterator(args, data, **outputs)
      print(
        f"iterator {result['outputs']}: batch {args.global_batch_size} x {args.seq_len}, "
        f"median {result['median_step_s'] * 1e3:.1f} ms/step = {result['tokens_per_s'] / 1e6:.1f}M tokens/s"
      )


if __name__ == "__main__":
  main(tyro.cli(Args))
