"""PyTorch MPT checkpoint -> our Flax checkpoint folder (mpt_jax.checkpoint.load_model reads it).

  python convert/torch_to_flax.py path/to/mpt-1b-redpajama-200b out/mpt-1b-flax [--dtype bfloat16] [--no-scan-layers]

SRC is a Hugging Face folder (config.json + model.safetensors / pytorch_model.bin / shards)
or one weights file with config.json beside it; DST must not exist.
"""

import pathlib
import sys
from typing import Annotated, Literal

import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mpt_jax.atomic import refuse_existing  # noqa: E402
from mpt_jax.convert import cli, read_pytorch  # noqa: E402
from mpt_jax.model_folder import save_params  # noqa: E402


def main(
  src: Annotated[pathlib.Path, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")],
  dst: Annotated[pathlib.Path, tyro.conf.Positional, tyro.conf.arg(metavar="DST")],
  dtype: Literal["float32", "bfloat16", "float16"] | None = None,
  scan_layers: bool = True,
) -> None:
  """Converts SRC (PyTorch) to DST (Flax).

  Args:
    src: PyTorch checkpoint folder or weights file.
    dst: output folder (config.json + orbax params/).
    dtype: parameter dtype; default keeps the checkpoint's.
    scan_layers: store the blocks stacked (as MPTConfig.scan_layers); load_model converts either way.
  """
  refuse_existing(dst)  # before reading gigabytes of weights
  config, params = read_pytorch(src, dtype, scan_layers=scan_layers, progress=True)
  save_params(params, config, dst)
  print(f"wrote {dst}")


if __name__ == "__main__":
  cli(main)
