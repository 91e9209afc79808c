"""Sparse encoders: a teacher's output for one sequence -> the support a shard stores.

A `Support` is, for one sequence of L positions, `support_size [L]`, the concatenated `ids`
(ascending within each position) and the value arrays aligned with them, already in their
stored dtypes (see `schemas.format`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsekd.schemas import format as F


@dataclass
class Support:
    support_size: np.ndarray  # [L]
    ids: np.ndarray  # [n] int32
    values: dict  # column name -> [n] array


def from_topk(ids_LK: np.ndarray, logprobs_LK: np.ndarray) -> Support:
    L, K = ids_LK.shape
    return Support(
        np.full(L, K, dtype=np.uint16),
        ids_LK.reshape(-1).astype(np.int32),
        {F.COL_LOGPROBS: F.quantize_logprobs(logprobs_LK.reshape(-1))},
    )


def from_samples(
    ids_LN: np.ndarray, counts_LN: np.ndarray, weights_LN: np.ndarray | None = None
) -> Support:
    """Distinct sampled ids (-1 padded) with counts and optional importance weights."""
    valid = ids_LN >= 0
    values = {F.COL_COUNTS: counts_LN[valid].astype(np.uint16)}
    if weights_LN is not None:
        values[F.COL_WEIGHTS] = weights_LN[valid].astype(np.float32)
    return Support(valid.sum(1).astype(np.uint16), ids_LN[valid].astype(np.int32), values)


def empty(L: int) -> Support:
    return Support(np.zeros(L, dtype=np.uint16), np.zeros(0, dtype=np.int32), {})
