"""Token-weighted loss and perplexity, as training measures them.

Text becomes rows of at most seq_len tokens the way prepare packs training data: each document's
tokens and an EOS, concatenated and cut into rows (the last, shorter row is kept here). The loss
is the next-token cross-entropy summed over every predicted token divided by their number, the
trainer's mean loss; perplexity is its exp. Rows go through in padded batches of one shape;
padding predicts nothing and is never predicted. Sources: a JSONL file of {"text": ...}
documents, or a seqio task (TensorFlow, imported only then).
"""

import functools
import itertools
import json
import os
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from mpt_jax import loss
from mpt_jax.model import MPTForCausalLM


def loss_sums(model: MPTForCausalLM, input_ids, lengths):
  """(cross-entropy summed over predicted tokens, their count) of int [B, T] rows ``lengths`` [B] long.

  The one place evaluation defines its loss: the training objective (mpt_jax.loss), each
  predicted token weighted 1, masked to each row's length (position t predicts t + 1 < length).
  """
  targets, mask = loss.next_token_targets(input_ids)
  weights = (mask & (jnp.arange(input_ids.shape[1]) < lengths[:, None] - 1)).astype(jnp.float32)
  _, cross_entropy_sum = loss.head_cross_entropy(
    model.hidden_states(input_ids), model.wte[...], targets, weights, logit_scale=model.config.logit_multiplier
  )
  return cross_entropy_sum, jnp.sum(weights)


@functools.partial(jax.jit, static_argnums=0)
def loss_step(graphdef: nnx.GraphDef, params: nnx.State, input_ids, lengths):
  """loss_sums of the model (graphdef, params), compiled; sharded params and rows work as given."""
  return loss_sums(nnx.merge(graphdef, params), input_ids, lengths)


def mean_loss(
  model: MPTForCausalLM,
  rows: Iterable[np.ndarray],
  *,
  batch_size: int,
  seq_len: int,
  desc: str = "loss",
  progress: bool = True,
) -> tuple[float, int]:
  """(mean cross-entropy per predicted token, number of predicted tokens) over rows of <= seq_len tokens."""
  if seq_len > model.config.max_seq_len:
    raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
  graphdef, params = nnx.split(model)
  total, count = 0.0, 0.0
  rows = iter(rows)
  with tqdm.tqdm(desc=desc, unit="row", disable=not progress) as bar:
    while batch := list(itertools.islice(rows, batch_size)):
      input_ids, lengths = np.zeros((batch_size, seq_len), np.int32), np.zeros(batch_size, np.int32)
      for i, row in enumerate(batch):
        if not 0 < len(row) <= seq_len:
          raise ValueError(f"a row has {len(row)} tokens; rows must have 1 to seq_len={seq_len}")
        input_ids[i, : len(row)], lengths[i] = row, len(row)
      ce_sum, n = loss_step(graphdef, params, input_ids, lengths)
      total, count = total + float(ce_sum), count + float(n)
      bar.update(len(batch))
  if not count:
    raise ValueError(f"{desc}: no predicted tokens (every row has fewer than 2 tokens)")
  return total / count, int(count)


def pack_documents(documents: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[np.ndarray]:
  """Each document's tokens plus EOS, concatenated and cut into rows of seq_len; the tail is the last row."""
  buffer: list[int] = []
  for document in documents:
    buffer += [*document, eos_id]
    while len(buffer) >= seq_len:
      yield np.array(buffer[:seq_len], np.int32)
      buffer = buffer[seq_len:]
  if buffer:
    yield np.array(buffer, np.int32)


def jsonl_texts(path: str | os.PathLike) -> Iterator[str]:
  """The "text" of each line of a JSONL file; a malformed line raises ValueError naming it."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{path}:{number}: expected an object with a string "text" field, got {line.strip():.60}')
      yield record["text"]


def seqio_rows(spec: str, seq_len: int, tokenizer, data_dir: str = "") -> Iterator[np.ndarray]:
  """The "targets" rows of the seqio task or mixture ``NAME[:SPLIT]`` (split: train by default).

  NAME is one in seqio's registries, or one mpt_jax.data.tasks registers for
  DataConfig(mixture=NAME, data_dir=data_dir) with ``tokenizer`` (shakespeare, redpajama_*).
  """
  import seqio

  from mpt_jax.config import DataConfig
  from mpt_jax.data import tasks

  name, _, split = spec.partition(":")
  if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
    tasks.register(DataConfig(mixture=name, data_dir=data_dir), tokenizer)
  dataset = seqio.get_mixture_or_task(name).get_dataset(
    {"targets": seq_len}, split=split or "train", shuffle=False, num_epochs=1
  )
  for example in dataset.as_numpy_iterator():
    yield example["targets"]
