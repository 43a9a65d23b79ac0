"""`python -m mpt_jax.evaluate`: score a model on in-context-learning tasks and perplexity.

  python -m mpt_jax.evaluate --model checkpoints/mpt-1b --tokenizer gpt-neox-20b/tokenizer.json \\
      --data-dir eval_data --tasks lambada_openai piqa arc_easy arc_challenge copa winogrande --output results.json
  python -m mpt_jax.evaluate --model checkpoints/mpt-1b --tokenizer ... --tasks held_out.jsonl seqio:shakespeare

Each entry of --tasks is one of
  a standard task name  lambada_openai, piqa, arc_easy, arc_challenge, copa, winogrande: the
                        file NAME.jsonl under --data-dir, prompted as mpt_jax.eval.icl says;
  an ICL file           any JSONL in an llm-foundry format (its fields tell the type), 0-shot;
  a text file           JSONL of {"text": ...} documents: loss and perplexity, packed as training packs;
  seqio:NAME[:SPLIT]    loss and perplexity over a seqio task's rows (needs TensorFlow).
Results are printed as a table and, with --output, written as JSON.
"""

import dataclasses
import datetime
import json
import math
import pathlib
import time
from typing import Literal

from mpt_jax import checkpoint, paths
from mpt_jax.atomic import write_atomically
from mpt_jax.eval import icl, perplexity
from mpt_jax.generate import check_vocabulary


@dataclasses.dataclass(frozen=True)
class Args:
  """Evaluate a model folder on ICL tasks and perplexity."""

  model: str  # a model folder (convert/torch_to_flax.py, model_folder.save_model) or a training workdir
  tokenizer: str  # tokenizer.json the model was trained with (GPT-NeoX-20B for MPT-1B)
  tasks: tuple[str, ...]  # standard task names, JSONL files or seqio:NAME[:SPLIT] (see the module docstring)
  data_dir: str = ""  # folder holding the standard tasks' JSONL files
  num_fewshot: int | None = None  # few-shot examples for every ICL task; None: each task's default
  continuation_delimiter: str | None = None  # for every ICL task; None: each task's default
  seed: int = 1234  # few-shot draws
  batch_size: int = 16  # sequences per compiled step
  max_examples: int = 0  # examples per ICL task, rows per perplexity task; 0: all
  seq_len: int | None = None  # longest ICL sequence and perplexity row length; None: the model's max_seq_len
  seqio_data_dir: str = ""  # DataConfig.data_dir for seqio:redpajama_* tasks
  dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype
  output: str = ""  # JSON results file; "": print the table only


def main(args: Args) -> dict[str, dict]:
  """Evaluates every task; returns {task: results}. Bad input exits naming the file, line or value."""
  try:
    return _run(args)
  except (FileNotFoundError, ValueError) as error:
    raise SystemExit(f"error: {error}") from error


def _run(args: Args) -> dict[str, dict]:
  from mpt_jax.data.tokenizer import Tokenizer

  if args.batch_size < 1 or args.max_examples < 0:
    raise ValueError(
      f"--batch-size must be >= 1 and --max-examples >= 0, got {args.batch_size} and {args.max_examples}"
    )
  tasks = _read_tasks(args)  # every task file checked before the model loads
  if not paths.workdir_path(args.model).exists():  # a folder or a gs:// URL
    raise FileNotFoundError(f"--model {args.model} does not exist: give a model folder or a training workdir")
  tokenizer = Tokenizer.from_file(args.tokenizer)
  model = checkpoint.load_model(args.model, dtype=args.dtype)
  check_vocabulary(tokenizer.vocab_size, model.config.vocab_size, args.tokenizer)
  seq_len = args.seq_len or model.config.max_seq_len
  if not 2 <= seq_len <= model.config.max_seq_len:
    raise ValueError(f"--seq-len {seq_len} must be in [2, max_seq_len={model.config.max_seq_len}]")
  results = {}
  for name, (kind, task) in tasks.items():
    start = time.perf_counter()
    if kind == "icl":
      spec, examples = task
      result = icl.evaluate_task(
        model,
        spec,
        examples,
        tokenizer,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=seq_len,
        limit=args.max_examples,
      )
      metrics = dict(
        type=spec.type,
        num_fewshot=spec.num_fewshot,
        continuation_delimiter=spec.continuation_delimiter,
        **result.metrics,
      )
    else:
      rows = _text_rows(kind, task, seq_len, tokenizer, args.seqio_data_dir)
      if args.max_examples:
        rows = (row for _, row in zip(range(args.max_examples), rows))
      loss, tokens = perplexity.mean_loss(model, rows, batch_size=args.batch_size, seq_len=seq_len, desc=name)
      metrics = dict(type="perplexity", tokens=tokens, loss=loss, perplexity=math.exp(loss))
    results[name] = dict(metrics, seconds=round(time.perf_counter() - start, 2))
  print(_table(results))
  if args.output:
    _write_json(args, results)
  return results


def _read_tasks(args: Args) -> dict[str, tuple[str, object]]:
  """name -> ("icl", (spec, examples)) | ("text", path) | ("seqio", spec)."""
  tasks = {}
  for entry in args.tasks:
    if entry.startswith("seqio:"):
      name, task = entry, ("seqio", entry.removeprefix("seqio:"))
    elif _is_text_file(entry):
      name, task = pathlib.Path(entry).stem, ("text", entry)
    else:
      spec = icl.task_spec(
        entry, args.data_dir, num_fewshot=args.num_fewshot, continuation_delimiter=args.continuation_delimiter
      )
      name, task = spec.name, ("icl", (spec, icl.read_examples(spec)))
    if name in tasks:
      raise ValueError(f"task {name!r} is given twice in --tasks")
    tasks[name] = task
  if not tasks:
    raise ValueError("no task: give --tasks")
  return tasks


def _is_text_file(entry: str) -> bool:
  """A JSONL file whose first line is a {"text": ...} document (else it is read as an ICL task)."""
  path = pathlib.Path(entry)
  if path.suffix != ".jsonl" or not path.is_file():
    return False
  with open(path, encoding="utf-8") as f:
    first = next((line for line in f if line.strip()), "")
  try:
    record = json.loads(first)
  except json.JSONDecodeError:
    return False  # icl.read_examples names the line
  return isinstance(record, dict) and "text" in record


def _text_rows(kind: str, task: str, seq_len: int, tokenizer, seqio_data_dir: str):
  if kind == "seqio":
    return perplexity.seqio_rows(task, seq_len, tokenizer, seqio_data_dir)
  documents = (tokenizer.encode(text) for text in perplexity.jsonl_texts(task))
  return perplexity.pack_documents(documents, seq_len, tokenizer.eos_id)


def _table(results: dict[str, dict]) -> str:
  """One line per task; count is examples (ICL) or predicted tokens (perplexity)."""
  lines = [
    f"{'task':<24} {'type':<18} {'shots':>5} {'count':>9} {'accuracy':>8} {'acc/token':>9} {'loss':>7} {'ppl':>9} {'s':>7}"
  ]
  for name, r in results.items():
    number = lambda key, fmt: format(r[key], fmt) if key in r else "-"
    count = r.get("examples", r.get("tokens"))
    lines.append(
      f"{name:<24} {r['type']:<18} {number('num_fewshot', 'd'):>5} {count:>9} {number('accuracy', '.4f'):>8} "
      f"{number('accuracy_per_token', '.4f'):>9} {number('loss', '.4f'):>7} {number('perplexity', '.3f'):>9} "
      f"{r['seconds']:>7.1f}"
    )
  return "\n".join(lines)


def _write_json(args: Args, results: dict[str, dict]) -> None:
  """Written to a temp file and renamed: a crash leaves no half-written results."""
  report = dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    model=args.model,
    tokenizer=args.tokenizer,
    seed=args.seed,
    tasks=results,
  )
  write_atomically(args.output, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
  import tyro

  main(tyro.cli(Args))
