"""The training run's lifecycle: ``main``'s phases, the loop, its hooks (checkpoints, eval), sampling.

``main`` follows one data flow: config -> mesh -> data -> abstract state (shapes and
shardings, nothing allocated) -> restore or init straight into the sharded layout -> loop
{ batch -> jitted train step -> metrics -> hooks: periodic checkpoint, held-out eval }. The
step's maths (TrainState, the objective, accumulation, ``make_setup``) are
mpt_jax.train_step's, re-exported here.
"""

import contextlib
import itertools
import logging
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm
from flax import nnx

from mpt_jax import checkpoint, metrics, model_folder, paths, preemption, sharding
from mpt_jax.config import TrainConfig
from mpt_jax.lock import WorkdirLock
from mpt_jax.train_step import Batch, TrainSetup, TrainState, grad_accum_steps, make_setup, train_step

__all__ = [
  "Batch",
  "Hook",
  "TrainSetup",
  "TrainState",
  "grad_accum_steps",
  "main",
  "make_setup",
  "sample",
  "train",
  "train_step",
]

Hook = Callable[[int, TrainState], bool]  # called after each step with the steps done so far; True stops the run


@contextlib.contextmanager
def _phase(name: str):
  """Logs a phase of main and how long it took."""
  logging.info("%s ...", name)
  start = time.perf_counter()
  yield
  logging.info("%s done in %.1f s", name, time.perf_counter() - start)


def _local_rows(data_iterator: Iterator[dict[str, np.ndarray]], config: TrainConfig) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows, batch by batch, checked against the shape the mesh expects."""
  expected = (config.global_batch_size // jax.process_count(), config.seq_len)
  for rows in data_iterator:
    for name, array in rows.items():
      if array.shape != expected:
        raise ValueError(
          f"data iterator gave {name} of shape {array.shape}; expected {expected} (rows of this process, seq_len)"
        )
    yield rows


def train(
  config: TrainConfig,
  setup: TrainSetup,
  data_iterator: Iterator[dict[str, np.ndarray]],
  *,
  start_state: TrainState | None = None,
  writer: metrics.MetricsWriter | None = None,
  hooks: Sequence[Hook] = (),
) -> TrainState:
  """Optimizer steps from ``start_state.step`` (a fresh init if None) up to ``config.steps``.

  After the first step, every ``config.log_every`` steps and at the end, loss, grad norm,
  LR, tokens/s, MFU and step time go to ``writer`` and the progress bar. ``hooks`` run after
  every step, when ``data_iterator`` has yielded exactly one batch per step taken (so a
  checkpoint hook can save the iterator's position with the state); one returning True ends
  the run after that step. At each logged step, more than
  ``config.checkpoint.max_consecutive_nonfinite`` skipped (non-finite) steps in a row stop
  the run with FloatingPointError.
  """
  state = setup.init() if start_state is None else start_state
  first_step = int(state.step)
  tokens_per_step = config.global_batch_size * config.seq_len
  flops_per_token = metrics.flops_per_token(setup.n_params, config.model.n_layers, config.model.d_model, config.seq_len)
  peak = config.peak_flops or metrics.peak_flops(jax.devices()[0].device_kind)
  batches = (sharding.global_batch(rows, setup.mesh) for rows in _local_rows(data_iterator, config))
  first_batch = next(batches)
  with _phase("compile train_step"):
    train_step = setup.train_step.lower(state, first_batch).compile()
  progress = tqdm.tqdm(total=config.steps, initial=first_step, desc="train", disable=jax.process_index() != 0)
  last_log_step, last_log_time = first_step, time.perf_counter()
  for step, batch in zip(range(first_step + 1, config.steps + 1), itertools.chain([first_batch], batches)):
    state, step_metrics = train_step(state, batch)
    stop = any([hook(step, state) for hook in hooks])
    progress.update()
    if step % config.log_every and step not in (first_step + 1, config.steps) and not stop:
      continue
    step_metrics = {name: float(value) for name, value in jax.device_get(step_metrics).items()}  # waits for the step
    now = time.perf_counter()
    step_time = (now - last_log_time) / (step - last_log_step)
    tokens_per_s = tokens_per_step / step_time
    step_metrics.update(
      tokens_per_s=tokens_per_s,
      mfu=metrics.mfu(tokens_per_s, flops_per_token, jax.device_count(), peak),
      step_time_s=step_time,
    )
    last_log_step, last_log_time = step, now
    progress.set_postfix(loss=f"{step_metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
    if writer is not None:
      writer.write(step, step_metrics)
    patience = config.checkpoint.max_consecutive_nonfinite
    if patience and int(state.nonfinite_streak) >= patience:
      raise FloatingPointError(
        f"step {step}: the last {int(state.nonfinite_streak)} steps had a non-finite loss or gradient norm "
        f"(CheckpointConfig.max_consecutive_nonfinite={patience}); their updates were skipped and nothing was saved"
      )
    if stop:
      break
  progress.close()
  return state


def sample(
  config: TrainConfig, setup: TrainSetup, state: TrainState, prompt_ids: np.ndarray, *, temperature: float = 0.8
) -> list[str]:
  """Continues each prompt row by ``config.sample_tokens`` tokens; returns the decoded texts."""
  from mpt_jax.data import load_tokenizer
  from mpt_jax.generate import generate

  max_new_tokens = min(config.sample_tokens, config.model.max_seq_len - prompt_ids.shape[1])
  model = nnx.merge(setup.graphdef, state.params)
  new_tokens = generate(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, rng=state.rng)
  tokenizer = load_tokenizer(config.data)
  return [tokenizer.decode([*prompt, *new]) for prompt, new in zip(prompt_ids.tolist(), new_tokens)]


def main(config: TrainConfig, data_iterator: Iterator[dict[str, np.ndarray]] | None = None) -> TrainState:
  """The training run: mesh, data, abstract state, restore or init, loop, sample. Returns the final state.

  Holds WORKDIR/lock throughout (a second run on the workdir refuses). Resumes from the
  newest intact checkpoint in WORKDIR/checkpoints; SIGTERM checkpoints at the next step
  boundary and returns (the process then exits 0); Ctrl-C does the same, then raises
  KeyboardInterrupt.

  ``data_iterator`` replaces mpt_jax.data's (tests and benchmarks feed synthetic tokens).
  """
  sharding.initialize_distributed(config.mesh)
  with WorkdirLock(config.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _run(config, data_iterator)


def _run(config: TrainConfig, data_iterator: Iterator[dict[str, np.ndarray]] | None) -> TrainState:
  """main's phases, while this run holds the workdir."""
  with _phase("mesh"):
    mesh = sharding.make_mesh(config.mesh)
    logging.info(
      "mesh %s over %d %s devices, %d processes",
      dict(mesh.shape),
      mesh.size,
      jax.devices()[0].device_kind,
      jax.process_count(),
    )
  with _phase("data"):
    if data_iterator is None:
      from mpt_jax.data import make_train_iterator

      data_iterator = make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
  with jax.set_mesh(mesh):
    with _phase("abstract state"):
      setup = make_setup(config, mesh)
      logging.info("%s parameters; gradient accumulation %d", f"{setup.n_params:,}", setup.grad_accum)
    checkpointer = checkpoint.TrainCheckpointer(paths.workdir_path(config.workdir) / checkpoint.CHECKPOINT_DIR, config)
    try:
      with _phase("restore or init"):
        state, resumed_step = _restore_or_init(config, setup, checkpointer, data_iterator)
      if int(state.step) >= config.steps:
        logging.info("step %d of %d: nothing left to train", int(state.step), config.steps)
        return state
      writer = metrics.MetricsWriter(config.workdir, resumed_step=resumed_step, enabled=jax.process_index() == 0)
      try:
        with _phase("train"), preemption.PreemptionWatcher() as watcher:
          saver = _CheckpointHook(config, checkpointer, data_iterator, watcher)
          hooks = [saver]
          if config.eval.every_steps:
            from mpt_jax.eval.training import HeldoutEval  # not at the top: mpt_jax.eval imports this module

            hooks.append(HeldoutEval(config, setup, data_iterator, writer))
          state = train(config, setup, data_iterator, start_state=state, writer=writer, hooks=hooks)
        checkpointer.wait_until_finished()
      finally:
        writer.close()
    finally:
      checkpointer.close()
    if saver.preempted:
      logging.info(
        "%s: checkpoint of step %d written; run the same command to resume",
        "Ctrl-C" if watcher.interrupted else "SIGTERM",
        int(state.step),
      )
      if watcher.interrupted:
        raise KeyboardInterrupt
      return state
    if config.sample_tokens and jax.process_count() == 1:  # prompts are host-local numpy arrays
      with _phase("sample"):
        prompt = next(data_iterator)["input_ids"][:1, :16]  # the start of an unseen training row
        for text in sample(config, setup, state, prompt):
          logging.info("sample: %s", text)
  return state


def _data_state(data_iterator) -> dict:
  """The iterator's position, or {} for an iterator that cannot resume (synthetic data)."""
  return data_iterator.get_state() if hasattr(data_iterator, "get_state") else {}


def _restore_or_init(
  config: TrainConfig, setup: TrainSetup, checkpointer: checkpoint.TrainCheckpointer, data_iterator
) -> tuple[TrainState, int | None]:
  """(state, restored step): the newest intact checkpoint, data position included, if any; else
  (converted weights if asked, else init; None)."""
  restored = checkpointer.restore_latest(sharding.with_shardings(setup.abstract_state, setup.state_shardings))
  if restored is not None:
    if restored.data:
      data_iterator.set_state(restored.data)
    logging.info("resumed from the checkpoint of step %d in %s", restored.step, checkpointer.directory)
    if config.checkpoint.init_from:
      logging.info(
        "checkpoint.init_from=%s is not loaded again: the run started from it and resumes from its checkpoint",
        config.checkpoint.init_from,
      )
    return restored.state, restored.step
  if config.checkpoint.init_from:
    pure = model_folder.restore_params(
      config.checkpoint.init_from, config.model, nnx.to_pure_dict(setup.state_shardings.params)
    )
    params = jax.tree.map(lambda x: x, setup.abstract_state.params)
    nnx.replace_by_pure_dict(params, pure)
    logging.info("parameters from %s", config.checkpoint.init_from)
    return setup.init_from_params(params), None
  return setup.init(), None


class _CheckpointHook:
  """Saves every ``every_steps``, at the last step, and when preempted or interrupted (then stops the run)."""

  def __init__(
    self,
    config: TrainConfig,
    checkpointer: checkpoint.TrainCheckpointer,
    data_iterator,
    watcher: preemption.PreemptionWatcher,
  ):
    self.config, self.checkpointer, self.data_iterator, self.watcher = config, checkpointer, data_iterator, watcher
    self.preempted = False

  def __call__(self, step: int, state: TrainState) -> bool:
    self.preempted = self.watcher.requested()
    every = self.config.checkpoint.every_steps
    if self.preempted or step == self.config.steps or (every and step % every == 0):
      self.checkpointer.save(step, state, _data_state(self.data_iterator))
    if self.preempted:
      self.checkpointer.wait_until_finished()
    return self.preempted
