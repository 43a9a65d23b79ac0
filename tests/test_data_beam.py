"""`prepare --runner DirectRunner` (beam_prepare.py) against the process pool: the same bytes, retried units.

Needs the optional extra (pip install -r requirements-beam.txt); .ci/run installs it after the main
suite and runs this file again.
"""

import dataclasses
import functools
import pathlib

import pytest

pytest.importorskip("apache_beam", reason="the Beam runner is an optional extra: pip install -r requirements-beam.txt")

from test_data_redpajama import SEQ_LEN, config  # noqa: E402, F401  (the RedPajama-layout fixture)

from configs import tiny  # noqa: E402
from mpt_jax.data import prepare  # noqa: E402

PACK_UNIT = prepare.pack_unit  # the real one, while a test replaces it in the module


def files(directory: pathlib.Path) -> dict[str, bytes]:
  """Every file of a prepared dataset by relative path: equal dicts mean byte-identical datasets."""
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def prepared_both_ways(data, seq_len, root: pathlib.Path, beam_pack=None, **beam) -> tuple[dict, dict]:
  """Prepared by the pool (one process), then by the DirectRunner with `prepare.pack_unit` replaced by `beam_pack`."""
  pool = prepare.prepare(dataclasses.replace(data, prepared_dir=str(root / "pool")), seq_len, workers=1)
  with pytest.MonkeyPatch.context() as patch:  # the in-process DirectRunner calls the same module
    if beam_pack:
      patch.setattr(prepare, "pack_unit", beam_pack)
    direct = prepare.prepare(
      dataclasses.replace(data, prepared_dir=str(root / "beam")), seq_len, runner="DirectRunner", **beam
    )
  assert pool.name == direct.name
  return files(pool), files(direct)


def fails_once(marker_dir: pathlib.Path, arg) -> dict:
  """`prepare.pack_unit`, except its first attempt at each unit leaves a half-written shard and raises."""
  (task, index, _), _, tmp = arg
  marker = marker_dir / f"{task}.{index}"
  if not marker.exists():
    marker.touch()
    half = pathlib.Path(tmp) / task / f".shard-{index:05d}.bin.died.tmp"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"\x01\x02\x03")
    raise RuntimeError(f"worker died packing {task}[{index}]")
  return PACK_UNIT(arg)


def test_direct_runner_equals_pool_on_the_embedded_corpus(tmp_path):
  preset = tiny.get_config()
  pool, direct = prepared_both_ways(preset.data, preset.seq_len, tmp_path)
  assert sorted(pool) == ["inputs.json", "manifest.json", "shakespeare/shard-00000.bin"]
  assert direct == pool


def test_direct_runner_on_two_processes_equals_pool_on_redpajama_layout(config, tmp_path):  # noqa: F811 (the fixture)
  pool, direct = prepared_both_ways(config, SEQ_LEN, tmp_path, workers=2)
  assert len([f for f in pool if f.endswith(".bin")]) == 7  # .jsonl, .jsonl.gz, .jsonl.zst: one unit per subset
  assert direct == pool


def test_a_unit_that_raises_once_is_retried_and_the_bytes_do_not_change(config, tmp_path, caplog):  # noqa: F811 (the fixture)
  (tmp_path / "markers").mkdir()
  pool, direct = prepared_both_ways(config, SEQ_LEN, tmp_path, functools.partial(fails_once, tmp_path / "markers"))
  assert len(list((tmp_path / "markers").iterdir())) == 7  # every unit failed once
  assert "failed (attempt 1 of 3); redoing it" in caplog.text
  assert direct == pool  # no half-written file left, no shard changed


def test_pipeline_options_pass_through_and_a_bad_runner_is_named():
  args, beam_args = prepare.parse_args(["--runner", "FlinkRunner", "--flink_master", "host:8081", "--seq-len", "64"])
  assert (args.runner, args.seq_len, beam_args) == ("FlinkRunner", 64, ["--flink_master", "host:8081"])
  with pytest.raises(ValueError, match="need --runner"):
    prepare.parse_args(["--flink_master", "host:8081"])
  with pytest.raises(ValueError, match="'Flunk' is not a Beam runner"):
    prepare._run([("t", 0, 1)], None, SEQ_LEN, pathlib.Path("/nonexistent"), 1, "Flunk").__next__()
