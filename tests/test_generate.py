"""Decoding: the cache equals the full forward, greedy equals transformers' generate, ragged
batches, EOS, top-k / top-p sampling, bad input, and the sampling CLI."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM, attention, checkpoint, model_folder
from mpt_jax import generate as generate_module
from mpt_jax.attention import pallas_decode
from mpt_jax.generate import Generator, generate, sample_logits

CONFIG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=53, dtype="float32", attn_impl="xla")


@pytest.fixture(scope="module")
def model():
  return MPTForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def converted(converted_mpt):
  """(transformers model, our Generator over its conversion, our model)."""
  hf, folder = converted_mpt
  ours = checkpoint.load_model(folder, dtype="float32", attn_impl="xla")
  return hf, Generator(ours), ours


def _prompts(seed, lengths, vocab=50277):
  keys = jax.random.split(jax.random.key(seed), len(lengths))
  return [np.asarray(jax.random.randint(k, (n,), 0, vocab), np.int32) for k, n in zip(keys, lengths)]


@pytest.mark.parametrize(
  "scan_layers, gpu_kernels", [(True, False), (False, False), (False, True)], ids=["scan", "layers", "gpu-kernels"]
)
def test_cached_decode_equals_the_full_forward(scan_layers, gpu_kernels, monkeypatch):
  """A prompt prefilled at once, then tokens one by one, give the logits of one full pass.

  ``gpu_kernels``: as decoding runs on a GPU (interpreted here): the Pallas LayerNorms, the
  query and key LayerNorm written over the fused QKV product, and the decode kernel that
  writes the cache and attends, reading q, k and v out of that product.
  """
  config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
  if gpu_kernels:
    config = dataclasses.replace(config, norm_impl="pallas")
    kernel = functools.partial(pallas_decode.write_and_attend, interpret=True)
    monkeypatch.setattr(attention, "_decode_kernel_applies", lambda q, k, impl: True)
    monkeypatch.setattr(pallas_decode, "write_and_attend", kernel)
  model = MPTForCausalLM(config, rngs=nnx.Rngs(4))
  ids = jax.random.randint(jax.random.key(5), (3, 13), 0, CONFIG.vocab_size)
  cache = model.init_cache(3, 20)  # longer than used: the unwritten tail must stay masked
  logits, cache = model.decode(ids[:, :6], cache, 0)
  pieces = [logits]
  for position in range(6, 13):
    logits, cache = model.decode(ids[:, position : position + 1], cache, position)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(ids), rtol=1e-5, atol=1e-5)
  assert cache.k.shape == (CONFIG.n_layers, 3, 20, CONFIG.n_heads, CONFIG.head_dim)


def test_per_row_positions_and_per_layer_cache_equal_each_row_alone():
  """Rows of different lengths, right-padded, each decoding at its own position into per-layer
  cache buffers, get the logits of their own full forward; padding and stale entries stay masked."""
  model = MPTForCausalLM(dataclasses.replace(CONFIG, scan_layers=False), rngs=nnx.Rngs(6))
  lengths = np.array([4, 9, 6])
  ids = np.asarray(jax.random.randint(jax.random.key(7), (3, 13), 0, CONFIG.vocab_size), np.int32)
  shape = (3, 16, CONFIG.n_heads, CONFIG.head_dim)
  cache = model.init_cache(3, 16)._replace(
    **{kv: tuple(jnp.zeros(shape) for _ in range(CONFIG.n_layers)) for kv in "kv"}
  )
  decode = nnx.jit(lambda model, ids, cache, position: model.decode(ids, cache, position))
  padded = np.where(np.arange(9) < lengths[:, None], ids[:, :9], 0)
  _, cache = decode(model, jnp.asarray(padded), cache, 0)
  full = model(jnp.asarray(ids))
  for step in range(4):
    position = lengths + step
    logits, cache = decode(model, jnp.asarray(ids[np.arange(3), position])[:, None], cache, jnp.asarray(position))
    assert isinstance(cache.k, tuple) and len(cache.k) == CONFIG.n_layers
    np.testing.assert_allclose(logits[:, 0], full[np.arange(3), position], rtol=1e-5, atol=1e-5)


def test_cache_longer_than_max_seq_len_raises(model):
  with pytest.raises(ValueError, match="max_seq_len"):
    model.init_cache(1, CONFIG.max_seq_len + 1)


def test_greedy_equals_transformers_generate(converted):
  hf, generator, _ = converted
  for prompt in _prompts(1, [5, 11]):
    theirs = hf.generate(
      torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    (ours,) = generator([prompt], max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(ours, theirs[0, len(prompt) :].numpy())


def test_ragged_batch_gives_each_prompt_the_tokens_it_gets_alone(converted):
  _, generator, _ = converted
  prompts = _prompts(2, [3, 17, 8, 1])
  together = generator(prompts, max_new_tokens=9, temperature=0.0)
  for prompt, tokens in zip(prompts, together):
    (alone,) = generator([prompt], max_new_tokens=9, temperature=0.0)
    assert len(tokens) == 9
    np.testing.assert_array_equal(tokens, alone)


def test_top_k_1_equals_greedy(converted):
  _, generator, _ = converted
  prompts = _prompts(3, [6, 2, 10])
  greedy = generator(prompts, max_new_tokens=8, temperature=0.0)
  top_1 = generator(prompts, max_new_tokens=8, temperature=1.3, top_k=1, rng=jax.random.key(4))
  full = generator(prompts, max_new_tokens=8, temperature=1.3, rng=jax.random.key(4))
  for g, t, f in zip(greedy, top_1, full):
    np.testing.assert_array_equal(t, g)
  assert any(not np.array_equal(f, g) for f, g in zip(full, greedy))  # sampling differs, so top-k=1 did the work


def test_eos_stops_a_row_and_the_others_continue(converted):
  _, generator, _ = converted
  prompts = _prompts(5, [4, 7])
  free = generator(prompts, max_new_tokens=10, temperature=0.0)
  eos = int(free[0][3])  # row 0's 4th token; make sure row 1 never samples it
  assert eos not in free[0][:3] and eos not in free[1]
  stopped = generator(prompts, max_new_tokens=10, temperature=0.0, eos_id=eos)
  np.testing.assert_array_equal(stopped[0], free[0][:4])
  np.testing.assert_array_equal(stopped[1], free[1])


def test_all_rows_at_eos_end_the_loop_early(converted):
  _, generator, _ = converted
  (prompt,) = _prompts(6, [5])
  (free,) = generator([prompt], max_new_tokens=6, temperature=0.0)
  seen = []
  (stopped,) = generator([prompt], max_new_tokens=6, temperature=0.0, eos_id=int(free[0]), stream=seen.append)
  np.testing.assert_array_equal(stopped, free[:1])
  assert len(seen) == 1  # the loop ran no step after the only row stopped


def test_stream_sees_every_step_in_order(converted):
  _, generator, _ = converted
  prompts = _prompts(7, [3, 6])
  seen = []
  out = generator(prompts, max_new_tokens=5, temperature=0.0, stream=seen.append)
  np.testing.assert_array_equal(np.stack(seen, axis=1), np.stack(out))


def test_decoding_weights_are_cast_once_and_split_per_layer():
  """Decode reads bfloat16 matrices with no layer axis: no per-token casts or layer slicing."""
  model = MPTForCausalLM(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(Generator(model)._state)
  assert sorted(state["blocks"]) == list(range(CONFIG.n_layers))
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    expected = jnp.bfloat16 if x.ndim > 1 else jnp.float32  # LayerNorm scales are read in float32
    assert x.dtype == expected, (path, x.dtype)
  np.testing.assert_array_equal(state["blocks"][1]["mlp"]["up_proj"], model.blocks.mlp.up_proj[1].astype(jnp.bfloat16))


def test_large_batches_decode_with_cublas_products_on_gpus(model, monkeypatch):
  """On a GPU, batches of CUBLAS_FROM_ROWS rows or more run a loop compiled without XLA's Triton
  GEMMs (faster there: docs/decoding.md); that loop samples the same tokens."""
  rows = generate_module.CUBLAS_FROM_ROWS
  assert generate_module._decode_loop_for(rows, "gpu") is generate_module._decode_loop_cublas
  assert generate_module._decode_loop_for(rows - 1, "gpu") is generate_module._decode_loop
  assert generate_module._decode_loop_for(rows, "cpu") is generate_module._decode_loop
  prompts = _prompts(9, [3, 5], vocab=CONFIG.vocab_size)
  triton = generate(model, prompts, max_new_tokens=6, temperature=0.0)
  monkeypatch.setattr(generate_module, "_decode_loop", generate_module._decode_loop_cublas)
  cublas = generate(model, prompts, max_new_tokens=6, temperature=0.0)
  np.testing.assert_array_equal(np.stack(cublas), np.stack(triton))


def test_sampling_is_reproducible_per_key_and_differs_across_keys(model):
  prompt = np.zeros((4, 3), np.int32)
  first = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(2))
  again = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(2))
  other = generate(model, prompt, max_new_tokens=10, temperature=1.5, rng=jax.random.key(3))
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)], ids=lambda v: str(v))
def test_sample_frequencies_follow_the_truncated_distribution(top_k, top_p):
  """transformers' semantics: temperature, then the top_k tokens, then the fewest whose mass reaches top_p."""
  logits = jax.random.normal(jax.random.key(8), (7,)) * 1.5
  draws = np.asarray(
    sample_logits(jnp.tile(logits, (40_000, 1)), jax.random.key(9), temperature=0.9, top_k=top_k, top_p=top_p)
  )
  probs = np.asarray(jax.nn.softmax(logits / 0.9), np.float64)
  order = np.argsort(-probs)
  keep = np.zeros(7, bool)
  keep[order[: top_k or 7]] = True
  ranked = probs[order] * keep[order]
  before = np.cumsum(ranked / ranked.sum()) - ranked / ranked.sum()
  keep[order[before >= top_p]] = False
  expected = np.where(keep, probs, 0) / probs[keep].sum()
  np.testing.assert_allclose(np.bincount(draws, minlength=7) / draws.size, expected, atol=0.01)
  assert set(np.unique(draws)) == set(np.flatnonzero(keep))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(prompts=[[3, 53]], max_new_tokens=2), "token id 53 at position 1: ids must be in"),
    (dict(prompts=[[4], [2, -1]], max_new_tokens=2), r"prompt 1 has token id -1"),
    (dict(prompts=[[1, 2]], max_new_tokens=-2), "max_new_tokens must be a positive integer, got -2"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(prompts=[[1, 2]], max_new_tokens=2.5), "max_new_tokens must be a positive integer"),
    (dict(prompts=[[1, 2]], max_new_tokens=True), "max_new_tokens must be a positive integer"),
    (dict(prompts=[[1], list(range(20))], max_new_tokens=5), r"prompt 1 has 20 tokens: .* 25 > max_seq_len=24"),
    (dict(prompts=np.zeros((2,), np.int32), max_new_tokens=1), r"or an int \[B, T0\] array, got shape \(2,\)"),
    (dict(prompts=[3, 4], max_new_tokens=1), "prompt 0 must be a non-empty sequence"),
    (dict(prompts=[[1], []], max_new_tokens=1), "prompt 1 must be a non-empty sequence"),
    (dict(prompts=[[1.5, 2]], max_new_tokens=1), "integer token ids"),
    (dict(prompts=[], max_new_tokens=1), "non-empty list"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, temperature=1.0), "needs an rng"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, temperature=-1.0), "temperature must be"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, temperature=float("nan")), "temperature must be"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, top_k=-1), "top_k must be"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, top_p=0.0), "top_p must be"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, top_p=1.5), "top_p must be"),
    (dict(prompts=[[1, 2]], max_new_tokens=1, eos_id=53), "eos_id must be"),
  ],
)
def test_bad_arguments_raise(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate(model, **kwargs)


# ---------------------------------------------------------------------------------- CLI


def test_cli_decodes_a_batch_of_prompts_of_different_lengths(converted_mpt, tokenizer_json, tmp_path, capsys):
  from mpt_jax.data.tokenizer import Tokenizer

  _, folder = converted_mpt
  (tmp_path / "prompts.txt").write_text("A much longer second prompt, several tokens in all\n\nThird\n")
  args = generate_module.Args(
    model=str(folder),
    tokenizer=str(tokenizer_json),
    prompt=("Hello",),
    prompt_file=str(tmp_path / "prompts.txt"),
    max_new_tokens=6,
    temperature=0.0,
    dtype="float32",
  )
  completions = generate_module.main(args)
  tokenizer = Tokenizer.from_file(tokenizer_json)
  texts = ["Hello", "A much longer second prompt, several tokens in all", "Third"]
  model = checkpoint.load_model(folder, dtype="float32")
  expected = generate(
    model, [tokenizer.encode(t) for t in texts], max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_id
  )
  assert completions == [tokenizer.decode(t[:-1] if t[-1] == tokenizer.eos_id else t) for t in expected]
  printed = capsys.readouterr().out
  assert all(f"--- {i}\n{text}{completion}" in printed for i, (text, completion) in enumerate(zip(texts, completions)))


def test_cli_streams_a_single_prompt(converted_mpt, tokenizer_json, capsys):
  _, folder = converted_mpt
  args = generate_module.Args(
    model=str(folder),
    tokenizer=str(tokenizer_json),
    prompt=("Once upon a time",),
    max_new_tokens=8,
    temperature=0.7,
    top_p=0.9,
    seed=3,
    dtype="float32",
  )
  (completion,) = generate_module.main(args)
  assert completion and capsys.readouterr().out == f"Once upon a time{completion}\n"


def test_cli_bad_input_exits_with_a_clear_message(converted_mpt, tokenizer_json, tmp_path):
  _, folder = converted_mpt
  small = tmp_path / "small-vocab"
  model_folder.save_model(MPTForCausalLM(CONFIG, rngs=nnx.Rngs(0)), small)
  cases = [
    (dict(model=str(tmp_path / "missing")), "--model .*missing does not exist"),
    (dict(model=str(small)), "has 50277 ids but the model's vocab_size is 53"),
    (dict(prompt=("word " * 1100,)), r"prompt 0 has \d+ tokens: .* > max_seq_len=1024"),
    (dict(prompt=(), prompt_file=str(tmp_path / "none.txt")), "--prompt-file .*none.txt does not exist"),
    (dict(max_new_tokens=-2), "--max-new-tokens must be a positive integer, got -2"),
  ]
  for overrides, match in cases:
    args = dataclasses.replace(
      generate_module.Args(model=str(folder), tokenizer=str(tokenizer_json), prompt=("Hi",)), **overrides
    )
    with pytest.raises(SystemExit, match=match):
      generate_module.main(args)
