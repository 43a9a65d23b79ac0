"""Evaluation during training: a trainer hook for the held-out loss and, optionally, ICL tasks.

Every ``EvalConfig.every_steps`` steps and at the last step, the mean next-token loss over the
held-out rows (each source's last ``heldout_rows`` rows of the prepared data, which the training
iterator never reads) is logged as ``eval/loss`` beside the training loss; each ICL task adds
``eval/<task>/accuracy``. The held-out rows go through in batches of the training micro-batch
shape (the rows of one forward pass), sharded like training batches, each process reading its
share; a last partial batch is padded with empty rows.
"""

import logging

import jax
import numpy as np
from flax import nnx

from mpt_jax import metrics, sharding
from mpt_jax.config import TrainConfig
from mpt_jax.data.iterator import TrainIterator, heldout_index
from mpt_jax.eval import icl, perplexity


class HeldoutEval:
  """The hook (trainer.Hook): evaluates at its steps, writes to ``writer``, never stops the run.

  Args:
    config: the run's config; ``config.eval`` says when and what.
    setup: the trainer's TrainSetup (graphdef, mesh, gradient accumulation).
    data_iterator: the run's TrainIterator, holding out ``config.eval.heldout_rows`` rows per source.
    writer: where eval/... metrics go.
  """

  def __init__(self, config: TrainConfig, setup, data_iterator, writer: metrics.MetricsWriter):
    if not isinstance(data_iterator, TrainIterator):
      raise ValueError(
        "EvalConfig.every_steps needs the prepared data's TrainIterator (make_train_iterator): "
        f"the held-out rows are part of it; got {type(data_iterator).__name__}"
      )
    if data_iterator.heldout_rows != config.eval.heldout_rows:
      raise ValueError(
        f"the data iterator holds out {data_iterator.heldout_rows} rows per source, "
        f"EvalConfig.heldout_rows is {config.eval.heldout_rows}"
      )
    self.config, self.setup, self.writer = config, setup, writer
    dataset = data_iterator.dataset
    rows = dataset.read(*heldout_index(dataset, config.eval.heldout_rows))  # [H, T], all processes alike
    self._batches = list(_local_batches(rows, config.global_batch_size // setup.grad_accum))
    self._icl = []
    if config.eval.icl_tasks:
      if jax.process_count() > 1:
        raise ValueError("EvalConfig.icl_tasks runs in single-process training only")
      from mpt_jax.data.tokenizer import load_tokenizer

      self._tokenizer = load_tokenizer(config.data)
      for entry in config.eval.icl_tasks:
        spec = icl.task_spec(entry, config.eval.icl_data_dir)
        self._icl.append((spec, icl.read_examples(spec)))

  def __call__(self, step: int, state) -> bool:
    if step % self.config.eval.every_steps and step != self.config.steps:
      return False
    ce_sum, count = 0.0, 0.0
    for rows in self._batches:
      batch = sharding.global_batch(rows, self.setup.mesh)
      batch_sum, batch_count = perplexity.loss_step(
        self.setup.graphdef, state.params, batch["input_ids"], batch["lengths"]
      )
      ce_sum, count = ce_sum + float(batch_sum), count + float(batch_count)
    results = {"eval/loss": ce_sum / count}
    if self._icl:
      model = nnx.merge(self.setup.graphdef, state.params)
      for spec, examples in self._icl:
        result = icl.evaluate_task(
          model,
          spec,
          examples,
          self._tokenizer,
          batch_size=self.config.eval.icl_batch_size,
          limit=self.config.eval.icl_max_examples,
          progress=False,
        )
        results[f"eval/{spec.name}/accuracy"] = result.metrics["accuracy"]
    logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    self.writer.write(step, results)
    return False


def _local_batches(rows: np.ndarray, batch_size: int):
  """This process's part of each global batch of ``batch_size`` rows: {'input_ids' [B, T], 'lengths' [B]}.

  Padding rows have length 0: they hold no tokens to predict.
  """
  per_process = batch_size // jax.process_count()
  first = jax.process_index() * per_process
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    input_ids = np.zeros((batch_size, rows.shape[1]), np.int32)
    input_ids[: len(chunk)] = chunk
    lengths = np.where(np.arange(batch_size) < len(chunk), rows.shape[1], 0).astype(np.int32)
    yield {"input_ids": input_ids[first : first + per_process], "lengths": lengths[first : first + per_process]}
