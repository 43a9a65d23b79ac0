"""Configuration dataclasses: MPTConfig (the model) and the training run's sections.

MPTConfig mirrors the keys of the released MPT-1b-RedPajama-200b config.json (docs/model.md,
"Configuration"): the fields up to ``emb_init_uniform_lim`` have that file's meaning and
default; the last group, ``RUNTIME_FIELDS``, says how to run the model here (dtypes, attention
implementation, scan, remat) and has no counterpart in the PyTorch config. Reading and
writing config.json (both Hugging Face schemas) is mpt_jax.hf_config's job.

One idea, past 300 lines: the validated configuration values, one dataclass per section.
"""

import dataclasses
import math
from typing import Any, Literal

import numpy as np

# The two MPT config.json schemas (mpt_jax.hf_config) and PyTorch key layouts (mpt_jax.convert);
# each implies an ALiBi slope rule for head counts that are not a power of two.
Layout = Literal["mosaic_gpt", "mpt"]

INIT_FNS = ("kaiming_normal_", "normal_")
NONLINEARITIES = ("relu", "leaky_relu", "linear")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLS = ("auto", "xla", "pallas", "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu", "cudnn")
NORM_IMPLS = ("auto", "xla", "pallas")
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class MPTConfig:
  """An MPT decoder. Defaults are mosaicml/mpt-1b-redpajama-200b (1,311,442,944 parameters)."""

  d_model: int = 2048  # residual width D
  n_heads: int = 16  # attention heads N; head_dim H = d_model / n_heads
  n_layers: int = 24  # blocks L
  mlp_ratio: int = 4  # MLP hidden F = mlp_ratio * d_model ("expansion_ratio" in the mpt schema)
  max_seq_len: int = 2048  # longest input accepted
  vocab_size: int = 50432  # embedding rows; the GPT-NeoX tokenizer uses 50277 of them
  alibi: bool = True  # ALiBi position bias; the only position scheme implemented
  alibi_bias_max: float = 8.0  # slopes are 2^(-alibi_bias_max * h / n_heads)
  alibi_slope_rule: Layout = "mosaic_gpt"  # differ only for n_heads not a power of two
  attn_qk_ln: bool = True  # LayerNorm on q and k over the full d_model, before the head split
  attn_clip_qkv: float | None = None  # clamp the fused qkv projection to [-c, c]
  softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
  no_bias: bool = True  # no biases anywhere, LayerNorms included; the only variant implemented
  low_precision_layernorm: bool = True  # LayerNorm outputs in the compute dtype (else float32)
  layer_norm_eps: float = 1e-5
  logit_scale: float | Literal["inv_sqrt_d_model"] | None = None  # multiplies the logits
  embedding_fraction: float = 1.0  # gradient fraction through the embedding; forward unchanged
  param_init_fn: Literal["kaiming_normal_", "normal_"] = "kaiming_normal_"
  init_nonlinearity: Literal["relu", "leaky_relu", "linear"] = "relu"  # kaiming gain
  init_gain: float = 0.0  # kaiming's negative slope `a` (only leaky_relu uses it)
  fan_mode: Literal["fan_in", "fan_out"] = "fan_in"
  init_div_is_residual: bool | float = True  # True: residual projections / sqrt(2 * n_layers)
  init_std: float = 0.02  # std of the normal_ init
  emb_init_std: float | None = None  # embedding std; None: the weight init
  emb_init_uniform_lim: float | None = None  # embedding ~ U(-lim, lim) when set

  # How to run it (not part of the PyTorch config): RUNTIME_FIELDS below.
  dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # stored parameters
  attn_impl: Literal["auto", "xla", "pallas", "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu", "cudnn"] = (
    "auto"  # see mpt_jax.attention
  )
  norm_impl: Literal["auto", "xla", "pallas"] = "auto"  # LayerNorm (mpt_jax.ops): Pallas kernels on GPUs by default
  scan_layers: bool = True  # stack the blocks and lax.scan over them (compile time flat in depth)
  scan_unroll: int = 1  # blocks per scan iteration; n_layers: straight-line code (faster on GPU, compiles longer)
  remat: Literal["none", "full", "save_dots"] = "none"  # activation checkpointing per block

  def __post_init__(self):
    for name in ("d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size", "scan_unroll"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MPTConfig.{name} must be a positive integer, got {value!r}")
    if self.d_model % self.n_heads:
      raise ValueError(f"MPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
    if not self.alibi:
      raise ValueError("MPTConfig.alibi must be True: ALiBi is the only position scheme implemented")
    if not self.no_bias:
      raise ValueError("MPTConfig.no_bias must be True: the bias-free MPT is the only variant implemented")
    _require_positive(self, "alibi_bias_max", "layer_norm_eps", "init_std")
    _require_positive(self, "attn_clip_qkv", "softmax_scale", "emb_init_std", "emb_init_uniform_lim", optional=True)
    if isinstance(self.logit_scale, str):
      if self.logit_scale != "inv_sqrt_d_model":
        raise ValueError(f"MPTConfig.logit_scale must be a number or 'inv_sqrt_d_model', got {self.logit_scale!r}")
    else:
      _require_positive(self, "logit_scale", optional=True)
    if not 0.0 < self.embedding_fraction <= 1.0:
      raise ValueError(f"MPTConfig.embedding_fraction must be in (0, 1], got {self.embedding_fraction}")
    if not isinstance(self.init_div_is_residual, bool) and not self.init_div_is_residual > 0:
      raise ValueError(
        f"MPTConfig.init_div_is_residual must be a bool or a positive number, got {self.init_div_is_residual!r}"
      )
    _require_choice(self, "alibi_slope_rule", ("mosaic_gpt", "mpt"))
    _require_choice(self, "param_init_fn", INIT_FNS)
    _require_choice(self, "init_nonlinearity", NONLINEARITIES)
    _require_choice(self, "fan_mode", ("fan_in", "fan_out"))
    _require_choice(self, "dtype", DTYPES)
    _require_choice(self, "param_dtype", DTYPES)
    _require_choice(self, "attn_impl", ATTN_IMPLS)
    _require_choice(self, "norm_impl", NORM_IMPLS)
    _require_choice(self, "remat", REMAT_POLICIES)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def mlp_hidden(self) -> int:
    return self.mlp_ratio * self.d_model

  @property
  def logit_multiplier(self) -> float | None:
    if self.logit_scale == "inv_sqrt_d_model":
      return 1.0 / math.sqrt(self.d_model)
    return self.logit_scale

  @property
  def residual_init_divisor(self) -> float:
    """What residual-branch output projections' init std is divided by (docs/model.md, "Initialization")."""
    if self.init_div_is_residual is True:
      return math.sqrt(2 * self.n_layers)
    if self.init_div_is_residual is False:
      return 1.0
    return float(self.init_div_is_residual)


# MPTConfig's run-time fields: how the model runs here, not what function it computes. They are
# not part of the PyTorch config.json schema (model folders store them beside it), and a model
# folder or checkpoint whose architecture fields (all the others) differ holds another model.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attn_impl", "norm_impl", "scan_layers", "scan_unroll", "remat")
# Of those, the ones that decide how stored parameters are laid out (dtype, stacked or per layer):
# a training run cannot change them on resume (mpt_jax.resume).
STORED_LAYOUT_FIELDS = ("param_dtype", "scan_layers")


def _require_positive(config, *names, optional=False):
  for name in names:
    value = getattr(config, name)
    if value is None and optional:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"MPTConfig.{name} must be a positive number{' or None' if optional else ''}, got {value!r}")


def _require_choice(config, name, choices):
  value = getattr(config, name)
  if value not in choices:
    raise ValueError(f"MPTConfig.{name} must be one of {choices}, got {value!r}")


def dtype_name(dtype: Any) -> str:
  """One of DTYPES for a dtype given as a string or as a NumPy / JAX dtype (np.float32, jnp.bfloat16)."""
  try:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES} or the NumPy/JAX dtype, got {dtype!r}")
  return name


# ------------------------------------------------------------------------ training run
# Each dataclass below belongs to one module (named in its docstring); presets in configs/
# build a TrainConfig and set only what differs from these defaults. Each validates itself on
# construction, so a bad value fails before anything runs or is written, naming the field.


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(config, name: str, valid, expected: str) -> None:
  value = getattr(config, name)
  try:
    ok = bool(valid(value))
  except TypeError:  # e.g. len() of a number: the wrong type altogether
    ok = False
  if not ok:
    raise ValueError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (mpt_jax.sharding). -1 in one axis means "all remaining devices"."""

  data: int = 1  # pure data parallelism (replicated parameters)
  fsdp: int = -1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
  tensor: int = 1  # heads, MLP hidden and vocabulary split across devices
  # Several TPU slices (multislice): how many slices the data axis spans. Only data parallelism
  # crosses slices (DCN is slow; its one all-reduce per step hides behind compute); fsdp and
  # tensor, and data / dcn_data, stay inside a slice on the fast ICI links.
  dcn_data: int = 1
  # Multi-process runs (one process per host): jax.distributed.initialize before anything else.
  multi_process: bool = False  # join a cluster that JAX detects itself (Slurm, Open MPI, Cloud TPU, JAX_* env)
  coordinator_address: str | None = None  # "host:port" of process 0; setting it implies multi_process
  num_processes: int | None = None  # None: detected from the cluster
  process_id: int | None = None  # None: detected from the cluster

  def __post_init__(self):
    for name in ("data", "fsdp", "tensor"):
      _check(self, name, lambda v: _is_int(v) and (v >= 1 or v == -1), "a positive integer or -1")
    if [self.data, self.fsdp, self.tensor].count(-1) > 1:
      raise ValueError(f"MeshConfig: at most one of data, fsdp, tensor may be -1, got {self}")
    _check(self, "dcn_data", lambda v: _is_int(v) and v >= 1, "a positive integer (the number of slices)")
    if self.data != -1 and self.data % self.dcn_data:
      raise ValueError(f"MeshConfig: dcn_data={self.dcn_data} slices must divide data={self.data}, got {self}")
    _check(self, "num_processes", lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or None")
    _check(
      self,
      "process_id",
      lambda v: v is None or (_is_int(v) and v >= 0 and (self.num_processes is None or v < self.num_processes)),
      f"None or an integer in [0, num_processes={self.num_processes})",
    )
    _check(self, "coordinator_address", lambda v: v is None or v.rpartition(":")[2].isdigit(), '"host:port" or None')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and LR schedule (mpt_jax.optim); defaults are the public MPT-1B recipe (docs/training.md)."""

  name: Literal["decoupled_adamw", "decoupled_lionw"] = "decoupled_adamw"
  lr: float = 2.0e-4  # peak learning rate
  betas: tuple[float, float] = (0.9, 0.95)
  eps: float = 1e-8
  weight_decay: float = 0.0  # Composer's decoupled decay: p *= 1 - (lr / peak_lr) * weight_decay
  warmup_steps: int = 100  # linear warmup from 0
  alpha_f: float = 0.1  # final LR = alpha_f * lr, reached at the last step (cosine)
  grad_clip_norm: float = 1.0  # global-norm clipping threshold; <= 0 disables

  def __post_init__(self):
    _check(
      self, "name", lambda v: v in ("decoupled_adamw", "decoupled_lionw"), "'decoupled_adamw' or 'decoupled_lionw'"
    )
    _check(self, "lr", lambda v: _is_number(v) and v > 0, "positive (the decoupled decay divides by it)")
    _check(
      self, "betas", lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"
    )
    _check(self, "eps", lambda v: _is_number(v) and v > 0, "a positive number")
    _check(self, "weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _check(self, "warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(self, "alpha_f", lambda v: _is_number(v) and 0 <= v <= 1, "a number with 0 <= alpha_f <= 1")
    _check(self, "grad_clip_norm", _is_number, "a number (<= 0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data (mpt_jax.data): a seqio Task or Mixture, prepared into packed token shards."""

  mixture: str = (
    "redpajama_llama"  # seqio Task/Mixture (mpt_jax.data.tasks): redpajama_llama, redpajama_<subset>, shakespeare
  )
  data_dir: str = ""  # RedPajama-1T root; subset files are found under it (tasks.REDPAJAMA_LAYOUT)
  source_patterns: tuple[str, ...] = ()  # "subset=glob" overrides, e.g. "c4=/data/c4/*.jsonl" or "c4=tfds:c4/en:3.1.0"
  tfds_data_dir: str = ""  # tensorflow-datasets data_dir of "tfds:" sources ("": TFDS's default)
  tokenizer_path: str = ""  # tokenizer.json (GPT-NeoX-20B for real runs); "" trains a BPE on the embedded corpus
  bpe_vocab_size: int = 1024  # size of that BPE (the model's vocab_size must be at least this)
  prepared_dir: str = "~/.cache/mpt_jax/data"  # pre-tokenized packed shards (python -m mpt_jax.data.prepare)
  seed: int = 17  # shuffling / mixture sampling seed
  segment_ids: bool = False  # also emit segment_ids (document number within the row, from 1) for document masking

  def __post_init__(self):
    _check(self, "mixture", lambda v: isinstance(v, str) and v, "a Task or Mixture name")
    # A byte-level BPE starts from 256 byte tokens plus EOS.
    _check(self, "bpe_vocab_size", lambda v: _is_int(v) and v > 256, "an integer > 256")
    _check(self, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpointing and fault tolerance (mpt_jax.checkpoint, mpt_jax.trainer)."""

  every_steps: int = 1000  # save period in steps; 0: only at the end and on SIGTERM / Ctrl-C
  keep_last: int = 3  # newest checkpoints kept
  keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
  async_save: bool = True  # write in the background while training continues
  init_from: str = ""  # a model folder (convert/torch_to_flax.py, model_folder.save_model) to fine-tune from
  max_consecutive_nonfinite: int = 10  # stop with an error after this many non-finite steps in a row; 0: never
  allow_config_changes: bool = (
    False  # resume although steps, LR schedule or optimizer settings changed (mpt_jax/resume.py); logged
  )

  def __post_init__(self):
    for name in ("every_steps", "keep_every", "max_consecutive_nonfinite"):
      _check(self, name, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(self, "keep_last", lambda v: _is_int(v) and v >= 1, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during training (mpt_jax.eval.training): held-out loss and, optionally, ICL tasks."""

  every_steps: int = 0  # steps between evaluations (also at the last step); 0: none, and no rows held out
  heldout_rows: int = 64  # rows per source kept out of training while every_steps > 0 (each source's last rows)
  icl_tasks: tuple[str, ...] = ()  # ICL tasks scored at each evaluation: standard names or llm-foundry JSONL files
  icl_data_dir: str = ""  # folder of the standard tasks' files (piqa.jsonl, ...)
  icl_max_examples: int = 500  # examples scored per task (the file's first); 0: all
  icl_batch_size: int = 16  # sequences per compiled scoring step

  def __post_init__(self):
    for name in ("every_steps", "heldout_rows", "icl_max_examples"):
      if getattr(self, name) < 0:
        raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.every_steps and self.heldout_rows < 1:
      raise ValueError(f"EvalConfig.heldout_rows must be >= 1 when every_steps > 0, got {self.heldout_rows}")
    if self.icl_batch_size < 1:
      raise ValueError(f"EvalConfig.icl_batch_size must be >= 1, got {self.icl_batch_size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run (mpt_jax.trainer, train.py). mpt_jax.resume says which fields may change on resume."""

  model: MPTConfig = MPTConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  workdir: str = "workdir"  # logs, metrics.jsonl, checkpoints
  seed: int = 17  # parameter init
  seq_len: int = 2048  # tokens per row
  global_batch_size: int = 512  # rows per optimizer step, over all hosts
  micro_batch_size: int | None = None  # rows per device per forward pass; None: no gradient accumulation
  steps: int = 24_800  # optimizer steps
  z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) added to the loss (PaLM's z-loss); 0: off
  log_every: int = 10  # steps between logged metrics (TensorBoard, metrics.jsonl, progress bar)
  peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: from the device kind
  sample_tokens: int = 64  # tokens sampled from the trained model at the end of the run; 0: none

  def __post_init__(self):
    _check(self, "workdir", lambda v: isinstance(v, str) and v, "a directory path")
    _check(self, "seed", _is_int, "an integer")
    # A row of T tokens makes T - 1 next-token predictions: one token predicts nothing.
    _check(
      self,
      "seq_len",
      lambda v: _is_int(v) and 2 <= v <= self.model.max_seq_len,
      f"an integer in [2, model.max_seq_len={self.model.max_seq_len}]",
    )
    _check(self, "global_batch_size", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(
      self,
      "micro_batch_size",
      lambda v: v is None or (_is_int(v) and 1 <= v <= self.global_batch_size),
      f"None or an integer in [1, global_batch_size={self.global_batch_size}]",
    )
    _check(self, "steps", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(self, "z_loss", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _check(self, "log_every", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(self, "peak_flops", lambda v: v is None or (_is_number(v) and v > 0), "a positive number or None")
    _check(self, "sample_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
