"""Our Flax model folder or a training workdir -> PyTorch checkpoint folder (config.json + model.safetensors).

  python convert/flax_to_torch.py out/mpt-1b-flax out/mpt-1b-torch --layout mosaic_gpt
  python convert/flax_to_torch.py out/tiny-flax out/tiny-hf --layout mpt  # MptForCausalLM.from_pretrained
  python convert/flax_to_torch.py runs/tiny out/tiny-trained  # a train.py workdir: its newest intact checkpoint

The mpt layout refuses QK-LN models: transformers' MptForCausalLM would silently drop q_ln/k_ln.
"""

import pathlib
import sys
from typing import Annotated, Literal

import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mpt_jax.atomic import refuse_existing  # noqa: E402
from mpt_jax.checkpoint import load_params  # noqa: E402
from mpt_jax.convert import cli, write_pytorch  # noqa: E402


def main(
  src: Annotated[pathlib.Path, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")],
  dst: Annotated[pathlib.Path, tyro.conf.Positional, tyro.conf.arg(metavar="DST")],
  layout: Literal["mosaic_gpt", "mpt"] = "mosaic_gpt",
  dtype: Literal["float32", "bfloat16", "float16"] | None = None,
  write_bin: bool = False,
) -> None:
  """Converts SRC (Flax) to DST (PyTorch).

  Args:
    src: folder written by save_model or convert/torch_to_flax.py, or a train.py workdir
      (the parameters of its newest intact checkpoint).
    dst: output folder; must not exist.
    layout: PyTorch key names: mosaic_gpt (the released checkpoint) or mpt (llm-foundry, transformers).
    dtype: tensor dtype; default keeps the parameters'.
    write_bin: also write pytorch_model.bin (needs every tensor in memory at once).
  """
  refuse_existing(dst)  # before reading the parameters
  config, params = load_params(src)
  write_pytorch(config, params, dst, layout, dtype, write_bin=write_bin, progress=True)
  print(f"wrote {dst}")


if __name__ == "__main__":
  cli(main)
