"""Sampling from an MPTForCausalLM: one compiled decode loop, and the command line around it.

The loop is one jitted function: a prefill over the right-padded prompts, then a
``lax.while_loop`` whose carry holds the KV cache (one buffer per layer, written in place one
position per step) and the sampled tokens, with sampling (temperature, top-k, top-p) inside
the loop; it ends when every row has sampled EOS or has max_new_tokens. Prompts of different
lengths share one batch: each row writes and attends at its own position (MPTForCausalLM.decode
with per-row positions), so greedy decoding gives each prompt the tokens it gets alone.
Weights are cast to the compute dtype and split per layer once, before the loop: at batch 1 a
step is one read of every weight (2.6 GB for MPT-1B in bfloat16), with no per-token casts or
per-layer slices of stacked weights.

  python -m mpt_jax.generate --model checkpoints/mpt-1b --tokenizer gpt-neox-20b/tokenizer.json \\
      --prompt "The capital of France is" --max-new-tokens 32 --temperature 0.8 --top-p 0.95
  python -m mpt_jax.generate --model checkpoints/mpt-1b --tokenizer ... --prompt-file prompts.txt

One idea, past 300 lines: sampling, the compiled loop and the thin CLI that feeds it prompts.
"""

import dataclasses
import functools
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax import checkpoint, model_folder, paths
from mpt_jax.model import KVCache, MPTForCausalLM

CACHE_ROUNDING = 64  # cache lengths are rounded up to a multiple of this: fewer distinct compilations
PROMPT_ROUNDING = 16  # padded prompt lengths likewise
# From this many rows, a decoding step on an H200 is 1.06-1.10x faster with cuBLAS for every
# product than with XLA's Triton GEMMs (48 and 64 rows), which win at 32 rows and fewer
# (1.04-1.22x): the loop for such batches is compiled without Triton GEMMs (docs/decoding.md).
CUBLAS_FROM_ROWS = 48


def sample_logits(logits, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """The next token of each row: float32 logits [B, V] -> int32 [B].

  temperature 0 is greedy (argmax; top_k and top_p then do nothing). Otherwise, in the order of
  transformers' logits warpers: divide by temperature, keep the top_k largest logits, keep the
  fewest most likely tokens whose probabilities sum to at least top_p, sample from the rest.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k == 0 and top_p == 1.0:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  values, indices = jax.lax.top_k(logits, min(top_k or logits.shape[-1], logits.shape[-1]))  # [B, K] descending
  if top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    more_likely = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above; 0 for the first
    values = jnp.where(more_likely < top_p, values, -jnp.inf)
  choice = jax.random.categorical(rng, values, axis=-1)  # [B]
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class _Static(NamedTuple):
  """What the compiled loop is specialized on, besides shapes."""

  graphdef: nnx.GraphDef
  temperature: float
  top_k: int
  top_p: float
  stream: Callable[[np.ndarray], None] | None  # called with each step's tokens [B], in order


class Generator:
  """Decodes from a model whose weights were prepared once: compute dtype, one array per layer.

  Args:
    model: an MPTForCausalLM, stacked (scan_layers) or not; it is left unchanged.
  """

  def __init__(self, model: MPTForCausalLM):
    self.config = model.config
    self._graphdef, self._state = nnx.split(_decoding_model(model))

  def __call__(
    self,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    rng=None,
    stream: Callable[[np.ndarray], None] | None = None,
    cache_length: int | None = None,
  ) -> list[np.ndarray]:
    """The new tokens of each prompt; see ``generate``.

    ``cache_length`` is the KV cache's positions; None: the longest prompt plus max_new_tokens,
    rounded up to a multiple of CACHE_ROUNDING. Calls with the same batch shape, cache_length and
    sampling settings share one compiled loop whatever max_new_tokens is.
    """
    c = self.config
    prompts = _check_prompts(prompts, c.vocab_size)
    _check_positive_int("max_new_tokens", max_new_tokens)
    longest = max(len(p) for p in prompts)
    for i, prompt in enumerate(prompts):
      if len(prompt) + max_new_tokens > c.max_seq_len:
        raise ValueError(
          f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} that is "
          f"{len(prompt) + max_new_tokens} > max_seq_len={c.max_seq_len}"
        )
    if not (math.isfinite(temperature) and temperature >= 0):
      raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature=}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k=}")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p=}")
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < c.vocab_size):
      raise ValueError(f"eos_id must be None or a token id in [0, {c.vocab_size}), got {eos_id=}")
    if temperature > 0 and rng is None:
      raise ValueError(f"sampling at {temperature=} needs an rng (jax.random.key); temperature=0 is greedy")
    padded_length = min(_round_up(longest, PROMPT_ROUNDING), c.max_seq_len)
    needed = max(padded_length, longest + max_new_tokens - 1)  # the last new token is never fed back
    if cache_length is None:
      cache_length = min(_round_up(needed, CACHE_ROUNDING), c.max_seq_len)
    elif not needed <= cache_length <= c.max_seq_len:
      raise ValueError(
        f"cache_length={cache_length} must be in [{needed}, max_seq_len={c.max_seq_len}] for these prompts"
      )
    tokens = np.zeros((len(prompts), padded_length), np.int32)  # right-padded
    for row, prompt in zip(tokens, prompts):
      row[: len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    static = _Static(self._graphdef, float(temperature), top_k, float(top_p), stream)
    rng = jax.random.key(0) if rng is None else rng
    out, steps = _decode_loop_for(len(prompts), jax.default_backend())(
      static, cache_length, self._state, tokens, lengths, rng, max_new_tokens, -1 if eos_id is None else eos_id
    )
    out = np.asarray(out)[:, : int(steps)]
    return [_until_eos(row, eos_id) for row in out]


def generate(
  model: MPTForCausalLM,
  prompts,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
  rng=None,
  stream=None,
) -> list[np.ndarray]:
  """Samples a continuation of each prompt with a KV cache, in one compiled loop.

  Args:
    model: an MPTForCausalLM (Generator prepares its weights; keep a Generator to decode often).
    prompts: token ids, one sequence per row, lengths may differ (an int [B, T0] array also works).
    max_new_tokens: tokens to add per prompt (fewer where EOS comes first); each prompt's length
      plus this must fit in max_seq_len.
    temperature: softmax temperature; 0 means greedy (argmax).
    top_k: sample among the k most likely tokens; 0: all.
    top_p: nucleus sampling: among the fewest most likely tokens whose probability reaches top_p; 1: off.
    eos_id: a row stops after sampling this token (kept as its last token); None: never.
    rng: a jax.random key, needed when temperature > 0. Draws depend on the row's place in the batch.
    stream: called on the host with each step's tokens, int32 [B], as they are sampled.

  Returns:
    Per prompt, int32 [n] with n <= max_new_tokens: the sampled tokens, ending at EOS if it came.
  """
  return Generator(model)(
    prompts,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
    rng=rng,
    stream=stream,
  )


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
  """Prompts as int32 arrays, each non-empty with every id in [0, vocab_size); else ValueError naming the first bad one."""
  if isinstance(prompts, np.ndarray | jax.Array):
    if prompts.ndim != 2:
      raise ValueError(f"prompts must be sequences of token ids or an int [B, T0] array, got shape {prompts.shape}")
    prompts = list(np.asarray(prompts))
  if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError(f"prompts must be a non-empty list of token id sequences, got {type(prompts).__name__}")
  checked = []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {i} must be a non-empty sequence of integer token ids, got {prompt!r:.80}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
      raise ValueError(
        f"prompt {i} has token id {int(ids[bad[0]])} at position {int(bad[0])}: "
        f"ids must be in [0, vocab_size={vocab_size})"
      )
    checked.append(ids.astype(np.int32))
  return checked


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _until_eos(row: np.ndarray, eos_id: int | None) -> np.ndarray:
  if eos_id is not None and (hits := np.flatnonzero(row == eos_id)).size:
    return row[: hits[0] + 1]
  return row


def _decoding_model(model: MPTForCausalLM) -> MPTForCausalLM:
  """``model`` with weight matrices in the compute dtype and one set of arrays per layer.

  Cast once here instead of at every use (a float32 master copy would be read and cast per
  token), unstacked so no step slices layer l out of a stacked array. LayerNorm scales,
  which the model reads in float32, keep their dtype.
  """
  config = dataclasses.replace(model.config, scan_layers=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  cast = lambda x: x.astype(config.dtype) if x.ndim > 1 else x
  if model.config.scan_layers:
    params["blocks"] = {i: jax.tree.map(lambda x, i=i: cast(x[i]), params["blocks"]) for i in range(config.n_layers)}
  return model_folder.model_from_params(config, jax.tree.map(cast, params))


def _decode_loop_body(static: _Static, cache_length: int, state, tokens, lengths, rng, max_new_tokens, eos_id):
  """tokens int32 [B, P] (prompts of ``lengths``, right-padded) -> (int32 [B, cache_length], steps taken).

  Column i of the result is each row's i-th new token, for i < steps; a row that sampled
  eos_id repeats it. New token i of row b is fed back at position lengths[b] + i.
  """
  model = nnx.merge(static.graphdef, state)
  c = model.config
  batch = tokens.shape[0]
  shape = (batch, cache_length, c.n_heads, c.head_dim)
  cache = KVCache(*(tuple(jnp.zeros(shape, c.dtype) for _ in range(c.n_layers)) for _ in "kv"))
  sample = functools.partial(sample_logits, temperature=static.temperature, top_k=static.top_k, top_p=static.top_p)

  def emit(i, token, out, done):
    token = jnp.where(done, eos_id, token)
    if static.stream is not None:
      jax.debug.callback(static.stream, token, ordered=True)
    return jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1), done | (token == eos_id)

  logits, cache = model.decode(tokens, cache, 0)  # [B, P, V]
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V] at each prompt's end
  token = sample(last, jax.random.fold_in(rng, 0))
  out, done = emit(0, token, jnp.zeros((batch, cache_length), jnp.int32), jnp.zeros(batch, bool))

  def keep_going(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, token, cache, out, done = carry
    logits, cache = model.decode(token[:, None], cache, lengths + i - 1)  # [B, 1, V]
    token = sample(logits[:, 0], jax.random.fold_in(rng, i))
    out, done = emit(i, token, out, done)
    return i + 1, token, cache, out, done

  steps, _, _, out, _ = jax.lax.while_loop(keep_going, step, (jnp.int32(1), token, cache, out, done))
  return out, steps


_decode_loop = jax.jit(_decode_loop_body, static_argnums=(0, 1))
_decode_loop_cublas = jax.jit(
  _decode_loop_body, static_argnums=(0, 1), compiler_options={"xla_gpu_enable_triton_gemm": False}
)


def _decode_loop_for(rows: int, backend: str):
  """The compiled loop for a batch of ``rows``: without XLA's Triton GEMMs on GPUs from CUBLAS_FROM_ROWS rows."""
  return _decode_loop_cublas if backend == "gpu" and rows >= CUBLAS_FROM_ROWS else _decode_loop


# ---------------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class Args:
  """Sample continuations of prompts from a model folder."""

  model: str  # a model folder (convert/torch_to_flax.py, model_folder.save_model) or a training workdir
  tokenizer: str  # tokenizer.json whose ids the model was trained on (GPT-NeoX-20B for MPT-1B)
  prompt: tuple[str, ...] = ()  # prompts; several are decoded as one batch
  prompt_file: str = ""  # a text file of prompts, one per line (added after --prompt)
  max_new_tokens: int = 64
  temperature: float = 0.8  # 0: greedy
  top_k: int = 0  # sample among the k most likely tokens; 0: off
  top_p: float = 1.0  # nucleus sampling threshold; 1: off
  seed: int = 0  # sampling seed
  stop_at_eos: bool = True  # end a prompt's continuation at the tokenizer's EOS
  dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype


def main(args: Args) -> list[str]:
  """Prints (and returns) each prompt's continuation; a single prompt is streamed token by token.

  Bad input (a missing model folder or tokenizer, a tokenizer with more ids than the model's
  vocabulary, a prompt too long for max_seq_len) exits with a message naming it.
  """
  try:
    return _run(args)
  except (FileNotFoundError, ValueError) as error:
    raise SystemExit(f"error: {error}") from error


def _run(args: Args) -> list[str]:
  from mpt_jax.data.tokenizer import Tokenizer  # not at import time: benchmarks use this module without mpt_jax.data

  texts = list(args.prompt)
  if args.prompt_file:
    path = pathlib.Path(args.prompt_file)
    if not path.is_file():
      raise FileNotFoundError(f"--prompt-file {path} does not exist")
    texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not texts:
    raise ValueError("no prompt: give --prompt TEXT or --prompt-file FILE")
  _check_positive_int("--max-new-tokens", args.max_new_tokens)
  if not paths.workdir_path(args.model).exists():  # a folder or a gs:// URL
    raise FileNotFoundError(f"--model {args.model} does not exist: give a model folder or a training workdir")
  tokenizer = Tokenizer.from_file(args.tokenizer)
  model = checkpoint.load_model(args.model, dtype=args.dtype)
  check_vocabulary(tokenizer.vocab_size, model.config.vocab_size, args.tokenizer)
  prompts = [tokenizer.encode(text) for text in texts]
  for i, (text, ids) in enumerate(zip(texts, prompts)):
    if not ids:
      raise ValueError(f"prompt {i} ({text!r}) has no tokens")
  eos_id = tokenizer.eos_id if args.stop_at_eos else None
  stream = _TextStream(tokenizer, eos_id, sys.stdout) if len(prompts) == 1 else None
  if stream:
    print(texts[0], end="", flush=True)
  new_tokens = Generator(model)(
    prompts,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    eos_id=eos_id,
    rng=jax.random.key(args.seed),
    stream=stream,
  )
  completions = [tokenizer.decode(t[:-1] if t[-1] == eos_id else t) for t in new_tokens]
  if stream:
    stream.finish(completions[0])
  else:
    for i, (text, completion) in enumerate(zip(texts, completions)):
      print(f"--- {i}\n{text}{completion}")
  return completions


def check_vocabulary(tokenizer_size: int, vocab_size: int, tokenizer_path: str) -> None:
  """A tokenizer may use fewer ids than the model has rows (50277 of 50432), never more."""
  if tokenizer_size > vocab_size:
    raise ValueError(
      f"tokenizer {tokenizer_path} has {tokenizer_size} ids but the model's vocab_size is {vocab_size}: "
      "it is not the tokenizer this model was trained with"
    )


class _TextStream:
  """Prints one row's text as its tokens arrive (the decode loop calls it with int32 [1]), up to ``eos_id``."""

  def __init__(self, tokenizer, eos_id: int | None, out):
    self.tokenizer, self.eos_id, self.out = tokenizer, eos_id, out
    self.tokens: list[int] = []
    self.printed = ""
    self.ended = False

  def __call__(self, token: np.ndarray) -> None:
    token = int(token[0])
    if self.ended or token == self.eos_id:
      self.ended = True
      return
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      self.out.write(text[len(self.printed) :])
      self.out.flush()
      self.printed = text

  def finish(self, completion: str) -> None:
    self.out.write(completion[len(self.printed) :] + "\n")
    self.out.flush()


if __name__ == "__main__":
  import tyro

  main(tyro.cli(Args))
