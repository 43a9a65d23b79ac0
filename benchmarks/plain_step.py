"""A plain MPT-1B train step: the baseline that benchmarks/train_step.py measures beside ours.

What a competent JAX user writes in about a hundred lines without this library, aiming at
speed and nothing else: the same model (fused QKV, QK LayerNorm, ALiBi, exact GELU, no
biases, tied head), float32 parameters with bfloat16 compute, a Python loop over the layers
(no scan, no remat), float32 logits and the mean next-token cross-entropy, ``optax.adamw``.
Attention is ``jax.nn.dot_product_attention`` (cuDNN on a GPU) with ALiBi as a materialized
[1, N, T, T] bias, the only way to get ALiBi from a stock fused kernel. No clipping, no
NaN guard, no z-loss, no sharding, no gradient accumulation.
"""

import jax
import jax.numpy as jnp
import optax

from mpt_jax.alibi import alibi_slopes
from mpt_jax.config import MPTConfig


def init_params(config: MPTConfig, key) -> dict:
  """Normal(0.02) weights, unit LayerNorm scales; the layout of mpt_jax.model unstacked."""
  d, n, h, f = config.d_model, config.n_heads, config.head_dim, config.mlp_hidden
  keys = iter(jax.random.split(key, 1 + 4 * config.n_layers))

  def normal(*shape):
    return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

  def layer():
    ones = jnp.ones((d,), jnp.float32)
    return dict(
      ln_1=ones,
      qkv=normal(d, 3, n, h),
      q_ln=ones,
      k_ln=ones,
      out=normal(n, h, d),
      ln_2=ones,
      up=normal(d, f),
      down=normal(f, d),
    )

  return dict(
    wte=normal(config.vocab_size, d), ln_f=jnp.ones((d,), jnp.float32), layers=[layer() for _ in range(config.n_layers)]
  )


def _layer_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale).astype(x.dtype)


def _block(config: MPTConfig, p: dict, x, bias):
  dtype, eps = x.dtype, config.layer_norm_eps
  b, t, d = x.shape
  qkv = jnp.einsum("BTD,DCNH->BTCNH", _layer_norm(x, p["ln_1"], eps), p["qkv"].astype(dtype))
  q = _layer_norm(qkv[:, :, 0].reshape(b, t, d), p["q_ln"], eps).reshape(qkv[:, :, 0].shape)
  k = _layer_norm(qkv[:, :, 1].reshape(b, t, d), p["k_ln"], eps).reshape(qkv[:, :, 1].shape)
  out = jax.nn.dot_product_attention(q, k, qkv[:, :, 2], bias=bias, is_causal=True, implementation=config.attn_impl)
  x = x + jnp.einsum("BTNH,NHD->BTD", out, p["out"].astype(dtype))
  hidden = jax.nn.gelu(
    jnp.einsum("BTD,DF->BTF", _layer_norm(x, p["ln_2"], eps), p["up"].astype(dtype)), approximate=False
  )
  return x + jnp.einsum("BTF,FD->BTD", hidden, p["down"].astype(dtype))


def loss_fn(config: MPTConfig, params: dict, tokens):
  """Mean next-token cross-entropy of int32 tokens [B, T], float32 logits."""
  t = tokens.shape[1]
  x = params["wte"].astype(config.dtype)[tokens]
  position = jnp.arange(t)
  slopes = jnp.asarray(alibi_slopes(config.n_heads, config.alibi_bias_max), jnp.float32)
  bias = (slopes[:, None, None] * (position[None, :] - position[:, None])).astype(config.dtype)[None]  # [1, N, T, T]
  for p in params["layers"]:
    x = _block(config, p, x, bias)
  x = _layer_norm(x, params["ln_f"], config.layer_norm_eps)
  logits = jnp.einsum("BTD,VD->BTV", x, params["wte"].astype(x.dtype), preferred_element_type=jnp.float32)
  log_probs = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()


def make_train_step(config: MPTConfig, learning_rate: float = 2e-4):
  """(init(key) -> (params, opt_state), jitted step(params, opt_state, tokens) -> (params, opt_state, loss))."""
  tx = optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)

  def init(key):
    params = init_params(config, key)
    return params, tx.init(params)

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(config, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(init), jax.jit(step, donate_argnums=(0, 1))
