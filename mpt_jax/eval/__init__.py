"""Evaluation: in-context-learning tasks in llm-foundry's formats, perplexity, eval during training.

  icl.py         task files, prompts as llm-foundry builds them, accuracies
  scoring.py     log-likelihoods of continuations in padded length buckets
  perplexity.py  token-weighted loss over text (JSONL, seqio), the trainer's loss definition
  training.py    the trainer hook: held-out loss (and ICL tasks) every N steps

The command line is ``python -m mpt_jax.evaluate``.
"""
