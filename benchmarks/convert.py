"""Full-size conversion benchmark: wall time and peak RSS of the two convert/ CLIs (CPU).

  python benchmarks/convert.py [--workdir /tmp/mpt-convert-bench] [--n-layers 24]

Writes a random mpt-1b-redpajama-200b-shaped checkpoint (mosaic_gpt keys, fp32, 5.25 GB
pytorch_model.bin), runs torch_to_flax.py and flax_to_torch.py as subprocesses (each one's
own peak RSS from wait4), then checks the exported model.safetensors against the source
tensor by tensor, bit for bit. Targets (issue 3): < 60 s each way on 2 cores, peak RSS < 10.5 GB.
"""

import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import torch
import tyro
from safetensors import safe_open

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpt_jax.config import MPTConfig  # noqa: E402
from mpt_jax.convert import tensor_groups  # noqa: E402
from mpt_jax.hf_config import to_hf_dict  # noqa: E402


def write_random_checkpoint(folder: pathlib.Path, config: MPTConfig, seed: int) -> int:
  """config.json + pytorch_model.bin with N(0, 0.02) weights; returns the file size in bytes."""
  generator = torch.Generator().manual_seed(seed)
  tensors = [t for _, group in tensor_groups(config, "mosaic_gpt") for t in group]
  state = {t.torch_key: torch.empty(t.torch_shape).normal_(0.0, 0.02, generator=generator) for t in tensors}
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(to_hf_dict(config, "mosaic_gpt"), indent=2))
  torch.save(state, folder / "pytorch_model.bin")
  return (folder / "pytorch_model.bin").stat().st_size


def run_measured(args: list) -> dict:
  """Runs a command; its wall time and peak RSS (this child only, via wait4)."""
  start = time.perf_counter()
  process = subprocess.Popen([str(a) for a in args])
  _, status, usage = os.wait4(process.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{args} failed with exit status {os.waitstatus_to_exitcode(status)}")
  return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}


def count_mismatches(source: pathlib.Path, exported: pathlib.Path) -> int:
  """Tensors of the exported safetensors that differ (bits, dtype, shape) from the source .bin, or are missing."""
  state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
  with safe_open(exported, framework="pt") as f:
    if set(f.keys()) != set(state):
      return len(set(f.keys()) ^ set(state))
    return sum(not torch.equal(f.get_tensor(key).view(torch.int32), state[key].view(torch.int32)) for key in state)


@dataclasses.dataclass
class Args:
  workdir: pathlib.Path = pathlib.Path("/tmp/mpt-convert-bench")  # needs ~16 GB free for the full size
  n_layers: int = 24  # fewer for a quick smoke run of this script
  seed: int = 0
  keep: bool = False  # keep the three checkpoints afterwards


def main(args: Args) -> None:
  config = dataclasses.replace(MPTConfig(), n_layers=args.n_layers)
  shutil.rmtree(args.workdir, ignore_errors=True)
  src, flax_dir, torch_dir = args.workdir / "torch", args.workdir / "flax", args.workdir / "torch_out"
  size = write_random_checkpoint(src, config, args.seed)
  result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "host": f"{platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before",
    "checkpoint_gb": round(size / 1e9, 2),
    "torch_to_flax": run_measured([sys.executable, ROOT / "convert" / "torch_to_flax.py", src, flax_dir]),
    "flax_to_torch": run_measured(
      [sys.executable, ROOT / "convert" / "flax_to_torch.py", flax_dir, torch_dir, "--layout", "mosaic_gpt"]
    ),
    "load_average_after": round(os.getloadavg()[0], 1),
    "mismatched_tensors": count_mismatches(src / "pytorch_model.bin", torch_dir / "model.safetensors"),
  }
  print(json.dumps(result, indent=2))
  if not args.keep:
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
  main(tyro.cli(Args))
