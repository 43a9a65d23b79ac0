"""The Flax model against transformers' MptForCausalLM (an independent implementation) and the spec."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM
from mpt_jax.hf_config import from_hf_dict
from mpt_jax.model import _project_out, stack_layers, unstack_layers

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|, float32


def _hf_model(seed, *, n_heads=4, qk_ln=False, clip_qkv=None):
  """A tiny random MptForCausalLM; every parameter, LayerNorm scales included, drawn at random."""
  torch.manual_seed(seed)
  hf_config = transformers.MptConfig(
    d_model=8 * n_heads,
    n_heads=n_heads,
    n_layers=3,
    expansion_ratio=4,
    max_seq_len=40,
    vocab_size=97,
    no_bias=True,
    attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": qk_ln, "clip_qkv": clip_qkv},
  )
  model = transformers.MptForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(
        1.0 + 0.1 * torch.randn_like(p)
        if name.endswith("norm_1.weight") or "norm" in name
        else 0.3 * torch.randn_like(p)
      )
  return model


def _copy_hf_weights(hf, model: MPTForCausalLM, q_ln=None, k_ln=None):
  """Loads transformers MPT weights ([out, in] Linear) into our param tree, per layer then stacked."""
  c = model.config
  # Strip the _QKLayerNormWqkv wrapper's prefix; its q_ln / k_ln come in as arguments.
  sd = {k.replace("Wqkv.wqkv.", "Wqkv."): v.numpy() for k, v in hf.state_dict().items()}
  d, n, h = c.d_model, c.n_heads, c.head_dim
  layers = []
  for i in range(c.n_layers):
    p = f"transformer.blocks.{i}."
    attn = {
      "qkv_proj": sd[p + "attn.Wqkv.weight"].T.reshape(d, 3, n, h),
      "out_proj": sd[p + "attn.out_proj.weight"].T.reshape(n, h, d),
    }
    if c.attn_qk_ln:
      attn["q_ln"] = {"scale": q_ln[i].weight.detach().numpy()}
      attn["k_ln"] = {"scale": k_ln[i].weight.detach().numpy()}
    layers.append(
      {
        "ln_1": {"scale": sd[p + "norm_1.weight"]},
        "ln_2": {"scale": sd[p + "norm_2.weight"]},
        "attn": attn,
        "mlp": {"up_proj": sd[p + "ffn.up_proj.weight"].T, "down_proj": sd[p + "ffn.down_proj.weight"].T},
      }
    )
  pure = {
    "wte": sd["transformer.wte.weight"],
    "ln_f": {"scale": sd["transformer.norm_f.weight"]},
    "blocks": stack_layers(layers) if c.scan_layers else dict(enumerate(layers)),
  }
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)


def _ours_like(hf, **overrides) -> MPTForCausalLM:
  config = from_hf_dict(hf.config.to_dict(), dtype="float32", attn_impl="xla", **overrides)
  return MPTForCausalLM(config, rngs=nnx.Rngs(0))


def _relative_error(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _tokens(seed, batch=2, length=33, vocab=97):
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab), np.int32)


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"scan={s}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_match_transformers(seed, scan_layers):
  hf = _hf_model(seed)
  ours = _ours_like(hf, scan_layers=scan_layers)
  _copy_hf_weights(hf, ours)
  ids = _tokens(seed)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  logits = ours(jnp.asarray(ids))
  assert logits.shape == theirs.shape and logits.dtype == jnp.float32
  assert _relative_error(logits, theirs) < TOLERANCE


def test_logits_match_transformers_with_six_heads_and_clipped_qkv():
  """Non-power-of-two heads use the interleaved slope rule of the mpt schema; clip_qkv clamps qkv."""
  hf = _hf_model(3, n_heads=6, clip_qkv=0.5)
  ours = _ours_like(hf)
  assert ours.config.alibi_slope_rule == "mpt" and ours.config.attn_clip_qkv == 0.5
  _copy_hf_weights(hf, ours)
  ids = _tokens(3)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  assert _relative_error(ours(jnp.asarray(ids)), theirs) < TOLERANCE


class _QKLayerNormWqkv(torch.nn.Module):
  """Wqkv followed by q_ln / k_ln over the full d_model, as MosaicGPT v0.0.4 does (docs/model.md).

  transformers' MptAttention ignores qk_ln; wrapping its Wqkv adds the two LayerNorms exactly
  where the original applies them (after the projection, before the head split; no clip here).
  """

  def __init__(self, wqkv, q_ln, k_ln):
    super().__init__()
    self.wqkv, self.q_ln, self.k_ln = wqkv, q_ln, k_ln

  def forward(self, x):
    q, k, v = self.wqkv(x).chunk(3, dim=-1)
    return torch.cat([self.q_ln(q), self.k_ln(k), v], dim=-1)


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"scan={s}")
@pytest.mark.parametrize("seed", [4, 5])
def test_qk_layernorm_matches_wrapped_transformers(seed, scan_layers):
  hf = _hf_model(seed, qk_ln=True)
  d = hf.config.d_model
  q_lns, k_lns = [], []
  for block in hf.transformer.blocks:
    q_ln, k_ln = torch.nn.LayerNorm(d, eps=1e-5, bias=False), torch.nn.LayerNorm(d, eps=1e-5, bias=False)
    with torch.no_grad():
      q_ln.weight.copy_(1.0 + 0.2 * torch.randn(d))
      k_ln.weight.copy_(1.0 + 0.2 * torch.randn(d))
    block.attn.Wqkv = _QKLayerNormWqkv(block.attn.Wqkv, q_ln, k_ln)
    q_lns.append(q_ln)
    k_lns.append(k_ln)
  ours = _ours_like(hf, scan_layers=scan_layers)
  assert ours.config.attn_qk_ln
  _copy_hf_weights(hf, ours, q_lns, k_lns)
  ids = _tokens(seed)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  assert _relative_error(ours(jnp.asarray(ids)), theirs) < TOLERANCE


TINY = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=61, dtype="float32", attn_impl="xla")


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"scan={s}")
def test_packed_documents_equal_each_document_alone(scan_layers):
  model = MPTForCausalLM(dataclasses.replace(TINY, scan_layers=scan_layers), rngs=nnx.Rngs(7))
  first, second = _tokens(8, batch=1, length=13, vocab=61), _tokens(9, batch=1, length=22, vocab=61)
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.concatenate([jnp.zeros_like(first), jnp.ones_like(second)], axis=1)
  logits = model(packed, segment_ids)
  np.testing.assert_allclose(logits[:, :13], model(jnp.asarray(first)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 13:], model(jnp.asarray(second)), rtol=1e-5, atol=1e-5)
  # Without segment ids the second document sees the first: the logits differ.
  assert not np.allclose(model(packed)[:, 13:], logits[:, 13:], atol=1e-3)


def test_out_projection_of_one_row_equals_the_batched_one():
  """A single decoding row takes the padded-GEMM form (model._project_out); same function."""
  k_out, k_weight = jax.random.split(jax.random.key(3))
  out = jax.random.normal(k_out, (3, 1, 4, 8))
  weight = jax.random.normal(k_weight, (4, 8, 16))
  batched = _project_out(out, weight)
  alone = jnp.concatenate([_project_out(out[i : i + 1], weight) for i in range(3)])
  assert alone.shape == batched.shape == (3, 1, 16)
  np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched, jnp.einsum("BTNH,NHD->BTD", out, weight), rtol=1e-5, atol=1e-5)


def test_scanned_and_looped_layouts_compute_the_same_function():
  scanned = MPTForCausalLM(TINY, rngs=nnx.Rngs(3))
  looped = MPTForCausalLM(dataclasses.replace(TINY, scan_layers=False), rngs=nnx.Rngs(4))
  pure = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  layers = unstack_layers(pure["blocks"], TINY.n_layers)
  state = nnx.state(looped, nnx.Param)
  nnx.replace_by_pure_dict(state, {**pure, "blocks": dict(enumerate(layers))})
  nnx.update(looped, state)
  ids = jnp.asarray(_tokens(5, vocab=61))
  np.testing.assert_allclose(looped(ids), scanned(ids), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stack_layers(layers)["mlp"]["up_proj"], pure["blocks"]["mlp"]["up_proj"])


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_does_not_change_gradients(remat):
  ids = jnp.asarray(_tokens(6, vocab=61))

  def grads(config):
    model = MPTForCausalLM(config, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])
    return nnx.to_pure_dict(nnx.state(nnx.grad(loss)(model)))

  plain, rematted = grads(TINY), grads(dataclasses.replace(TINY, remat=remat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, rematted)


def test_embedding_fraction_scales_the_embedding_gradient_only():
  """The forward is unchanged; d loss / d wte = head path + fraction * input path, linear in fraction."""
  ids = jnp.asarray(_tokens(6, vocab=61))

  def logits_and_wte_grad(fraction):
    model = MPTForCausalLM(dataclasses.replace(TINY, embedding_fraction=fraction), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 3])
    return model(ids), np.asarray(nnx.grad(loss)(model).wte[...])

  (logits_1, grad_1), (logits_half, grad_half), (_, grad_tenth) = map(logits_and_wte_grad, (1.0, 0.5, 0.1))
  np.testing.assert_allclose(logits_half, logits_1, rtol=1e-6)
  input_path = (grad_1 - grad_half) / 0.5
  assert np.max(np.abs(input_path)) > 1e-3 * np.max(np.abs(grad_1))
  np.testing.assert_allclose((grad_half - grad_tenth) / 0.4, input_path, rtol=1e-3, atol=1e-6)


def test_logit_scale_multiplies_the_logits():
  ids = jnp.asarray(_tokens(2, vocab=61))
  plain = MPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  scaled = MPTForCausalLM(dataclasses.replace(TINY, logit_scale="inv_sqrt_d_model"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(scaled(ids), plain(ids) / np.sqrt(TINY.d_model), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  ids = jnp.asarray(_tokens(1, vocab=61))
  fp32 = MPTForCausalLM(TINY, rngs=nnx.Rngs(0))(ids)
  bf16 = MPTForCausalLM(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))(ids)
  assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert _relative_error(bf16, np.asarray(fp32)) < 3e-2


# docs/model.md, Initialization, scaled to D=384, F=1536, L=6: kaiming fan_in, residual / sqrt(2L).
MID = MPTConfig(d_model=384, n_heads=6, n_layers=6, max_seq_len=64, vocab_size=2048)
EXPECTED_STD = {
  ("wte",): np.sqrt(2 / 384),
  ("blocks", "attn", "qkv_proj"): np.sqrt(2 / 384),
  ("blocks", "attn", "out_proj"): np.sqrt(2 / 384) / np.sqrt(12),
  ("blocks", "mlp", "up_proj"): np.sqrt(2 / 384),
  ("blocks", "mlp", "down_proj"): np.sqrt(2 / 1536) / np.sqrt(12),
}


def test_init_matches_the_reference_table():
  params = nnx.to_pure_dict(nnx.state(MPTForCausalLM(MID, rngs=nnx.Rngs(11)), nnx.Param))
  for path, std in EXPECTED_STD.items():
    value = params
    for key in path:
      value = value[key]
    assert abs(float(np.std(value)) / std - 1) < 0.05, (path, float(np.std(value)), std)
    assert abs(float(np.mean(value))) < 0.05 * std, path
  for norm in (params["ln_f"]["scale"], params["blocks"]["ln_1"]["scale"], params["blocks"]["attn"]["q_ln"]["scale"]):
    np.testing.assert_array_equal(norm, 1.0)


def test_layers_get_distinct_initial_weights():
  params = nnx.to_pure_dict(nnx.state(MPTForCausalLM(TINY, rngs=nnx.Rngs(0)), nnx.Param))
  up = params["blocks"]["mlp"]["up_proj"]
  assert not np.allclose(up[0], up[1])


def test_every_parameter_has_logical_axis_names():
  model = nnx.eval_shape(lambda: MPTForCausalLM(TINY, rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.ndim, path
    if path[0] == "blocks":
      assert axes[0] == "layers", path


@pytest.mark.parametrize(
  "bad_input,match",
  [
    (np.zeros((2, 65), np.int32), "max_seq_len"),
    (np.zeros((2, 8), np.float32), "integer"),
    (np.zeros((8,), np.int32), "integer"),
  ],
)
def test_bad_inputs_raise(bad_input, match):
  model = MPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    model(jnp.asarray(bad_input))
