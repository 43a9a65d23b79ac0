"""`python -m mpt_jax.data.prepare`: tokenize and pack raw text into shards, once, on all cores.

Runs the seqio Tasks of `DataConfig.mixture` (tasks.py), one job per source unit, in worker
processes, and writes `shards.dataset_dir(...)`: what `make_train_iterator` reads, so training
never tokenizes. The directory appears only when complete (built under a temp name, then
renamed), so an interrupted prepare is simply rerun. It records the input files it read
(names, sizes, modification times): after files are added, removed or changed, a rerun
prepares the data again. A source that yields no full row (empty or unreadable files) is an
error listing what each of its files gave, and nothing is written. docs/data.md describes
the pipeline.

  python -m mpt_jax.data.prepare [--data.FIELD VALUE ...] [--seq-len N] [--workers N]
      [--runner pool|DirectRunner|DataflowRunner|FlinkRunner|SparkRunner [BEAM PIPELINE OPTIONS ...]]

To prepare what a preset of configs/ will train on, use prepare.py beside train.py, which
reads the preset and then the same flags:

  python prepare.py mpt_1b_redpajama_200b --data.data-dir /data/RedPajama-Data-1T \\
      --data.tokenizer-path /data/gpt-neox-20b/tokenizer.json --data.prepared-dir /data/prepared --workers 64
"""

import collections
import dataclasses
import logging
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import seqio
import tqdm
import tyro

from mpt_jax import cli
from mpt_jax.atomic import atomic_directory
from mpt_jax.config import DataConfig
from mpt_jax.data import shards, sources, tasks
from mpt_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class PrepareArgs:
  """What to prepare; `data` and `seq_len` must match the training run's."""

  data: DataConfig = DataConfig()
  seq_len: int = 2048  # tokens per row (TrainConfig.seq_len)
  workers: int = os.cpu_count() or 1  # processes; 1 runs in this process
  unit_mb: int = sources.DEFAULT_UNIT_BYTES >> 20  # plain JSONL files are split into units of this size
  runner: str = "pool"  # "pool" (processes on this host) or a Beam runner (beam_prepare.py, requirements-beam.txt)

  def __post_init__(self):
    for name, least in (("seq_len", 2), ("workers", 1), ("unit_mb", 1)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"PrepareArgs.{name} must be an integer >= {least}, got {value!r}")


def prepare(
  config: DataConfig,
  seq_len: int,
  *,
  workers: int = 1,
  unit_bytes: int = sources.DEFAULT_UNIT_BYTES,
  runner: str = "pool",
  pipeline_args: Sequence[str] = (),
) -> pathlib.Path:
  """Prepares `config`'s data packed to `seq_len` (unless done from the same input files); returns its directory.

  `runner` "pool" runs the units in `workers` processes; a Beam runner name runs the same units as
  a Beam pipeline with `pipeline_args` (beam_prepare.py): the prepared bytes are the same.

  Raises:
    ValueError: a source yields no full row of `seq_len` tokens; names each of its files
      with what it gave (documents, skipped records by reason).
  """
  tokenizer = load_tokenizer(config)
  out = shards.dataset_dir(config, seq_len, tokenizer)
  if (out / shards.MANIFEST).exists():
    changed = shards.changed_inputs(out)
    if changed is None:
      return out
    logging.warning("%s is stale, its input files changed: %s; preparing it again", out, changed)
  provider = register_tasks(config, unit_bytes)
  patterns = tasks.input_patterns(config)
  inputs = shards.input_files(patterns)  # before reading: a file changed meanwhile makes the next run redo it
  rates = tasks.tasks_of(provider)
  jobs = [(t.name, i, len(t.source.units)) for t in seqio.get_subtasks(provider) for i in range(len(t.source.units))]
  with atomic_directory(out, replace=True) as tmp:  # nothing half-written stays behind
    results = []
    with tqdm.tqdm(total=len(jobs), desc=f"prepare {config.mixture}", unit="unit") as bar:
      for result in _run(jobs, (config, unit_bytes), seq_len, tmp, workers, runner, pipeline_args):
        results.append(result)
        bar.set_postfix(rows=sum(r["rows"] for r in results), refresh=False)
        bar.update()
    _require_rows(results, rates, seq_len)
    manifest = shards.write_manifest(tmp, _manifest(config, seq_len, tokenizer, rates, results))
    shards.write_inputs(tmp, patterns, inputs)
    for name, source in manifest["sources"].items():
      stats = sources.summary(collections.Counter(source["stats"]))
      logging.info("prepared %s: %s rows; %s", name, f"{source['rows']:,}", stats)
  return out


def _require_rows(results: list[dict], rates: dict[str, float], seq_len: int) -> None:
  """Refuses a source without a full row: training would learn of it at its first step."""
  for task in rates:
    mine = [r for r in results if r["task"] == task]
    if sum(r["rows"] for r in mine):
      continue
    per_file = collections.defaultdict(collections.Counter)
    for r in mine:
      per_file[sources.unit_path(r["unit"])].update(r["stats"])
    files = "; ".join(f"{path}: {sources.summary(stats)}" for path, stats in sorted(per_file.items()))
    raise ValueError(f"{task} yields no full row of {seq_len} tokens, so nothing was prepared; per file: {files}")


def _run(jobs, register_args, seq_len, tmp, workers, runner="pool", pipeline_args=()):
  if runner != "pool":
    try:
      from mpt_jax.data import beam_prepare  # the optional extra, imported only when asked for
    except ModuleNotFoundError as e:
      message = f"--runner {runner} needs Apache Beam: pip install -r requirements-beam.txt ({e})"
      raise ModuleNotFoundError(message) from e
    yield from beam_prepare.run(
      jobs, register_args, seq_len, tmp, runner=runner, workers=workers, pipeline_args=pipeline_args
    )
    return
  args = [(job, seq_len, str(tmp)) for job in jobs]
  if workers <= 1 or len(jobs) == 1:
    yield from map(pack_unit, args)
    return
  context = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
  with context.Pool(min(workers, len(jobs)), initializer=register_tasks, initargs=register_args) as pool:
    yield from pool.imap_unordered(pack_unit, args)


def register_tasks(config: DataConfig, unit_bytes: int) -> seqio.Task | seqio.Mixture:
  """Registers `config`'s Tasks in this process (each pool or Beam worker does) and returns its Task or Mixture."""
  return tasks.register(config, load_tokenizer(config), unit_bytes=unit_bytes)


def pack_unit(arg) -> dict:
  """Runs one source unit through its Task and writes the packed rows to one shard file (pool and Beam workers).

  `arg` is ((task name, unit index, unit count), seq_len, output directory); returns the unit's
  result (task, unit, file, rows, sha256, stats), from which `prepare` writes the manifest.
  """
  (task_name, index, num_units), seq_len, tmp = arg
  task = seqio.get_mixture_or_task(task_name)
  task.source.stats.clear()
  dataset = task.get_dataset(
    {"targets": seq_len}, split="train", shuffle=False, shard_info=seqio.ShardInfo(index, num_units), num_epochs=1
  )
  file = f"{task_name}/shard-{index:05d}.bin"
  rows, sha256 = shards.write_rows(pathlib.Path(tmp) / file, (ex["targets"] for ex in dataset.as_numpy_iterator()))
  return dict(
    task=task_name, unit=task.source.units[index], file=file, rows=rows, sha256=sha256, stats=dict(task.source.stats)
  )


def _manifest(config, seq_len, tokenizer, rates, results) -> dict:
  source_entries = {}
  for name, rate in rates.items():
    mine = sorted((r for r in results if r["task"] == name), key=lambda r: r["file"])
    stats = sum((collections.Counter(r["stats"]) for r in mine), collections.Counter())
    source_entries[name] = dict(
      rate=rate,
      rows=sum(r["rows"] for r in mine),
      stats=dict(stats),
      shards=[dict(file=r["file"], rows=r["rows"], sha256=r["sha256"]) for r in mine],
    )
  return dict(
    format=shards.FORMAT_VERSION,
    mixture=config.mixture,
    seq_len=seq_len,
    tokenizer=dict(sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
    sources=source_entries,
  )


def parse_args(argv: list[str], default: PrepareArgs = PrepareArgs()) -> tuple[PrepareArgs, list[str]]:
  """PrepareArgs from the flags in ``argv``, applied over ``default`` (prepare.py passes a preset's),
  and the Beam options: with `--runner` a Beam runner, flags PrepareArgs does not know are
  Beam pipeline options."""
  if argv and not argv[0].startswith("-"):
    raise ValueError(
      f"unexpected argument {argv[0]!r}: a preset name is read by prepare.py beside train.py "
      "(python prepare.py PRESET [flags]); this module takes flags only"
    )
  with cli.config_errors_raise():  # a bad value raises ValueError
    args, beam_args = tyro.cli(PrepareArgs, default=default, args=argv, return_unknown_args=True)
  if beam_args and args.runner == "pool":
    raise ValueError(f"unknown arguments {beam_args} (Beam pipeline options need --runner, e.g. DirectRunner)")
  return args, beam_args


def main(argv: list[str], parse: Callable[[list[str]], tuple[PrepareArgs, list[str]]] = parse_args) -> int:
  """Prepares what ``argv`` asks for (read by ``parse``) and prints its directory; returns the exit status (mpt_jax.cli)."""
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  def command():
    args, beam_args = parse(list(argv))
    print(
      prepare(
        args.data,
        args.seq_len,
        workers=args.workers,
        unit_bytes=args.unit_mb << 20,
        runner=args.runner,
        pipeline_args=beam_args,
      )
    )

  return cli.run(command)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
