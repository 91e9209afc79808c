"""Kernels on both sides of the cache, each a Triton kernel with its launcher, a plain-torch
path for the CPU, and a float64 oracle in `reference.py`:

- `sparse_kl_loss` (student side, `sparse_kl.py`): LM head + full-vocabulary log-softmax +
  divergence to a sparse teacher target, forward and backward, chunked over rows so that
  no [tokens, V] logits tensor ever exists. The divergences are one table
  (`divergences.py`).
- `teacher_head.teacher_head` (teacher side): hidden states + LM head -> log-sum-exp,
  the actual token's log-prob, top-K, and importance sampling (RS-KD) with counts and
  weights, one [C, V] block at a time.
"""

from sparsekd.kernels.divergences import DIVERGENCES
from sparsekd.kernels.sparse_kl import SparseKLConfig, sparse_kl_loss

__all__ = ["DIVERGENCES", "SparseKLConfig", "sparse_kl_loss"]
