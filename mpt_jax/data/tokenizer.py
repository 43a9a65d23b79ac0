"""Tokenizers: the GPT-NeoX-20B tokenizer.json of the real run, or a small BPE for the embedded corpus.

Both are Hugging Face `tokenizers` models behind one class with the GPT-NeoX conventions
(docs/data.md, "Tokenizer"): `<|endoftext|>` is the EOS, id 0, appended after every document;
no BOS. This module needs no TensorFlow, so training on a machine without it (the GPU
machines) can still encode prompts and read prepared shards; `tasks.HfVocabulary` wraps
it as a `seqio.Vocabulary` for the seqio Tasks.
"""

import hashlib
import os
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mpt_jax.atomic import write_atomically
from mpt_jax.config import DataConfig
from mpt_jax.data import corpus

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
  """A `tokenizers.Tokenizer` whose EOS is `<|endoftext|>`; `sha256` identifies it in prepared data."""

  def __init__(self, tokenizer_json: str, *, source: str):
    try:
      self._hf = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception ("expected value at line 1 column 1")
      raise ValueError(f"{source} is not a Hugging Face tokenizer.json ({e})") from e
    self.sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    eos_id = self._hf.token_to_id(EOS_TOKEN)
    if eos_id is None:
      raise ValueError(f"{source} has no {EOS_TOKEN!r} token to use as EOS")
    self.eos_id: int = eos_id
    self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)  # GPT-NeoX: 50277

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist (DataConfig.tokenizer_path)")
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"tokenizer file {path} is not text, so not a tokenizer.json (DataConfig.tokenizer_path)") from e
    return cls(text, source=f"tokenizer file {path} (DataConfig.tokenizer_path)")

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS."""
    return self._hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, EOS tokens included as `<|endoftext|>`."""
    return self._hf.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
  """A byte-level BPE (GPT-2 style, EOS first so its id is 0 as in GPT-NeoX) as tokenizer.json text.

  Training is deterministic for a given corpus, so every machine derives the same ids.
  """
  model = tokenizers.Tokenizer(models.BPE())
  model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  model.train_from_iterator(texts, trainer)
  return model.to_str()


def load_tokenizer(config: DataConfig) -> Tokenizer:
  """The tokenizer of `config`: `tokenizer_path`, else the embedded corpus' BPE (trained once, cached).

  The BPE lives beside the prepared shards, so a fresh machine builds it offline in seconds;
  nothing is ever downloaded.
  """
  if config.tokenizer_path:
    return Tokenizer.from_file(config.tokenizer_path)
  if config.mixture not in corpus.EMBEDDED:
    raise ValueError(
      f"DataConfig.tokenizer_path is required for mixture {config.mixture!r}: the trained BPE "
      f"fallback exists only for the embedded corpora {tuple(corpus.EMBEDDED)}"
    )
  path = pathlib.Path(config.prepared_dir).expanduser() / f"{config.mixture}-bpe{config.bpe_vocab_size}.tokenizer.json"
  if not path.exists():
    texts = corpus.EMBEDDED[config.mixture]()
    write_atomically(path, train_bpe(texts, config.bpe_vocab_size).encode())
  return Tokenizer.from_file(path)
