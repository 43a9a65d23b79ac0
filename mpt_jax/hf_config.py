"""The Hugging Face config.json schemas of MPT, read into and written from MPTConfig.

Two schemas exist. ``mosaic_gpt`` is the one the released mpt-1b-redpajama-200b uses: flat
keys (``mlp_ratio``, ``attn_qk_ln``, ``low_precision_layernorm``, ...). ``mpt`` is the later
llm-foundry / transformers schema: ``expansion_ratio``, nested ``attn_config`` and
``init_config``, ``norm_type``. docs/model.md lists the fields and what each one means here.
The schema also implies the ALiBi slope rule for head counts that are not a power of two
(``MPTConfig.alibi_slope_rule``). The PyTorch tensor names live in mpt_jax.convert.
"""

from typing import Any

from mpt_jax.config import Layout, MPTConfig


def from_hf_dict(d: dict[str, Any], **overrides) -> MPTConfig:
  """Reads a Hugging Face config.json dict of either schema.

  Keys that would change the function in a way this implementation does not support
  (dropout, prefix-LM, learned positions, ...) raise ValueError; bookkeeping keys
  (architectures, auto_map, torch_dtype, ...) are ignored. ``overrides`` set the
  run-time fields (dtype, attn_impl, scan_layers, ...).
  """
  layout = hf_layout(d)
  if layout == "mosaic_gpt":
    attn, init = d, d
    fields = dict(
      mlp_ratio=d.get("mlp_ratio", 4),
      alibi=d.get("alibi", False),
      alibi_bias_max=d.get("alibi_bias_max", 8),
      attn_qk_ln=d.get("attn_qk_ln", False),
      attn_clip_qkv=d.get("attn_clip_qkv"),
      softmax_scale=d.get("softmax_scale"),
      low_precision_layernorm=d.get("low_precision_layernorm", True),
    )
    _reject(d, "prefix_lm", "attn_pdrop")
  else:
    attn, init = d.get("attn_config", {}), d.get("init_config", {})
    norm_type = d.get("norm_type", "low_precision_layernorm")
    if norm_type not in ("low_precision_layernorm", "layernorm"):
      raise ValueError(
        f"config.json norm_type={norm_type!r} is not supported; expected 'low_precision_layernorm' or 'layernorm'"
      )
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
      raise ValueError(
        f"config.json attn_config.attn_type={attn['attn_type']!r} is not supported; expected 'multihead_attention'"
      )
    if d.get("learned_pos_emb") and not attn.get("alibi", False):
      raise ValueError("config.json learned_pos_emb=true without alibi is not supported")
    fields = dict(
      mlp_ratio=d.get("expansion_ratio", 4),
      alibi=attn.get("alibi", False),
      alibi_bias_max=attn.get("alibi_bias_max", 8),
      attn_qk_ln=attn.get("qk_ln", False),
      attn_clip_qkv=attn.get("clip_qkv"),
      softmax_scale=attn.get("softmax_scale"),
      low_precision_layernorm=norm_type == "low_precision_layernorm",
    )
    _reject(attn, "prefix_lm", "attn_pdrop", "qk_gn")
    if "layer_norm_epsilon" in d:
      fields["layer_norm_eps"] = d["layer_norm_epsilon"]
  _reject(d, "resid_pdrop", "emb_pdrop")
  if d.get("tie_word_embeddings", True) is False:
    raise ValueError("config.json tie_word_embeddings=false is not supported: MPT ties the output head to wte")
  for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
    if key not in d:
      raise ValueError(f"config.json has no {key!r}; is it an MPT / MosaicGPT config?")
    fields[key] = d[key]
  fields.update(
    alibi_slope_rule=layout,
    no_bias=d.get("no_bias", False),
    logit_scale=d.get("logit_scale"),
    embedding_fraction=d.get("embedding_fraction", 1.0),
    param_init_fn=init.get("param_init_fn", init.get("name", "kaiming_normal_")),
    init_nonlinearity=init.get("init_nonlinearity", "relu"),
    init_gain=init.get("init_gain", 0.0),
    fan_mode=init.get("fan_mode", "fan_in"),
    init_div_is_residual=init.get("init_div_is_residual", True),
    # llm-foundry's default init_config has init_std: null (it matters only to the normal_ init).
    init_std=0.02 if init.get("init_std") is None else init["init_std"],
    emb_init_std=init.get("emb_init_std"),
    emb_init_uniform_lim=init.get("emb_init_uniform_lim"),
  )
  return MPTConfig(**fields, **overrides)


def to_hf_dict(config: MPTConfig, layout: Layout = "mosaic_gpt") -> dict[str, Any]:
  """``config`` as a config.json dict in the given schema; from_hf_dict reads it back to ``config``."""
  if config.alibi_slope_rule != layout and config.n_heads & (config.n_heads - 1):
    raise ValueError(
      f"alibi_slope_rule={config.alibi_slope_rule!r} with n_heads={config.n_heads} (not a power of two) "
      f"has no {layout!r} config.json: that schema implies the {layout!r} slope rule"
    )
  init = dict(
    init_nonlinearity=config.init_nonlinearity,
    init_gain=config.init_gain,
    fan_mode=config.fan_mode,
    init_div_is_residual=config.init_div_is_residual,
    init_std=config.init_std,
    emb_init_std=config.emb_init_std,
    emb_init_uniform_lim=config.emb_init_uniform_lim,
  )
  common = dict(
    d_model=config.d_model,
    n_heads=config.n_heads,
    n_layers=config.n_layers,
    max_seq_len=config.max_seq_len,
    vocab_size=config.vocab_size,
    no_bias=config.no_bias,
    logit_scale=config.logit_scale,
    embedding_fraction=config.embedding_fraction,
    resid_pdrop=0.0,
    emb_pdrop=0.0,
    torch_dtype=config.param_dtype,
  )
  if layout == "mosaic_gpt":
    return dict(
      architectures=["MosaicGPT"],
      model_type="mosaic_gpt",
      **common,
      mlp_ratio=config.mlp_ratio,
      attn_impl="torch",
      attn_pdrop=0.0,
      attn_qk_ln=config.attn_qk_ln,
      attn_clip_qkv=config.attn_clip_qkv,
      softmax_scale=config.softmax_scale,
      prefix_lm=False,
      attn_uses_sequence_id=False,
      alibi=config.alibi,
      alibi_bias_max=config.alibi_bias_max,
      low_precision_layernorm=config.low_precision_layernorm,
      param_init_fn=config.param_init_fn,
      **init,
    )
  if layout == "mpt":
    return dict(
      architectures=["MPTForCausalLM"],
      model_type="mpt",
      **common,
      expansion_ratio=config.mlp_ratio,
      layer_norm_epsilon=config.layer_norm_eps,
      learned_pos_emb=False,
      norm_type="low_precision_layernorm" if config.low_precision_layernorm else "layernorm",
      attn_config=dict(
        attn_type="multihead_attention",
        attn_impl="torch",
        attn_pdrop=0,  # transformers' MptAttentionConfig types attn_pdrop and alibi_bias_max as int
        qk_ln=config.attn_qk_ln,
        clip_qkv=config.attn_clip_qkv,
        softmax_scale=config.softmax_scale,
        prefix_lm=False,
        attn_uses_sequence_id=False,
        alibi=config.alibi,
        alibi_bias_max=int(config.alibi_bias_max)
        if float(config.alibi_bias_max).is_integer()
        else config.alibi_bias_max,
      ),
      init_config=dict(name=config.param_init_fn, **init),
    )
  raise ValueError(f"unknown layout {layout!r}; expected 'mosaic_gpt' or 'mpt'")


def hf_layout(d: dict[str, Any]) -> Layout:
  """Which schema a config.json dict is written in."""
  model_type = d.get("model_type")
  if model_type in ("mosaic_gpt", "mpt"):
    return model_type
  if model_type is None:
    return "mpt" if "attn_config" in d else "mosaic_gpt"
  raise ValueError(f"config.json model_type={model_type!r} is not an MPT; expected 'mosaic_gpt' or 'mpt'")


def _reject(d, *keys):
  """Dropout, prefix-LM and per-head QK norm would change the function: refuse them."""
  for key in keys:
    if d.get(key):
      raise ValueError(f"config.json {key}={d[key]!r} is not supported by mpt-jax (must be 0/false)")
