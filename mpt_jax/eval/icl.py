"""In-context-learning tasks in llm-foundry's JSONL formats: reading, prompting, accuracy.

Three task types, one JSON object per line (llm-foundry's llmfoundry/eval/datasets):
  language_modeling  {context, continuation}: correct when the greedy continuation is
                     `continuation` token for token (LAMBADA).
  multiple_choice    {query, choices, gold}: the choice with the highest log-likelihood after
                     the query wins (PIQA, ARC, COPA).
  schema             {context_options, continuation, gold}: the context option under which the
                     continuation is most likely wins (Winogrande).

Prompts are built as llm-foundry builds them, text and tokenization boundaries included:
string fields stripped; the prompt string and few-shot examples form a preamble tokenized on its
own; each few-shot example is `[example_delimiter] context continuation_delimiter answer`;
the scored example's context is `[example_delimiter] context continuation_delimiter`,
right-stripped, and its answer gets a leading space (GPT-NeoX's BPE tokenizes " a" as one
token). Schema contexts are `context_option` alone (0-shot) or `example_delimiter
context_option continuation_delimiter.rstrip()` after a preamble. A context too long for the
model is cut from the left. Few-shot examples are drawn per example from a seed (not
llm-foundry's generator), never the example itself.
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mpt_jax.eval import scoring
from mpt_jax.eval.scoring import Request

TASK_TYPES = ("language_modeling", "multiple_choice", "schema")
_FIELDS = {  # task type -> {field: its JSON type}
  "language_modeling": {"context": str, "continuation": str},
  "multiple_choice": {"query": str, "choices": list, "gold": int},
  "schema": {"context_options": list, "continuation": str, "gold": int},
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One ICL task: a JSONL file in an llm-foundry format and how examples are prompted."""

  name: str
  path: str
  type: str  # one of TASK_TYPES
  num_fewshot: int = 0  # solved examples before each scored one
  continuation_delimiter: str = ""  # between context and answer, e.g. "\nAnswer: "
  example_delimiter: str = "\n"  # between examples
  prompt_string: str = ""  # once, before the few-shot examples


# The six tasks MPT models were reported on and their default prompting (task_spec's arguments override it).
STANDARD_TASKS = {
  "lambada_openai": dict(type="language_modeling"),
  "piqa": dict(type="multiple_choice", num_fewshot=10, continuation_delimiter="\nAnswer: "),
  "arc_easy": dict(type="multiple_choice", num_fewshot=10, continuation_delimiter="\nAnswer: "),
  "arc_challenge": dict(type="multiple_choice", num_fewshot=10, continuation_delimiter="\nAnswer: "),
  "copa": dict(type="multiple_choice"),
  "winogrande": dict(type="schema"),
}


class Example(NamedTuple):
  """A scored example: one request (language_modeling) or one per choice / context option."""

  requests: list[Request]
  gold: int  # index of the right request; 0 for language_modeling


class TaskResult(NamedTuple):
  """What evaluate_task found."""

  metrics: dict[str, float]  # examples, accuracy (+ accuracy_per_token for multiple_choice and schema)
  correct: dict[str, np.ndarray]  # per accuracy metric, bool [examples]: see correct()
  loglik: list[np.ndarray]  # per example: the log-likelihood of each of its requests
  greedy: list[np.ndarray]  # per example: whether greedy decoding reproduces each request's continuation


def task_spec(
  entry: str,
  data_dir: str | os.PathLike = "",
  *,
  num_fewshot: int | None = None,
  continuation_delimiter: str | None = None,
) -> TaskSpec:
  """A TaskSpec from a standard task name (its file under ``data_dir``) or a JSONL path.

  A file named like a standard task gets that task's prompting; other files are 0-shot with no
  delimiter, their type told by the first line's fields. The keyword arguments override.
  """
  path = pathlib.Path(entry)
  if entry in STANDARD_TASKS:
    if not data_dir:
      raise ValueError(f"task {entry!r} is a standard task name: give the folder of its {entry}.jsonl (--data-dir)")
    path = pathlib.Path(data_dir) / f"{entry}.jsonl"
  elif path.suffix != ".jsonl":
    raise ValueError(f"task {entry!r} is neither a JSONL file nor one of {tuple(STANDARD_TASKS)}")
  if not path.is_file():
    raise FileNotFoundError(f"task file {path} does not exist")
  settings = dict(STANDARD_TASKS.get(path.stem, {}))
  settings.setdefault("type", infer_type(path))
  if num_fewshot is not None:
    settings["num_fewshot"] = num_fewshot
  if continuation_delimiter is not None:
    settings["continuation_delimiter"] = continuation_delimiter
  if settings.get("num_fewshot", 0) < 0:
    raise ValueError(f"num_fewshot must be >= 0, got {settings['num_fewshot']}")
  return TaskSpec(name=path.stem, path=str(path), **settings)


def infer_type(path: pathlib.Path) -> str:
  """The task type whose fields the file's first non-blank line has."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        fields = set(_parse(line, path, number))
        for task_type, expected in _FIELDS.items():
          if expected.keys() <= fields:
            return task_type
        raise ValueError(
          f"{path}:{number}: fields {sorted(fields)} match no ICL task type; expected one of "
          + "; ".join(f"{t}: {sorted(f)}" for t, f in _FIELDS.items())
        )
  raise ValueError(f"{path} has no examples")


def read_examples(spec: TaskSpec) -> list[dict]:
  """The file's examples, each checked against the task type (errors name the line), strings stripped."""
  if spec.type not in TASK_TYPES:
    raise ValueError(f"task {spec.name}: type {spec.type!r} is not one of {TASK_TYPES}")
  examples = []
  with open(spec.path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        examples.append(_check_example(_parse(line, spec.path, number), spec, number))
  if not examples:
    raise ValueError(f"{spec.path} has no examples")
  return examples


def _parse(line: str, path, number: int) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
  if not isinstance(row, dict):
    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
  return row


def _check_example(row: dict, spec: TaskSpec, number: int) -> dict:
  where = f"{spec.path}:{number}"
  for field, kind in _FIELDS[spec.type].items():
    if field not in row:
      raise ValueError(f"{where}: missing field {field!r} ({spec.type} needs {sorted(_FIELDS[spec.type])})")
    if not isinstance(row[field], kind) or isinstance(row[field], bool):
      raise ValueError(f"{where}: {field!r} must be a {kind.__name__}, got {row[field]!r:.60}")
  options = row.get("choices", row.get("context_options"))
  if options is not None:
    if len(options) < 2 or not all(isinstance(o, str) for o in options):
      raise ValueError(f"{where}: {'choices' if 'choices' in row else 'context_options'} must be 2 or more strings")
    if not 0 <= row["gold"] < len(options):
      raise ValueError(f"{where}: gold={row['gold']} is not an index of its {len(options)} options")
  return {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


def fewshot_indices(n: int, k: int, index: int, seed: int) -> list[int]:
  """``min(k, n - 1)`` distinct examples for example ``index`` of ``n``, never ``index`` itself.

  Drawn from (seed, index) alone, so an example's prompt does not depend on which others are scored.
  """
  k = min(k, n - 1)
  others = np.random.default_rng([seed, index]).choice(n - 1, size=k, replace=False)
  return [int(i) + (i >= index) for i in others]


def build_examples(
  spec: TaskSpec, examples: Sequence[dict], tokenizer, *, seed: int, max_length: int, limit: int = 0
) -> list[Example]:
  """Token sequences to score for the first ``limit`` examples (0: all), few-shot drawn from all of them."""
  prefix_space = len(tokenizer.encode(" a")) == 1
  built = []
  for index in range(min(limit or len(examples), len(examples))):
    preamble = spec.prompt_string
    if spec.num_fewshot:
      for shot in fewshot_indices(len(examples), spec.num_fewshot, index, seed):
        preamble += _solved(spec, examples[shot], preamble)
    example = examples[index]
    contexts, answers, gold = _unsolved(spec, example, preamble)
    preamble_ids = tokenizer.encode(preamble)
    encoded = {context: preamble_ids + tokenizer.encode(context) for context in set(contexts)}
    if not all(encoded.values()):
      raise ValueError(f"{spec.path}: example {index} has an empty context: nothing to predict its answer from")
    requests = []
    for context, answer in zip(contexts, answers):
      continuation = tokenizer.encode(answer if answer.startswith(" ") or not prefix_space else " " + answer)
      if not continuation:
        raise ValueError(f"{spec.path}: example {index} has an empty answer")
      if len(continuation) >= max_length:
        raise ValueError(
          f"{spec.path}: example {index}'s answer has {len(continuation)} tokens, "
          f"too many for sequences of at most {max_length}"
        )
      requests.append(Request(_left_cut(encoded[context], max_length - len(continuation)), continuation))
    built.append(Example(requests, gold))
  return built


def _unsolved(spec: TaskSpec, example: dict, preamble: str) -> tuple[list[str], list[str], int]:
  """(context per request, answer per request, gold request) of the example to score."""
  if spec.type == "schema":
    contexts = [_schema_context(spec, option, preamble) for option in example["context_options"]]
    return contexts, [example["continuation"]] * len(contexts), example["gold"]
  delimiter = spec.example_delimiter if preamble else ""
  if spec.type == "multiple_choice":
    context = f"{delimiter}{example['query']}{spec.continuation_delimiter}".rstrip()
    return [context] * len(example["choices"]), example["choices"], example["gold"]
  return [f"{delimiter}{example['context']}{spec.continuation_delimiter}".rstrip()], [example["continuation"]], 0


def _left_cut(tokens: list[int], keep: int) -> list[int]:
  return tokens[len(tokens) - keep :] if len(tokens) > keep else tokens


def _solved(spec: TaskSpec, example: dict, preceding: str) -> str:
  """A few-shot example with its answer, as it appears in the preamble."""
  delimiter = spec.example_delimiter if preceding else ""
  if spec.type == "schema":
    context, answer = example["context_options"][example["gold"]], example["continuation"]
  elif spec.type == "multiple_choice":
    context, answer = example["query"], example["choices"][example["gold"]]
  else:
    context, answer = example["context"], example["continuation"]
  return f"{delimiter}{context}{spec.continuation_delimiter}{answer}"


def _schema_context(spec: TaskSpec, option: str, preamble: str) -> str:
  if preamble:
    return f"{spec.example_delimiter}{option}{spec.continuation_delimiter.rstrip()}"
  return option


def correct(
  spec: TaskSpec, examples: Sequence[Example], loglik: Sequence[np.ndarray], greedy: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
  """Which examples the model gets right, bool [examples] per metric, from each request's scores.

  language_modeling: accuracy = the greedy continuation is exact. multiple_choice / schema:
  accuracy = the gold request has the highest summed log-likelihood; accuracy_per_token = the
  highest mean log-likelihood per token (lowest perplexity: llm-foundry's
  InContextLearningMultipleChoiceAccuracy). Ties go to the first request, as there.
  """
  if spec.type == "language_modeling":
    return {"accuracy": np.array([g[0] for g in greedy])}
  lengths = [np.array([len(r.continuation) for r in e.requests]) for e in examples]
  return {
    "accuracy": np.array([np.argmax(ll) == e.gold for e, ll in zip(examples, loglik)]),
    "accuracy_per_token": np.array([np.argmax(ll / n) == e.gold for e, ll, n in zip(examples, loglik, lengths)]),
  }


def evaluate_task(
  model,
  spec: TaskSpec,
  examples: Sequence[dict],
  tokenizer,
  *,
  seed: int = 1234,
  batch_size: int = 16,
  max_length: int | None = None,
  limit: int = 0,
  progress: bool = True,
) -> TaskResult:
  """Scores the task's first ``limit`` examples (0: all) with ``model``.

  Args:
    model: an MPTForCausalLM whose vocabulary covers ``tokenizer``'s ids.
    spec: the task (task_spec).
    examples: its examples (read_examples).
    tokenizer: encodes text without special tokens (mpt_jax.data.Tokenizer).
    seed: few-shot draws.
    batch_size: sequences per compiled scoring step.
    max_length: longest sequence (contexts are cut from the left to fit); None: max_seq_len.
    limit: examples scored; few-shot examples still come from the whole file.
    progress: show a progress bar.
  """
  max_length = max_length or model.config.max_seq_len
  built = build_examples(spec, examples, tokenizer, seed=seed, max_length=max_length, limit=limit)
  requests = [r for e in built for r in e.requests]
  scores = scoring.score(
    model, requests, batch_size=batch_size, max_length=max_length, desc=spec.name, progress=progress
  )
  split = np.cumsum([len(e.requests) for e in built])[:-1]
  loglik, greedy = np.split(scores.loglik, split), np.split(scores.greedy, split)
  right = correct(spec, built, loglik, greedy)
  metrics = {"examples": len(built), **{name: float(np.mean(values)) for name, values in right.items()}}
  return TaskResult(metrics, right, loglik, greedy)
