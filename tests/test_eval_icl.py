"""ICL evaluation: 100 real examples of each task against an independent computation with
transformers' MptForCausalLM on the converted model; task files, few-shot draws, bad lines."""

import json
import pathlib

import numpy as np
import pytest
import tokenizers
import torch

from mpt_jax import checkpoint
from mpt_jax.data.tokenizer import Tokenizer
from mpt_jax.eval import icl

DATA = pathlib.Path(__file__).parent / "data" / "icl"
# Few-shot counts kept small for the CPU; piqa and the ARC sets keep their "\nAnswer: " delimiter.
SHOTS = {"lambada_openai": 0, "piqa": 1, "arc_easy": 0, "arc_challenge": 1, "copa": 2, "winogrande": 1}
SEED = 11
FOLD = 4099  # GPT-NeoX ids are folded into this many: see _Folded


class _Folded:
  """The real GPT-NeoX tokenizer with every id taken modulo FOLD.

  Texts, spacing and token boundaries stay the real tokenizer's; only the id space shrinks, so
  the test model's output head (most of the CPU time of scoring) is 12x smaller. Both sides of
  the comparison see the same folded ids.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer, self.eos_id, self.vocab_size = tokenizer, tokenizer.eos_id, FOLD

  def encode(self, text: str) -> list[int]:
    return [i % FOLD for i in self.tokenizer.encode(text)]


def _reference_requests(
  task: str, rows: list[dict], encode, spec: icl.TaskSpec
) -> list[tuple[list[list[int]], list[list[int]], int]]:
  """Per example (contexts, continuations, gold), written from llm-foundry's InContextLearning*Dataset code."""
  rows = [{k: v.strip() if isinstance(v, str) else v for k, v in row.items()} for row in rows]  # strip_data
  delimiter, between = spec.continuation_delimiter, spec.example_delimiter
  out = []
  for index, row in enumerate(rows):
    preamble = ""
    for shot in icl.fewshot_indices(len(rows), spec.num_fewshot, index, SEED):
      example = rows[shot]
      lead = between if preamble else ""
      if spec.type == "schema":
        preamble += lead + example["context_options"][example["gold"]] + delimiter + example["continuation"]
      elif spec.type == "multiple_choice":
        preamble += lead + example["query"] + delimiter + example["choices"][example["gold"]]
      else:
        preamble += lead + example["context"] + delimiter + example["continuation"]
    lead = between if preamble else ""
    if spec.type == "schema":
      contexts = [lead + option + delimiter.rstrip() if preamble else option for option in row["context_options"]]
      answers, gold = [" " + row["continuation"]] * len(contexts), row["gold"]
    elif spec.type == "multiple_choice":
      answers, gold = [" " + choice for choice in row["choices"]], row["gold"]
      contexts = [(lead + row["query"] + delimiter).rstrip()] * len(answers)
    else:
      contexts, answers, gold = [(lead + row["context"] + delimiter).rstrip()], [" " + row["continuation"]], 0
    out.append(([encode(preamble) + encode(c) for c in contexts], [encode(a) for a in answers], gold))
  return out


def _transformers_scores(hf, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
  """Per (context, continuation): log p(continuation | context) and whether greedy decoding gives it.

  Right-padded batches of 64 with an attention mask: causal attention keeps padding out of every real position.
  """
  out = []
  for start in range(0, len(requests), 64):
    batch = requests[start : start + 64]
    width = max(len(c) + len(t) for c, t in batch)
    ids, mask = torch.zeros((len(batch), width), dtype=torch.long), torch.zeros((len(batch), width), dtype=torch.long)
    for row, (context, continuation) in enumerate(batch):
      ids[row, : len(context) + len(continuation)] = torch.tensor(context + continuation)
      mask[row, : len(context) + len(continuation)] = 1
    with torch.no_grad():
      logits = hf(ids, attention_mask=mask).logits.double()
    for row, (context, continuation) in enumerate(batch):
      predicting = logits[row, len(context) - 1 : len(context) + len(continuation) - 1]
      targets = torch.tensor(continuation)
      log_probs = torch.log_softmax(predicting, dim=-1)[torch.arange(len(continuation)), targets]
      out.append((float(log_probs.sum()), bool((predicting.argmax(-1) == targets).all())))
  return out


@pytest.fixture(scope="module")
def setup(convert_random_mpt, tokenizer_json):
  hf, folder = convert_random_mpt(FOLD)
  return (
    hf,
    checkpoint.load_model(folder, dtype="float32", attn_impl="xla"),
    _Folded(Tokenizer.from_file(tokenizer_json)),
  )


@pytest.mark.parametrize("task", list(SHOTS))
def test_loglikelihoods_and_accuracy_match_transformers(setup, tokenizer_json, task):
  hf, model, tokenizer = setup
  spec = icl.task_spec(task, DATA, num_fewshot=SHOTS[task])
  examples = icl.read_examples(spec)
  assert len(examples) == 100 and spec.type == icl.STANDARD_TASKS[task]["type"]
  result = icl.evaluate_task(model, spec, examples, tokenizer, seed=SEED, batch_size=8, progress=False)

  raw = tokenizers.Tokenizer.from_file(str(tokenizer_json))
  encode = lambda text: [i % FOLD for i in raw.encode(text, add_special_tokens=False).ids]
  rows = [json.loads(line) for line in (DATA / f"{task}.jsonl").read_text().splitlines()]
  reference = _reference_requests(task, rows, encode, spec)
  scores = iter(
    _transformers_scores(hf, [r for contexts, continuations, _ in reference for r in zip(contexts, continuations)])
  )
  correct, correct_per_token = [], []
  for (contexts, continuations, gold), loglik, greedy in zip(reference, result.loglik, result.greedy):
    scores_of_example = [next(scores) for _ in contexts]
    theirs = np.array([s[0] for s in scores_of_example])
    np.testing.assert_allclose(loglik, theirs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(greedy, [s[1] for s in scores_of_example])
    correct.append(scores_of_example[0][1] if spec.type == "language_modeling" else np.argmax(theirs) == gold)
    correct_per_token.append(np.argmax(theirs / np.array([len(t) for t in continuations])) == gold)
  assert result.metrics["examples"] == 100
  np.testing.assert_array_equal(result.correct["accuracy"], correct)  # example by example
  assert result.metrics["accuracy"] == np.mean(correct)
  if spec.type != "language_modeling":
    np.testing.assert_array_equal(result.correct["accuracy_per_token"], correct_per_token)
    assert result.metrics["accuracy_per_token"] == np.mean(correct_per_token)


def test_contexts_are_cut_from_the_left_to_fit(setup):
  _, model, tokenizer = setup
  spec = icl.task_spec("lambada_openai", DATA)
  examples = icl.read_examples(spec)[:5]
  full = icl.build_examples(spec, examples, tokenizer, seed=0, max_length=1024)
  cut = icl.build_examples(spec, examples, tokenizer, seed=0, max_length=24)
  for a, b in zip(full, cut):
    (whole,), (short,) = a.requests, b.requests
    assert short.continuation == whole.continuation
    assert len(short.context) + len(short.continuation) == 24 and short.context == whole.context[-len(short.context) :]


@pytest.mark.parametrize("n,k", [(2, 5), (10, 3), (100, 10)])
def test_fewshot_draws_never_include_the_example_and_depend_on_the_seed(n, k):
  for index in range(n):
    shots = icl.fewshot_indices(n, k, index, seed=3)
    assert len(shots) == min(k, n - 1) == len(set(shots)) and index not in shots and all(0 <= s < n for s in shots)
    assert shots == icl.fewshot_indices(n, k, index, seed=3)
  if n > k + 1:  # there is a choice to make
    assert any(icl.fewshot_indices(n, k, i, seed=3) != icl.fewshot_indices(n, k, i, seed=4) for i in range(n))


def test_standard_names_and_files_get_their_prompting(tmp_path):
  spec = icl.task_spec("piqa", DATA)
  assert (spec.type, spec.num_fewshot, spec.continuation_delimiter) == ("multiple_choice", 10, "\nAnswer: ")
  other = tmp_path / "mine.jsonl"
  other.write_text(json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 1}) + "\n")
  assert icl.task_spec(str(other), continuation_delimiter=":") == icl.TaskSpec("mine", str(other), "schema", 0, ":")


@pytest.mark.parametrize(
  "line,match",
  [
    ('{"query": "q", "choices": ["a", "b"], "gold": 1', r"mine.jsonl:3: not valid JSON"),
    ('["q", "a"]', r"mine.jsonl:3: expected a JSON object"),
    ('{"query": "q", "choices": ["a", "b"]}', r"mine.jsonl:3: missing field 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', r"mine.jsonl:3: gold=2 is not an index of its 2 options"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', r"mine.jsonl:3: choices must be 2 or more strings"),
    ('{"query": 7, "choices": ["a", "b"], "gold": 0}', r"mine.jsonl:3: 'query' must be a str"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', r"mine.jsonl:3: 'gold' must be a int"),
  ],
)
def test_malformed_lines_are_named(tmp_path, line, match):
  good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
  path = tmp_path / "mine.jsonl"
  path.write_text(f"{good}\n\n{line}\n{good}\n")
  with pytest.raises(ValueError, match=match):
    icl.read_examples(icl.task_spec(str(path)))


def test_unknown_tasks_are_refused(tmp_path):
  with pytest.raises(ValueError, match="neither a JSONL file nor one of"):
    icl.task_spec("hellaswag", DATA)
  with pytest.raises(ValueError, match="give the folder"):
    icl.task_spec("piqa")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    icl.task_spec("piqa", tmp_path)
  (tmp_path / "odd.jsonl").write_text('{"question": "q"}\n')
  with pytest.raises(ValueError, match=r"odd.jsonl:1: fields \['question'\] match no ICL task type"):
    icl.task_spec(str(tmp_path / "odd.jsonl"))
