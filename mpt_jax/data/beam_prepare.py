"""`prepare --runner ...`: the same per-unit work as the process pool, run as an Apache Beam pipeline.

seqio runs its Tasks on Beam for the same reason (`seqio.beam_utils`, `seqio.scripts.cache_tasks_main`):
one pipeline runs on a laptop (DirectRunner) or a cluster (Dataflow, Flink, Spark). The pipeline is
Create(units) -> Reshuffle -> ParDo(pack one unit); each unit is `prepare.pack_unit`, the function the
pool runs, so a unit's shard holds the same bytes whatever ran it. The launcher then writes the
manifest from the units' results exactly as the pool path does.

Idempotent by construction: a unit's shard and its result record are each written under a unique
temp name and renamed, the result last, so a unit that died, was retried or ran twice leaves either
nothing or the complete, identical file; a unit whose result exists is not redone. All workers and
the launcher must see the output directory (one host, NFS, Filestore, a FUSE-mounted bucket).

Needs the optional extra: `pip install -r requirements-beam.txt` (README, "Preparing RedPajama on a
cluster"); the pool path never imports this module.
"""

import json
import logging
import pathlib
import shutil
import threading
from collections.abc import Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from mpt_jax.atomic import write_atomically
from mpt_jax.data import prepare

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "PrismRunner")
RESULTS = ".unit-results"  # under the temp directory, removed before it becomes the prepared dataset
ATTEMPTS = 3  # per unit, inside the worker: the DirectRunner does not retry a failed bundle

# seqio Tasks live in a process-wide registry and each source counts its skipped records in one
# Counter, so units run one at a time per process; parallelism comes from processes (Beam's SDK
# workers, direct_running_mode=multi_processing), as in the pool.
_LOCK = threading.Lock()


def run(
  jobs: Sequence[tuple[str, int, int]],
  register_args: tuple,
  seq_len: int,
  tmp: pathlib.Path,
  *,
  runner: str,
  workers: int,
  pipeline_args: Sequence[str] = (),
  pack: Callable[[tuple], dict] | None = None,
  attempts: int = ATTEMPTS,
) -> list[dict]:
  """Packs each job (task, unit index, unit count) into `tmp` on `runner`; returns the units' results.

  Args:
    jobs: the units, as `prepare` lists them.
    register_args: `(config, unit_bytes)` for `prepare.register_tasks` in each worker.
    runner: a Beam runner name (RUNNERS).
    workers: DirectRunner processes (`direct_num_workers`) unless `pipeline_args` sets them.
    pipeline_args: Beam pipeline options passed through (`--project`, `--flink_master`, ...).
    pack: the per-unit function (`prepare.pack_unit`); tests pass one that fails once.
    attempts: tries per unit before the bundle fails (the runner may then retry it again).

  Raises:
    ValueError: an unknown runner.
    RuntimeError: the pipeline finished without a result for some unit.
  """
  if runner not in RUNNERS:
    raise ValueError(f"runner={runner!r} is not a Beam runner; expected 'pool' or one of {RUNNERS}")
  options = PipelineOptions([f"--runner={runner}", *pipeline_args])
  direct = options.view_as(DirectOptions)
  if runner == "DirectRunner" and "--direct_num_workers" not in " ".join(pipeline_args):
    direct.direct_num_workers = workers
    direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
  tmp.mkdir(parents=True, exist_ok=True)
  unit = _PackUnit(register_args, seq_len, str(tmp), pack or prepare.pack_unit, attempts)
  with beam.Pipeline(options=options) as pipeline:
    _ = pipeline | "units" >> beam.Create(list(jobs)) | "spread" >> beam.Reshuffle() | "pack" >> beam.ParDo(unit)
  results = _collect(jobs, tmp)
  for stray in tmp.rglob(".*.tmp"):  # temp files of units whose worker died mid-write
    stray.unlink()
  return results


def _result_path(tmp: str | pathlib.Path, task: str, index: int) -> pathlib.Path:
  return pathlib.Path(tmp) / RESULTS / f"{task}.{index:05d}.json"


def _collect(jobs, tmp: pathlib.Path) -> list[dict]:
  missing = [f"{task}[{index}]" for task, index, _ in jobs if not _result_path(tmp, task, index).exists()]
  if missing:
    raise RuntimeError(f"the Beam pipeline finished without {len(missing)} unit(s): {', '.join(missing[:5])}")
  results = [json.loads(_result_path(tmp, task, index).read_text()) for task, index, _ in jobs]
  shutil.rmtree(tmp / RESULTS)
  return results


class _PackUnit(beam.DoFn):
  """Packs one unit into its shard and records its result; retries a unit that raises."""

  def __init__(self, register_args: tuple, seq_len: int, tmp: str, pack: Callable[[tuple], dict], attempts: int):
    self._register_args, self._seq_len, self._tmp, self._pack, self._attempts = (
      register_args,
      seq_len,
      tmp,
      pack,
      attempts,
    )

  def setup(self):
    with _LOCK:
      prepare.register_tasks(*self._register_args)

  def process(self, job):
    task, index, _ = job
    path = _result_path(self._tmp, task, index)
    if path.exists():  # done by an earlier attempt of this bundle or a duplicate: same bytes, keep them
      return
    for attempt in range(1, self._attempts + 1):
      try:
        with _LOCK:
          result = self._pack((tuple(job), self._seq_len, self._tmp))
        break
      except Exception:
        if attempt == self._attempts:
          raise
        logging.warning(
          "unit %s[%d] failed (attempt %d of %d); redoing it", task, index, attempt, self._attempts, exc_info=True
        )
    write_atomically(path, json.dumps(result))  # last: a result on disk means its shard is complete
