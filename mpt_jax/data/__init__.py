"""Training data: tokenizer, seqio Tasks and the RedPajama mixture, prepare/pack, the iterator.

Importing this package loads no TensorFlow: only `tasks` and `prepare` (run once, offline)
do, so training reads prepared shards on machines without it.
"""

from mpt_jax.data.iterator import TrainIterator, make_train_iterator
from mpt_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "TrainIterator", "load_tokenizer", "make_train_iterator"]
