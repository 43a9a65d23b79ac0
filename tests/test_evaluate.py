"""python -m mpt_jax.evaluate: ICL tasks and perplexity in one run, a table and JSON, clear errors on bad input."""

import dataclasses
import json
import math
import pathlib

import pytest
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM, checkpoint, evaluate, model_folder
from mpt_jax.data.tokenizer import Tokenizer
from mpt_jax.eval import icl, perplexity

DATA = pathlib.Path(__file__).parent / "data" / "icl"
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 9, "A second, shorter document.", "Third one, to pack."]


@pytest.fixture
def args(converted_mpt, tokenizer_json, tmp_path):
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  return evaluate.Args(
    model=str(converted_mpt[1]),
    tokenizer=str(tokenizer_json),
    tasks=("copa", "winogrande", str(tmp_path / "docs.jsonl")),
    data_dir=str(DATA),
    max_examples=12,
    batch_size=8,
    seq_len=48,
    dtype="float32",
    output=str(tmp_path / "out" / "results.json"),
  )


def test_icl_and_perplexity_tasks_give_a_table_and_json(args, capsys):
  results = evaluate.main(args)
  table = capsys.readouterr().out
  assert [line.split()[0] for line in table.splitlines()] == ["task", "copa", "winogrande", "docs"]
  report = json.loads(pathlib.Path(args.output).read_text())
  assert report["tasks"] == results and report["model"] == args.model and report["seed"] == args.seed
  assert results["copa"]["type"] == "multiple_choice" and results["winogrande"]["type"] == "schema"
  assert results["copa"]["examples"] == 12 and results["copa"]["num_fewshot"] == 0
  # The numbers are the library's on the same inputs.
  tokenizer = Tokenizer.from_file(args.tokenizer)
  model = checkpoint.load_model(args.model, dtype="float32")
  spec = icl.task_spec("copa", DATA)
  direct = icl.evaluate_task(
    model, spec, icl.read_examples(spec), tokenizer, batch_size=8, max_length=48, limit=12, progress=False
  )
  assert results["copa"]["accuracy"] == direct.metrics["accuracy"]
  rows = perplexity.pack_documents([tokenizer.encode(t) for t in TEXTS], 48, tokenizer.eos_id)
  loss, tokens = perplexity.mean_loss(model, rows, batch_size=8, seq_len=48, progress=False)
  packed = sum(len(tokenizer.encode(t)) + 1 for t in TEXTS)  # + EOS each
  assert packed > 2 * 48 and results["docs"]["tokens"] == tokens == packed - math.ceil(
    packed / 48
  )  # all but each row's first
  assert results["docs"]["loss"] == pytest.approx(loss) and results["docs"]["perplexity"] == pytest.approx(
    math.exp(loss)
  )


def test_bad_input_exits_naming_the_problem(args, tmp_path):
  small = tmp_path / "small-vocab"
  model_folder.save_model(
    MPTForCausalLM(MPTConfig(d_model=16, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=64), rngs=nnx.Rngs(0)), small
  )
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"]}\n')
  cases = [
    (dict(model=str(tmp_path / "missing")), "--model .*missing does not exist"),
    (dict(model=str(small)), "has 50277 ids but the model's vocab_size is 64"),
    (dict(tasks=(str(broken),)), r"broken.jsonl:2: missing field 'gold'"),
    (dict(tasks=("hellaswag",)), "neither a JSONL file nor one of"),
    (dict(tasks=("copa", str(DATA / "copa.jsonl"))), "task 'copa' is given twice"),
    (dict(seq_len=4096), r"--seq-len 4096 must be in \[2, max_seq_len=1024\]"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
  ]
  for overrides, match in cases:
    with pytest.raises(SystemExit, match=match):
      evaluate.main(dataclasses.replace(args, **overrides))
  assert not pathlib.Path(args.output).exists()
