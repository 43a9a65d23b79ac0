"""MPTConfig: the published preset, validation, and both Hugging Face config.json schemas; the
validation of the TrainConfig family and how each field may change on resume."""

import dataclasses
import re
import time

import jax
import pytest
from flax import nnx

import configs
from mpt_jax import MPTConfig, MPTForCausalLM, resume
from mpt_jax.config import CheckpointConfig, DataConfig, MeshConfig, OptimConfig, TrainConfig, dtype_name
from mpt_jax.hf_config import from_hf_dict, to_hf_dict

# config.json of mosaicml/mpt-1b-redpajama-200b (docs/model.md).
MPT_1B_CONFIG_JSON = {
  "architectures": ["MosaicGPT"],
  "model_type": "mosaic_gpt",
  "auto_map": {
    "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
    "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
  },
  "d_model": 2048,
  "n_heads": 16,
  "n_layers": 24,
  "mlp_ratio": 4,
  "max_seq_len": 2048,
  "vocab_size": 50432,
  "alibi": True,
  "alibi_bias_max": 8,
  "attn_qk_ln": True,
  "attn_clip_qkv": None,
  "softmax_scale": None,
  "attn_impl": "torch",
  "attn_pdrop": 0,
  "resid_pdrop": 0,
  "emb_pdrop": 0,
  "attn_uses_sequence_id": False,
  "prefix_lm": False,
  "no_bias": True,
  "low_precision_layernorm": True,
  "logit_scale": None,
  "embedding_fraction": 1.0,
  "param_init_fn": "kaiming_normal_",
  "init_nonlinearity": "relu",
  "init_gain": 0,
  "fan_mode": "fan_in",
  "init_div_is_residual": True,
  "init_std": 0.02,
  "emb_init_std": None,
  "emb_init_uniform_lim": None,
  "init_device": "cpu",
  "use_cache": False,
  "verbose": 0,
  "tokenizer_name": "EleutherAI/gpt-neox-20b",
  "torch_dtype": "float32",
  "transformers_version": "4.27.4",
}


def test_published_preset_has_exactly_the_released_parameter_count():
  start = time.perf_counter()
  model_config = configs.get_config("mpt_1b_redpajama_200b").model
  abstract = nnx.eval_shape(lambda: MPTForCausalLM(model_config, rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n_params == 1_311_442_944
  assert time.perf_counter() - start < 30


def test_published_preset_is_the_released_config_json():
  """The architecture exactly; of the run-time fields the preset sets only the layer unroll (speed)."""
  model = configs.get_config("mpt_1b_redpajama_200b").model
  assert model == from_hf_dict(MPT_1B_CONFIG_JSON, scan_unroll=model.n_layers)


def test_published_run_is_200b_tokens_at_2200_x_2048():
  run = configs.get_config("mpt_1b_redpajama_200b")
  assert (run.global_batch_size, run.seq_len, run.steps) == (2200, 2048, 44_389)
  assert abs(run.global_batch_size * run.seq_len * run.steps - 200e9) < run.global_batch_size * run.seq_len


@pytest.mark.parametrize("layout", ["mosaic_gpt", "mpt"])
@pytest.mark.parametrize("n_heads", [4, 6])
def test_hf_dict_round_trip(layout, n_heads):
  config = MPTConfig(
    d_model=48,
    n_heads=n_heads,
    n_layers=3,
    mlp_ratio=2,
    max_seq_len=64,
    vocab_size=100,
    alibi_slope_rule=layout,
    attn_clip_qkv=6.0,
    logit_scale="inv_sqrt_d_model",
    low_precision_layernorm=False,
    init_div_is_residual=2.5,
    emb_init_std=0.1,
  )
  d = to_hf_dict(config, layout)
  assert d["model_type"] == layout
  assert from_hf_dict(d) == config


def test_mpt_schema_nests_attention_and_init():
  d = to_hf_dict(MPTConfig(), "mpt")
  assert d["expansion_ratio"] == 4 and "mlp_ratio" not in d
  assert d["attn_config"]["qk_ln"] is True and d["attn_config"]["alibi"] is True
  assert d["init_config"]["name"] == "kaiming_normal_"
  assert d["norm_type"] == "low_precision_layernorm"


def test_export_refuses_a_slope_rule_the_schema_cannot_express():
  config = MPTConfig(d_model=48, n_heads=6, n_layers=1, vocab_size=64, alibi_slope_rule="mosaic_gpt")
  with pytest.raises(ValueError, match="alibi_slope_rule"):
    to_hf_dict(config, "mpt")


def test_run_time_fields_come_from_overrides():
  config = from_hf_dict(MPT_1B_CONFIG_JSON, dtype="float32", attn_impl="xla", scan_layers=False)
  assert (config.dtype, config.attn_impl, config.scan_layers) == ("float32", "xla", False)


BAD_FIELDS = [
  ("d_model", 0),
  ("n_heads", -1),
  ("n_layers", 2.5),
  ("vocab_size", True),
  ("d_model", 100),
  ("alibi", False),
  ("no_bias", False),
  ("alibi_bias_max", 0),
  ("layer_norm_eps", -1e-5),
  ("attn_clip_qkv", 0.0),
  ("softmax_scale", -1.0),
  ("logit_scale", "sqrt"),
  ("logit_scale", 0),
  ("embedding_fraction", 0.0),
  ("embedding_fraction", 1.5),
  ("init_div_is_residual", -1.0),
  ("param_init_fn", "xavier_uniform_"),
  ("init_nonlinearity", "tanh"),
  ("fan_mode", "fan_avg"),
  ("dtype", "float64"),
  ("param_dtype", "int8"),
  ("attn_impl", "flash"),
  ("remat", "some"),
  ("alibi_slope_rule", "bloom"),
  ("emb_init_std", 0),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_bad_values_raise_naming_the_field(field, value):
  # d_model=100 is a bad value only because 100 % n_heads (16) != 0: the message names both.
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(MPTConfig(), **{field: value})


@pytest.mark.parametrize(
  "key,value",
  [
    ("attn_pdrop", 0.1),
    ("resid_pdrop", 0.1),
    ("prefix_lm", True),
    ("model_type", "gpt2"),
    ("tie_word_embeddings", False),
  ],
)
def test_unsupported_config_json_values_raise_naming_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    from_hf_dict({**MPT_1B_CONFIG_JSON, key: value})


def test_config_json_missing_a_size_raises():
  d = dict(MPT_1B_CONFIG_JSON)
  del d["n_layers"]
  with pytest.raises(ValueError, match="n_layers"):
    from_hf_dict(d)


def test_dtypes_are_accepted_as_strings_and_numpy_or_jax_dtypes():
  import jax.numpy as jnp
  import numpy as np

  assert [dtype_name(d) for d in ("bfloat16", jnp.bfloat16, np.float32, jnp.dtype("float16"))] == [
    "bfloat16",
    "bfloat16",
    "float32",
    "float16",
  ]
  for bad in ("float64", np.int32, object()):
    with pytest.raises(ValueError, match="dtype must be one of"):
      dtype_name(bad)


BAD_TRAIN_FIELDS = [
  (MeshConfig, "data", 0),
  (MeshConfig, "fsdp", -2),
  (MeshConfig, "tensor", 1.5),
  (MeshConfig, "num_processes", 0),
  (MeshConfig, "process_id", -1),
  (MeshConfig, "coordinator_address", "localhost"),
  (OptimConfig, "name", "adam"),
  (OptimConfig, "lr", 0.0),
  (OptimConfig, "betas", (0.9, 1.0)),
  (OptimConfig, "betas", (0.9,)),
  (OptimConfig, "eps", -1e-8),
  (OptimConfig, "weight_decay", -0.1),
  (OptimConfig, "warmup_steps", -1),
  (OptimConfig, "alpha_f", 1.5),
  (DataConfig, "mixture", ""),
  (DataConfig, "bpe_vocab_size", 256),
  (DataConfig, "seed", -1),
  (CheckpointConfig, "every_steps", -1),
  (CheckpointConfig, "keep_last", 0),
  (CheckpointConfig, "max_consecutive_nonfinite", 1.5),
  (TrainConfig, "steps", -5),
  (TrainConfig, "steps", 0),
  (TrainConfig, "log_every", 0),
  (TrainConfig, "global_batch_size", 0),
  (TrainConfig, "seq_len", 0),
  (TrainConfig, "seq_len", 1),
  (TrainConfig, "seq_len", 4096),
  (TrainConfig, "micro_batch_size", 0),
  (TrainConfig, "micro_batch_size", 1024),
  (TrainConfig, "z_loss", -1e-4),
  (TrainConfig, "peak_flops", 0.0),
  (TrainConfig, "sample_tokens", -1),
  (TrainConfig, "workdir", ""),
  (TrainConfig, "seed", "17"),
]


@pytest.mark.parametrize(
  "section,field,value", BAD_TRAIN_FIELDS, ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD_TRAIN_FIELDS]
)
def test_bad_training_values_raise_naming_the_field(section, field, value):
  # seq_len=4096 exceeds model.max_seq_len (2048); micro_batch_size=1024 exceeds global_batch_size (512).
  with pytest.raises(ValueError, match=rf"^{section.__name__}\.{field} must be .*, got {re.escape(repr(value))}$"):
    dataclasses.replace(section(), **{field: value})


def test_every_preset_and_two_minus_one_mesh_axes():
  assert all(isinstance(configs.get_config(name), TrainConfig) for name in configs.PRESETS)
  with pytest.raises(ValueError, match="at most one of data, fsdp, tensor may be -1"):
    MeshConfig(data=-1, fsdp=-1)


def test_resume_tiers_and_changes_by_dotted_name():
  config = TrainConfig()
  changed = dataclasses.replace(
    config, steps=10, mesh=MeshConfig(fsdp=2), optim=dataclasses.replace(config.optim, betas=(0.9, 0.99))
  )
  assert resume.changes(resume.record(config), changed) == {
    "mesh.fsdp": (-1, 2),
    "optim.betas": ([0.9, 0.95], [0.9, 0.99]),
    "steps": (24_800, 10),
  }
  assert [resume.tier(f) for f in ("mesh.fsdp", "optim.betas", "steps", "seq_len", "model.d_model", "optim.name")] == [
    "free",
    "allowed",
    "allowed",
    "refused",
    "refused",
    "refused",
  ]
