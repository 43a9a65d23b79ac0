"""The training iterator: global batches of prepared rows, this host's slice, exact resume.

Global batch i is decided by (seed, i) and how many rows each source gave before step i:
`sampler.mixture_draw` picks a source per row, the next rows of that source (in its
epoch's pseudorandom order) fill them. That counter per source and the step are the whole
state, so a restore replays nothing and batch i is the same whatever restarts happened.
Every host computes the draw for the whole batch (cheap) and reads only its rows
[process_index * B, (process_index + 1) * B). With `heldout_rows` > 0 the last rows of each
source are never read (`heldout_index` lists them, for evaluation). No TensorFlow here.
"""

import numpy as np

from mpt_jax.config import TrainConfig
from mpt_jax.data import corpus, sampler, shards
from mpt_jax.data.tokenizer import load_tokenizer


class TrainIterator:
  """Yields {'input_ids': int32 [B, T]} (+ 'segment_ids' when asked), B = this host's rows."""

  def __init__(
    self,
    dataset: shards.PreparedDataset,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    eos_id: int,
    segment_ids: bool = False,
    heldout_rows: int = 0,
  ):
    small = [f"{n} ({r} rows)" for n, r in zip(dataset.names, dataset.rows) if r <= heldout_rows]
    if small:
      raise ValueError(f"holding out {heldout_rows} rows per source leaves nothing to train on in {', '.join(small)}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    self.dataset = dataset
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._first_row = process_index * self.local_batch_size
    self._eos_id = eos_id
    self._segment_ids = segment_ids
    self.heldout_rows = heldout_rows  # the last rows of each source, never read
    self.step = 0
    self._consumed = np.zeros(len(dataset.names), np.int64)  # rows taken from each source so far

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    source = sampler.mixture_draw(self.seed, self.step, self.dataset.rates, self.global_batch_size)  # [G]
    ordinal = self._consumed[source] + _rank_within_source(source)  # [G] how many rows of the source came before
    self._consumed += np.bincount(source, minlength=len(self._consumed))
    self.step += 1
    mine = slice(self._first_row, self._first_row + self.local_batch_size)
    source, ordinal = source[mine], ordinal[mine]
    input_ids = self.dataset.read(source, self._rows(source, ordinal))  # [B, T]
    batch = {"input_ids": input_ids}
    if self._segment_ids:
      batch["segment_ids"] = document_ids(input_ids, self._eos_id)
    return batch

  def get_state(self) -> dict:
    """JSON-serializable position: saved with the checkpoint, given back to `set_state`."""
    consumed = {name: int(n) for name, n in zip(self.dataset.names, self._consumed)}
    return dict(
      step=self.step,
      consumed=consumed,
      seed=self.seed,
      fingerprint=self.dataset.fingerprint,
      heldout_rows=self.heldout_rows,
    )

  def set_state(self, state: dict) -> None:
    """Continues exactly after the batch at which `state` was taken; refuses other data or seed."""
    if state["fingerprint"] != self.dataset.fingerprint:
      raise ValueError(
        f"iterator state is for prepared data {state['fingerprint'][:12]}, this run reads "
        f"{self.dataset.fingerprint[:12]} ({self.dataset.directory}): resuming would change the data order"
      )
    if state["seed"] != self.seed:
      raise ValueError(f"iterator state has seed {state['seed']}, DataConfig.seed is {self.seed}")
    if state.get("heldout_rows", 0) != self.heldout_rows:
      raise ValueError(
        f"iterator state held out {state.get('heldout_rows', 0)} rows per source, this run holds out {self.heldout_rows} "
        "(EvalConfig.heldout_rows, or 0 when EvalConfig.every_steps is 0): resuming would change the data order"
      )
    self.step = int(state["step"])
    self._consumed = np.array([state["consumed"][name] for name in self.dataset.names], np.int64)

  def _rows(self, source: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
    """Row index within each source: the ordinal-th row of the source's epoch order."""
    size = self.dataset.rows - self.heldout_rows  # [sources]
    epoch, index = np.divmod(ordinal, size[source])
    rows = np.empty_like(ordinal)
    for s, e in {(int(s), int(e)) for s, e in zip(source, epoch)}:
      at = (source == s) & (epoch == e)
      rows[at] = sampler.permute(index[at], int(size[s]), seed=self.seed, source=s, epoch=e)
    return rows


def heldout_index(dataset: shards.PreparedDataset, per_source: int) -> tuple[np.ndarray, np.ndarray]:
  """(source, row) of the rows TrainIterator(heldout_rows=per_source) never reads: each source's last ones."""
  source = np.repeat(np.arange(len(dataset.names)), per_source)
  row = np.concatenate([np.arange(n - per_source, n) for n in dataset.rows])
  return source, row


def document_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
  """segment_ids int32 [B, T]: 1 for the row's first document, +1 after each EOS.

  No positions within the document: ALiBi's bias depends only on query - key distance, which
  document masking keeps within one document, so the model needs none.
  """
  starts = np.zeros(input_ids.shape, bool)  # [B, T] a document begins here
  starts[:, 0] = True
  starts[:, 1:] = input_ids[:, :-1] == eos_id
  return np.cumsum(starts, axis=1, dtype=np.int32)


def make_train_iterator(config: TrainConfig, *, process_index: int, process_count: int) -> TrainIterator:
  """This host's iterator over `config.data`, packed to `config.seq_len`.

  The embedded corpus is prepared on first use (seconds, offline); other data must have been
  prepared with `python -m mpt_jax.data.prepare`, from the input files there are now.
  """
  data = config.data
  tokenizer = load_tokenizer(data)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f"MPTConfig.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids"
    )
  directory = shards.dataset_dir(data, config.seq_len, tokenizer)
  if not (directory / shards.MANIFEST).exists() and data.mixture in corpus.EMBEDDED:
    from mpt_jax.data import prepare  # TensorFlow, only for this one-time step

    prepare.prepare(data, config.seq_len)
  if (directory / shards.INPUTS).exists() and (changed := shards.changed_inputs(directory)):
    raise ValueError(
      f"prepared data {directory} is stale, its input files changed since: {changed}; "
      "run `python -m mpt_jax.data.prepare` with this run's data flags again"
    )
  return TrainIterator(
    shards.PreparedDataset(directory),
    seed=data.seed,
    global_batch_size=config.global_batch_size,
    process_index=process_index,
    process_count=process_count,
    eos_id=tokenizer.eos_id,
    segment_ids=data.segment_ids,
    heldout_rows=config.eval.heldout_rows if config.eval.every_steps else 0,
  )


def _rank_within_source(source: np.ndarray) -> np.ndarray:
  """For each row, how many earlier rows of the batch drew the same source."""
  rank = np.empty_like(source)
  for s in np.unique(source):
    at = source == s
    rank[at] = np.arange(at.sum())
  return rank
