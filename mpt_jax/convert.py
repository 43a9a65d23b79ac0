"""PyTorch MPT checkpoints <-> our Flax parameters, bit-exact, one tensor group at a time.

Two PyTorch layouts (docs/model.md, "Checkpoint keys"): ``mosaic_gpt`` (the released
mpt-1b-redpajama-200b: ln_1, mlp.mlp_up, ln_f, ...) and ``mpt`` (llm-foundry and
transformers' MptForCausalLM: norm_1, ffn.up_proj, norm_f, tied lm_head). The only place
that knows PyTorch key names is ``tensor_groups``; everything else follows the nanoGPT
``from_pretrained`` habit: an explicit list of transposed tensors, a shape check per key,
and key sets compared in both directions before any data is read.

One idea, past 300 lines: moving tensors between the PyTorch and Flax layouts (the
key map, reading both file formats, writing safetensors / pytorch_model.bin).

Memory: a source file is opened (mmap / safe_open) per tensor group and closed after it, and
the exported safetensors file is written tensor by tensor, so the peak stays near one copy
of the parameters plus one layer.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx
from jax.typing import DTypeLike
from safetensors import safe_open
from tqdm import tqdm

from mpt_jax.atomic import atomic_directory
from mpt_jax.cli import run
from mpt_jax.config import Layout, MPTConfig, dtype_name
from mpt_jax.hf_config import from_hf_dict, hf_layout, to_hf_dict
from mpt_jax.model import MPTForCausalLM
from mpt_jax.model_folder import abstract_params, model_from_params

TIED_HEAD = "lm_head.weight"  # transformers' MptForCausalLM: the same tensor as transformer.wte.weight
# PyTorch Linear weights are [out, in]; our kernels are [in, ...] ([D, 3, N, H], [N, H, D], [D, F], [F, D]).
TRANSPOSED = ("qkv_proj", "out_proj", "up_proj", "down_proj")
_BLOCK_NAMES = {  # our name inside a block -> PyTorch module name, per layout
  "mosaic_gpt": {"ln_1": "ln_1", "ln_2": "ln_2", "up_proj": "mlp.mlp_up", "down_proj": "mlp.mlp_down"},
  "mpt": {"ln_1": "norm_1", "ln_2": "norm_2", "up_proj": "ffn.up_proj", "down_proj": "ffn.down_proj"},
}
_FINAL_NORM = {"mosaic_gpt": "transformer.ln_f.weight", "mpt": "transformer.norm_f.weight"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class ConversionError(ValueError):
  """Bad checkpoint input; the message names the key or file and what was expected."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One PyTorch tensor <-> one of our parameters (path in the per-layer layout)."""

  torch_key: str
  path: tuple  # e.g. ("blocks", 3, "attn", "qkv_proj")
  torch_shape: tuple[int, ...]

  @property
  def transposed(self) -> bool:
    return self.path[-1] in TRANSPOSED

  def copy_from_torch(self, t: torch.Tensor, ours: np.ndarray) -> None:
    """Writes PyTorch's tensor ``t`` into our contiguous array ``ours``."""
    self._matrix(ours).copy_(t.T if self.transposed else t)

  def copy_to_torch(self, ours: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Writes our array into ``out``, a contiguous tensor of PyTorch's shape (and any float dtype)."""
    matrix = self._matrix(ours)
    return out.copy_(matrix.T if self.transposed else matrix)

  def _matrix(self, ours: np.ndarray) -> torch.Tensor:
    """A view of ``ours`` as PyTorch's shape, or as its transpose [in, out] for transposed tensors.

    E.g. qkv_proj [D, 3, N, H] -> [D, 3D], whose .T is Wqkv [3D, D]: rows q|k|v, then h * H + d.
    Copies always write a contiguous destination from a (possibly transposed) source view:
    torch's copy_ is ~4x faster that way round than into a transposed destination.
    """
    return _as_torch(ours).reshape(self.torch_shape[::-1] if self.transposed else self.torch_shape)


def tensor_groups(config: MPTConfig, layout: Layout) -> list[tuple[str, list[TensorMap]]]:
  """Every tensor of ``config`` in ``layout``, grouped (embedding, each block, final norm)."""
  if layout not in _BLOCK_NAMES:
    raise ConversionError(f"unknown layout {layout!r}; expected one of {tuple(_BLOCK_NAMES)}")
  d, f, names = config.d_model, config.mlp_hidden, _BLOCK_NAMES[layout]

  def block(i):
    prefix = f"transformer.blocks.{i}"
    tensors = [
      TensorMap(f"{prefix}.{names['ln_1']}.weight", ("blocks", i, "ln_1", "scale"), (d,)),
      TensorMap(f"{prefix}.attn.Wqkv.weight", ("blocks", i, "attn", "qkv_proj"), (3 * d, d)),
    ]
    if config.attn_qk_ln:
      tensors += [
        TensorMap(f"{prefix}.attn.q_ln.weight", ("blocks", i, "attn", "q_ln", "scale"), (d,)),
        TensorMap(f"{prefix}.attn.k_ln.weight", ("blocks", i, "attn", "k_ln", "scale"), (d,)),
      ]
    return tensors + [
      TensorMap(f"{prefix}.attn.out_proj.weight", ("blocks", i, "attn", "out_proj"), (d, d)),
      TensorMap(f"{prefix}.{names['ln_2']}.weight", ("blocks", i, "ln_2", "scale"), (d,)),
      TensorMap(f"{prefix}.{names['up_proj']}.weight", ("blocks", i, "mlp", "up_proj"), (f, d)),
      TensorMap(f"{prefix}.{names['down_proj']}.weight", ("blocks", i, "mlp", "down_proj"), (d, f)),
    ]

  return [
    ("embedding", [TensorMap("transformer.wte.weight", ("wte",), (config.vocab_size, d))]),
    *[(f"block {i}", block(i)) for i in range(config.n_layers)],
    ("final norm", [TensorMap(_FINAL_NORM[layout], ("ln_f", "scale"), (d,))]),
  ]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _layer_slot(params: dict, path: tuple, scan_layers: bool) -> np.ndarray:
  """Where the tensor at a per-layer ``path`` lives in ``params`` (a view into the stack if scanned)."""
  if scan_layers and path[0] == "blocks":
    return _get(params["blocks"], path[2:])[path[1]]
  return _get(params, path)


# ------------------------------------------------------------------------------ PyTorch -> ours


def read_pytorch(
  path: str | os.PathLike, dtype: DTypeLike | None = None, *, scan_layers: bool = True, progress: bool = False
) -> tuple[MPTConfig, dict]:
  """The config and host (numpy) parameters of a PyTorch MPT checkpoint.

  Args:
    path: a Hugging Face model folder (config.json + model.safetensors, pytorch_model.bin,
      or shards with an *.index.json) or one weights file with config.json beside it.
    dtype: parameter dtype ("float32", "bfloat16", "float16", or jnp.float32, np.float16, ...);
      None keeps the checkpoint's.
    scan_layers: lay the blocks out stacked (True) or per layer, as MPTConfig.scan_layers.
    progress: show a progress bar per tensor group.

  Returns:
    (config with param_dtype and scan_layers set, pure parameter dict of numpy arrays).
  """
  dtype = None if dtype is None else dtype_name(dtype)
  files = _TorchFiles(pathlib.Path(path))
  try:
    hf = _read_json(files.config_file)
    layout = hf_layout(hf)
    config = from_hf_dict(hf, scan_layers=scan_layers)
  except ValueError as e:
    raise ConversionError(f"{files.config_file}: {e}") from e
  groups = tensor_groups(config, layout)
  _check_keys(groups, files.meta, config, layout, where=files.where)
  config = dataclasses.replace(config, param_dtype=dtype or _source_dtype(files.meta, files.where))
  params = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), abstract_params(config))
  for _, tensors in tqdm(groups, desc=f"reading {path}", unit="group", disable=not progress):
    keys = [t.torch_key for t in tensors]
    tied = [TIED_HEAD] if tensors[0].path == ("wte",) and TIED_HEAD in files.meta else []
    arrays = files.read(keys + tied)
    for t in tensors:
      t.copy_from_torch(arrays[t.torch_key], _layer_slot(params, t.path, scan_layers))
    if tied and not torch.equal(arrays[TIED_HEAD], arrays[keys[0]]):
      raise ConversionError(f"{files.where}: {TIED_HEAD} differs from {keys[0]}; untied output heads are not supported")
    del arrays
  return config, params


def load_pytorch(
  path: str | os.PathLike, dtype: DTypeLike | None = None, *, config_overrides: dict[str, Any] | None = None
) -> MPTForCausalLM:
  """An MPTForCausalLM holding a PyTorch MPT checkpoint's weights (see read_pytorch).

  Args:
    path: as read_pytorch.
    dtype: parameter dtype (a string or a NumPy / JAX dtype); None keeps the checkpoint's.
    config_overrides: run-time MPTConfig fields, e.g. {"dtype": "float32", "scan_layers": False}.
  """
  overrides = dict(config_overrides or {})
  if "param_dtype" in overrides:
    raise ValueError("load_pytorch sets the parameter dtype through dtype=, not config_overrides['param_dtype']")
  if "dtype" in overrides:
    overrides["dtype"] = dtype_name(overrides["dtype"])
  config, params = read_pytorch(path, dtype, scan_layers=overrides.get("scan_layers", True))
  return model_from_params(dataclasses.replace(config, **overrides), jax.tree.map(jnp.asarray, params))


def _check_keys(groups, meta: dict[str, tuple], config: MPTConfig, layout: Layout, where: str) -> None:
  """Key sets compared in both directions, then every shape; fails before any data is read."""
  expected = {t.torch_key: t for _, tensors in groups for t in tensors}
  found = set(meta) - ({TIED_HEAD} if layout == "mpt" else set())
  missing, unexpected = sorted(expected.keys() - found), sorted(found - expected.keys())
  if missing or unexpected:
    raise ConversionError(
      f"{where}: keys do not match config.json ({layout} layout, {config.n_layers=}, {config.attn_qk_ln=}): "
      f"missing {_head(missing)}, unexpected {_head(unexpected)}"
    )
  shapes = {key: t.torch_shape for key, t in expected.items()}
  if TIED_HEAD in meta:
    shapes[TIED_HEAD] = shapes["transformer.wte.weight"]
  for key, shape in shapes.items():
    if meta[key][0] != shape:
      raise ConversionError(f"{where}: {key} has shape {meta[key][0]}, expected {shape} from config.json")


def _head(keys: list[str], n: int = 6) -> str:
  return "[]" if not keys else f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _source_dtype(meta: dict[str, tuple], where: str) -> str:
  dtypes = {dtype for _, dtype in meta.values()}
  if len(dtypes) > 1:
    raise ConversionError(f"{where}: tensors have mixed dtypes {sorted(map(str, dtypes))}; pass dtype= to choose one")
  return dtypes.pop()


# ------------------------------------------------------------------------------ ours -> PyTorch


def save_pytorch(
  model: MPTForCausalLM,
  out_dir: str | os.PathLike,
  layout: Layout = "mosaic_gpt",
  dtype: DTypeLike | None = None,
  *,
  write_bin: bool = False,
) -> None:
  """Writes ``model`` as a PyTorch checkpoint folder (see write_pytorch)."""
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  write_pytorch(model.config, params, out_dir, layout, dtype, write_bin=write_bin)


def write_pytorch(
  config: MPTConfig,
  params: dict,
  out_dir: str | os.PathLike,
  layout: Layout = "mosaic_gpt",
  dtype: DTypeLike | None = None,
  *,
  write_bin: bool = False,
  progress: bool = False,
) -> None:
  """Writes config.json + model.safetensors (+ pytorch_model.bin) into the new folder ``out_dir``.

  Args:
    config, params: the model's config and pure parameter dict (numpy, per config.scan_layers).
    layout: "mosaic_gpt" (the released checkpoint's keys) or "mpt" (transformers' MptForCausalLM).
    dtype: dtype of the written tensors (a string or a NumPy / JAX dtype); None keeps the parameters'.
    write_bin: also write pytorch_model.bin (holds every tensor in memory at once).
    progress: show a progress bar per tensor group.
  """
  dtype = None if dtype is None else dtype_name(dtype)
  if layout == "mpt" and config.attn_qk_ln:
    raise ConversionError(
      "cannot export a QK-LN model (attn_qk_ln=True) to the 'mpt' layout: transformers' MptForCausalLM "
      "has no q_ln/k_ln and would silently drop them; use layout='mosaic_gpt'"
    )
  try:
    hf = to_hf_dict(config, layout)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  groups = tensor_groups(config, layout)
  tensors = [t for _, group in groups for t in group]
  entries = [
    (t.torch_key, t.torch_shape, dtype or str(_layer_slot(params, t.path, config.scan_layers).dtype)) for t in tensors
  ]
  hf["torch_dtype"] = entries[0][2]

  def torch_tensors() -> Iterator[torch.Tensor]:
    out = iter(entries)
    for _, group in tqdm(groups, desc=f"writing {out_dir}", unit="group", disable=not progress):
      for t in group:
        _, shape, out_dtype = next(out)
        yield t.copy_to_torch(
          _layer_slot(params, t.path, config.scan_layers), torch.empty(shape, dtype=_TORCH_DTYPES[out_dtype])
        )

  with atomic_directory(out_dir) as tmp:
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_safetensors(tmp / "model.safetensors", entries, torch_tensors())
    if write_bin:
      torch.save({key: t for (key, _, _), t in zip(entries, torch_tensors())}, tmp / "pytorch_model.bin")


def _write_safetensors(
  file: pathlib.Path, entries: list[tuple[str, tuple, str]], tensors: Iterator[torch.Tensor]
) -> None:
  """The safetensors format written one tensor at a time (safetensors' own writers need every tensor at once).

  Format: 8-byte little-endian header size, JSON header {key: {dtype, shape, data_offsets}},
  padded with spaces to 8 bytes, then the tensors' bytes back to back.
  """
  header, offset = {}, 0
  for key, shape, dtype in entries:
    size = math.prod(shape) * _TORCH_DTYPES[dtype].itemsize
    header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(file, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for (key, shape, dtype), tensor in zip(entries, tensors, strict=True):
      assert tensor.shape == shape and tensor.dtype == _TORCH_DTYPES[dtype] and tensor.is_contiguous(), key
      f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


# ------------------------------------------------------------------------------ reading files


def _as_torch(a: np.ndarray) -> torch.Tensor:
  """A torch view of a numpy array, no copy (bfloat16 through its int16 bits: numpy has no bfloat16)."""
  with warnings.catch_warnings():  # jax's host views are read-only; we only read those
    warnings.simplefilter("ignore", UserWarning)
    if a.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_FROM_TORCH = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
_FROM_SAFETENSORS = {code: name for name, code in _SAFETENSORS_DTYPES.items()}


class _Entry(NamedTuple):
  shape: tuple[int, ...]
  dtype: str | None  # None: not a supported float type
  load: Callable[[], torch.Tensor]  # call while the file is open


@contextlib.contextmanager
def _open_weights(file: pathlib.Path) -> Iterator[dict[str, _Entry]]:
  """One weights file as key -> _Entry; shapes and dtypes come from headers, data only on load()."""
  with contextlib.ExitStack() as stack:
    try:
      entries = _safetensors_entries(file, stack) if file.name.endswith(".safetensors") else _pickle_entries(file)
    except ConversionError:
      raise
    except Exception as e:  # torch, zipfile and safetensors each raise their own types for damaged files
      raise ConversionError(
        f"{file}: not a readable checkpoint file, truncated or corrupted? ({type(e).__name__}: {e})"
      ) from e
    for key, entry in entries.items():
      if entry.dtype is None:
        raise ConversionError(f"{file}: {key} has an unsupported dtype; expected float32, bfloat16 or float16")
    yield entries


def _safetensors_entries(file: pathlib.Path, stack: contextlib.ExitStack) -> dict[str, _Entry]:
  handle = stack.enter_context(safe_open(file, framework="pt"))
  entries = {}
  for key in handle.keys():
    sliced = handle.get_slice(key)
    dtype = _FROM_SAFETENSORS.get(sliced.get_dtype())
    entries[key] = _Entry(tuple(sliced.get_shape()), dtype, lambda key=key: handle.get_tensor(key))
  return entries


def _pickle_entries(file: pathlib.Path) -> dict[str, _Entry]:
  """torch.load with weights_only (no arbitrary objects) and mmap (data read on access)."""
  state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
  if not isinstance(state, dict) or not all(
    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
  ):
    raise ConversionError(f"{file}: expected a state dict (str -> torch.Tensor), found {_describe(state)}")
  return {k: _Entry(tuple(v.shape), _FROM_TORCH.get(v.dtype), lambda v=v: v) for k, v in state.items()}


def _describe(obj) -> str:
  if isinstance(obj, dict):
    kinds = sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in obj.items()})
    return f"a dict of {', '.join(kinds[:4])}"
  return f"a {type(obj).__name__}"


class _TorchFiles:
  """Where each tensor of a checkpoint lives; a file is opened only while a group is read."""

  def __init__(self, path: pathlib.Path):
    folder = path if path.is_dir() else path.parent
    self.config_file = folder / "config.json"
    if path.is_dir():
      names = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")
      path = next((folder / n for n in names if (folder / n).is_file()), None)
      if path is None:
        raise ConversionError(f"{folder}: found none of {names}")
    if not path.is_file():
      raise ConversionError(f"{path} not found")
    if not self.config_file.is_file():
      raise ConversionError(f"{self.config_file} not found: config.json must sit beside the weights")
    self.where = str(path)
    if path.name.endswith(".index.json"):
      weight_map = _read_json(path).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ConversionError(f"{path}: expected a 'weight_map' object of tensor key -> shard file")
      shards = sorted({folder / name for name in weight_map.values()})
    else:
      shards = [path]
    self.file_of, self.meta = {}, {}  # key -> file, key -> (shape, dtype)
    for shard in shards:
      with _open_weights(shard) as entries:
        self.meta.update({key: (e.shape, e.dtype) for key, e in entries.items()})
        self.file_of.update(dict.fromkeys(entries, shard))

  def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys``, opening only the files that hold them (for .bin: mmap views)."""
    arrays = {}
    for file in {self.file_of[key] for key in keys}:
      with _open_weights(file) as entries:
        arrays.update({key: entries[key].load() for key in keys if key in entries})
    return arrays


def _read_json(file: pathlib.Path) -> dict:
  try:
    return json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{file}: not readable JSON ({e})") from e


def cli(main: Callable) -> None:
  """Runs a tyro CLI; bad input exits 2 with a one-line ``error: ...``, without a traceback (mpt_jax.cli)."""
  import tyro

  sys.exit(run(lambda: tyro.cli(main)))
