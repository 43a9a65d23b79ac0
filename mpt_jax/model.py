"""The MPT / MosaicGPT decoder in Flax NNX, exactly as docs/model.md describes it.

Parts before the whole: LayerNorm, Attention, MLP, Block, MPTForCausalLM. Parameters are
float32 by default and cast to the compute dtype where they are used; LayerNorm statistics,
softmax, logits and the loss stay in float32. Every parameter carries logical axis names
(``out_sharding`` metadata) that mpt_jax.sharding maps to mesh axes; the per-device kernels
(attention, LayerNorm) are told which mesh axes split the batch and the heads, from the same
rules (``_KERNEL_AXES``).

One idea, past 300 lines: the model's module tree, parts before the whole.

Dimension letters: B batch, T positions, N heads, H head dim, D d_model, F MLP hidden,
V vocab, C the three fused projections (q, k, v), L layers.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax import ops, sharding
from mpt_jax.alibi import alibi_slopes
from mpt_jax.attention import MeshAxes, cached_attention, dot_product_attention
from mpt_jax.config import MPTConfig

# How mpt_jax.sharding splits activations, for kernels that run per device under jax.shard_map.
_KERNEL_AXES = MeshAxes(batch=sharding.BATCH_AXES, heads=sharding.LOGICAL_RULES["heads"])

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(init_fn, rngs: nnx.Rngs, shape, dtype, axes) -> nnx.Param:
  """A parameter with logical axis names; sharding happens later, from the abstract state."""
  return nnx.Param(init_fn(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _weight_init(config: MPTConfig, fan_in: int, fan_out: int, *, residual: bool = False):
  """PyTorch's init for a Linear weight of shape [fan_out, fan_in] (docs/model.md, "Initialization")."""
  if config.param_init_fn == "normal_":
    std = config.init_std
  else:  # kaiming_normal_, torch.nn.init.calculate_gain semantics
    gain = {
      "relu": math.sqrt(2.0),
      "leaky_relu": math.sqrt(2.0 / (1.0 + config.init_gain**2)),
      "linear": 1.0,
    }[config.init_nonlinearity]
    std = gain / math.sqrt(fan_in if config.fan_mode == "fan_in" else fan_out)
  if residual:
    std /= config.residual_init_divisor
  return jax.nn.initializers.normal(std)


def _embedding_init(config: MPTConfig):
  if config.emb_init_std is not None:
    return jax.nn.initializers.normal(config.emb_init_std)
  if config.emb_init_uniform_lim is not None:
    lim = config.emb_init_uniform_lim
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -lim, lim)
  # torch treats the [V, D] embedding weight like a Linear: fan_in = D, fan_out = V.
  return _weight_init(config, fan_in=config.d_model, fan_out=config.vocab_size)


class LayerNorm(nnx.Module):
  """LayerNorm with a scale and no bias (``no_bias`` strips LayerNorm biases too: docs/model.md).

  Statistics in float32; the output is cast to ``dtype`` (LPLayerNorm's bf16 output).
  ``impl`` picks mpt_jax.ops.layer_norm's implementation (Pallas kernels on GPUs).
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, impl: str = "auto", rngs: nnx.Rngs):
    self.eps, self.dtype, self.impl = eps, dtype, impl
    self.scale = _param(jax.nn.initializers.ones, rngs, (dim,), param_dtype, ("norm",))

  def __call__(self, x):
    return ops.layer_norm(x, self.scale[...], self.eps, self.dtype, self.impl, _KERNEL_AXES.batch)


def _layer_norm(config: MPTConfig, *, rngs: nnx.Rngs, dtype=None) -> LayerNorm:
  norm_dtype = config.dtype if config.low_precision_layernorm else jnp.float32
  return LayerNorm(
    config.d_model,
    eps=config.layer_norm_eps,
    dtype=dtype or norm_dtype,
    param_dtype=config.param_dtype,
    impl=config.norm_impl,
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Fused-QKV multi-head attention with QK LayerNorm and ALiBi (docs/model.md, "Attention")."""

  def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, n, h = config.d_model, config.n_heads, config.head_dim
    # torch's Wqkv [3D, D] is initialized per q/k/v slice, each with fan_in = fan_out = D.
    self.qkv_proj = _param(
      _weight_init(config, d, d), rngs, (d, 3, n, h), config.param_dtype, ("embed", None, "heads", "head_dim")
    )
    if config.attn_qk_ln:
      # Plain nn.LayerNorm over all heads jointly; the output goes back to the q/k dtype.
      self.q_ln = _layer_norm(config, rngs=rngs, dtype=config.dtype)
      self.k_ln = _layer_norm(config, rngs=rngs, dtype=config.dtype)
    out_init = _weight_init(config, d, d, residual=True)
    self.out_proj = _param(out_init, rngs, (n, h, d), config.param_dtype, ("heads", "head_dim", "embed"))

  def __call__(self, x, segment_ids=None, cache=None, position=None):
    """x: [B, T, D] -> ([B, T, D], cache).

    With ``cache`` (k, v [B, S, N, H]: this layer's keys and values so far) the new keys and
    values are written at ``position`` (a scalar, or int [B]: one per row) and the queries,
    there too, attend to the whole cache (causal masking hides its unwritten tail); the
    updated cache is returned. Cached keys are stored after QK-LN, as MosaicGPT's cache does.
    """
    c = self.config
    qkv = jnp.einsum("BTD,DCNH->BTCNH", x, self.qkv_proj[...].astype(c.dtype))
    if c.attn_clip_qkv is not None:
      qkv = jnp.clip(qkv, -c.attn_clip_qkv, c.attn_clip_qkv)
    slopes = alibi_slopes(c.n_heads, c.alibi_bias_max, c.alibi_slope_rule)
    if cache is not None:  # decoding: q, k and v stay in qkv; the queries attend to the whole cache
      if c.attn_qk_ln:
        parts = qkv.reshape(*qkv.shape[:3], -1)  # [B, T, 3, D]
        scales = (self.q_ln.scale[...], self.k_ln.scale[...])
        qkv = ops.layer_norm_parts(parts, scales, self.q_ln.eps, self.q_ln.impl).reshape(qkv.shape)
      out, cache = cached_attention(
        qkv, cache, slopes=slopes, position=position, scale=c.softmax_scale, impl=c.attn_impl
      )
      return _project_out(out, self.out_proj[...].astype(c.dtype)), cache
    # split, not three slices: its transpose is one concatenate, not three pads and two adds.
    q, k, v = (part.squeeze(2) for part in jnp.split(qkv, 3, axis=2))  # [B, T, N, H]
    if c.attn_qk_ln:
      q = self.q_ln(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = self.k_ln(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    out = dot_product_attention(
      q,
      k,
      v,
      slopes=slopes,
      segment_ids=segment_ids,
      causal=True,
      scale=c.softmax_scale,
      impl=c.attn_impl,
      axes=_KERNEL_AXES,
    )
    return _project_out(out, self.out_proj[...].astype(c.dtype)), cache


def _project_out(out, weight):
  """out [B, T, N, H] @ weight [N, H, D] -> [B, T, D].

  One row alone (decoding one sequence) makes this a vector-matrix product under XLA's size
  threshold for GEMMs, which its GPU simplifier rewrites into a multiply that writes an
  [N, H, D] product as large as the weight, then a reduction over it: 15 us a layer on an
  H200 (benchmarks/RESULTS.md, "Generation"). With a second, zero row it stays a GEMM.
  """
  if out.shape[0] * out.shape[1] > 1:
    return jnp.einsum("BTNH,NHD->BTD", out, weight)
  rows = jnp.concatenate([out.reshape(1, -1), jnp.zeros((1, out[0, 0].size), out.dtype)])  # [2, N*H]
  return (rows @ weight.reshape(rows.shape[1], -1))[:1].reshape(*out.shape[:2], -1)


class MLP(nnx.Module):
  """up -> exact (erf) GELU -> down, no biases."""

  def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs):
    self.dtype = config.dtype
    d, f = config.d_model, config.mlp_hidden
    self.up_proj = _param(_weight_init(config, d, f), rngs, (d, f), config.param_dtype, ("embed", "mlp"))
    down_init = _weight_init(config, f, d, residual=True)
    self.down_proj = _param(down_init, rngs, (f, d), config.param_dtype, ("mlp", "embed"))

  def __call__(self, x):
    """x: [B, T, D] -> [B, T, D]."""
    hidden = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(self.dtype))
    hidden = ops.exact_gelu(hidden)
    return jnp.einsum("BTF,FD->BTD", hidden, self.down_proj[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

  def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.ln_2 = _layer_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, segment_ids=None, cache=None, position=None):
    """x: [B, T, D] -> ([B, T, D], cache); see Attention for the cache."""
    attended, cache = self.attn(self.ln_1(x), segment_ids, cache, position)
    x = x + attended.astype(x.dtype)
    return x + self.mlp(self.ln_2(x)).astype(x.dtype), cache


def _stacked_blocks(config: MPTConfig, rngs: nnx.Rngs) -> Block:
  """n_layers Blocks as one Block whose parameters have a leading 'layers' axis."""

  @nnx.split_rngs(splits=config.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return Block(config, rngs=rngs)

  return create(rngs)


class KVCache(NamedTuple):
  """Keys and values of every layer for cached decoding (after QK-LN).

  Either stacked, [L, B, S, N, H] each (init_cache), or, with scan_layers=False, tuples of L
  per-layer [B, S, N, H] arrays: those stay separate buffers that each step updates in place,
  where a stacked cache would be re-stacked (copied whole) at every step.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]


class MPTForCausalLM(nnx.Module):
  """MPT language model: embedding, blocks (stacked or a list), ln_f, tied output head."""

  def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    shape = (config.vocab_size, config.d_model)
    self.wte = _param(_embedding_init(config), rngs, shape, config.param_dtype, ("vocab", "embed"))
    if config.scan_layers:
      self.blocks = _stacked_blocks(config, rngs)
    else:
      self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.ln_f = _layer_norm(config, rngs=rngs)

  def __call__(self, input_ids, segment_ids=None):
    """Logits for next-token prediction.

    Args:
      input_ids: int [B, T], T <= max_seq_len.
      segment_ids: optional int [B, T]; tokens attend only within their own segment
        (packed documents). None: one sequence per row, as the released model was trained.

    Returns:
      float32 logits [B, T, vocab_size].
    """
    return self.head(self.hidden_states(input_ids, segment_ids))

  def hidden_states(self, input_ids, segment_ids=None):
    """The final LayerNorm's output, [B, T, D] in the compute dtype: what the head reads.

    Training feeds it to mpt_jax.loss.head_cross_entropy, which fuses the head with the loss.
    """
    hidden, _ = self._forward(input_ids, segment_ids)
    return hidden

  def head(self, hidden):
    """Tied output head: [B, T, D] -> float32 logits [B, T, vocab_size]."""
    logits = jnp.einsum("BTD,VD->BTV", hidden, self.wte[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
    if self.config.logit_multiplier is not None:
      logits = logits * self.config.logit_multiplier
    return logits

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    """An empty KV cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
    c = self.config
    if max_length > c.max_seq_len:
      raise ValueError(f"cache length {max_length} exceeds max_seq_len={c.max_seq_len}")
    shape = (c.n_layers, batch_size, max_length, c.n_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype))

  def decode(self, input_ids, cache: KVCache, position):
    """Cached incremental forward: logits of ``input_ids`` placed at ``position`` onwards.

    Args:
      input_ids: int [B, T]: the prompt (position 0) or the next token(s).
      cache: from init_cache, holding the keys and values of positions < ``position``.
      position: int (may be traced) where input_ids start, or int [B], one per row (prompts of
        different lengths, right-padded); position + T <= cache length.

    Returns:
      (float32 logits [B, T, vocab_size], the cache with these positions written).
    """
    hidden, cache = self._forward(input_ids, None, cache, position)
    return self.head(hidden), cache

  def _forward(self, input_ids, segment_ids, cache=None, position=None):
    """(final hidden states [B, T, D], cache)."""
    c = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer [B, T], got {input_ids.dtype}{list(input_ids.shape)}")
    if input_ids.shape[1] > c.max_seq_len:
      raise ValueError(f"input length {input_ids.shape[1]} exceeds max_seq_len={c.max_seq_len}")
    if segment_ids is not None and segment_ids.shape != input_ids.shape:
      raise ValueError(f"segment_ids shape {segment_ids.shape} must equal input_ids shape {input_ids.shape}")
    x = jnp.take(self.wte[...], input_ids, axis=0).astype(c.dtype)  # [B, T, D]
    if c.embedding_fraction < 1.0:
      x = x * c.embedding_fraction + jax.lax.stop_gradient(x) * (1.0 - c.embedding_fraction)
    x, cache = self._apply_blocks(x, segment_ids, cache, position)
    return self.ln_f(x), cache

  def _apply_blocks(self, x, segment_ids, cache: KVCache | None, position):
    """x through every block; with a cache, each layer reads and writes its slice [l] (or its own array)."""

    def apply_block(x, block_state, layer_cache):
      return nnx.merge(graphdef, block_state)(x, segment_ids, layer_cache, position)

    if self.config.remat != "none":
      apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
    if self.config.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      x, cache = jax.lax.scan(
        lambda x, layer: apply_block(x, *layer), x, (stacked, cache), unroll=self.config.scan_unroll
      )
      return x, None if cache is None else KVCache(*cache)
    layer_caches = []
    for i, block in enumerate(self.blocks):
      graphdef, state = nnx.split(block)
      x, layer_cache = apply_block(x, state, None if cache is None else (cache.k[i], cache.v[i]))
      layer_caches.append(layer_cache)
    if cache is None:
      return x, None
    restack = jnp.stack if isinstance(cache.k, jax.Array) else tuple  # keep the layout the cache came in
    return x, KVCache(*(restack(kv) for kv in zip(*layer_caches)))


def abstract_model(config: MPTConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of an MPTForCausalLM for ``config``, the state's leaves ShapeDtypeStructs: nothing allocated.

  jax.eval_shape, not nnx.eval_shape: the latter shards by the logical names under an active mesh.
  """
  return jax.eval_shape(lambda: nnx.split(MPTForCausalLM(config, rngs=nnx.Rngs(0))))


def stack_layers(layers: list[dict]) -> dict:
  """Per-layer block parameters (pure dicts, scan_layers=False) -> one stacked dict (scan_layers=True).

  On the host (numpy), so it works on any arrays whatever mesh is active.
  """
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)


def unstack_layers(stacked: dict, n_layers: int) -> list[dict]:
  """The inverse of stack_layers (host numpy)."""
  return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked) for i in range(n_layers)]
