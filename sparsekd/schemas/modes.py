"""The cache modes, each defined once: what it stores per id, how a reader turns that into
teacher probabilities, what a reader checks, which settings belong to it, and what
`inspect` reports for it. The writer, the reader, the encoder's settings and `inspect`
all take them from here, so a new mode is one entry (and its encoder).

    topk     the K most likely ids and their log-probs (quantised): a head of the teacher,
             summing to <= 1 (inspect reports the tail mass outside it)
    sample   N draws from the teacher (Random Sampling KD) as distinct ids with counts,
             and importance weights p / r when drawn from a tempered proposal r: an
             unbiased estimate of p (inspect estimates the entropy from unweighted draws)
    logprob  no support: only each learnt position's token log-prob (the cheap pass of a
             MiniPLM reference model)

Shapes: n stored ids of one sequence (concatenated over its learnt positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sparsekd.schemas import format as F


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str  # the CLI help
    settings: tuple[str, ...]  # encoder settings that apply to this mode only
    columns: Callable[[bool], tuple[str, ...]]  # (weighted) -> value columns aligned with ids
    decode: Callable[[dict, dict], np.ndarray]  # (values [n] by column, meta) -> probs [n]
    check: Callable[[np.ndarray, dict, dict], str]  # (position starts, values, meta) -> problem
    describe: Callable[[dict], str]  # meta -> what inspect says of the support
    truncated: bool  # the support is the teacher's head: inspect reports the tail mass
    draws: bool  # the support is draws: inspect estimates the entropy (unweighted)

    @property
    def has_support(self) -> bool:
        return bool(self.columns(False))


def _decode_topk(values: dict, meta: dict) -> np.ndarray:
    return np.exp(F.dequantize_logprobs(values[F.COL_LOGPROBS], meta["logprob_scale"]))


def _decode_sample(values: dict, meta: dict) -> np.ndarray:
    probs = values[F.COL_COUNTS].astype(np.float32) / np.float32(meta["samples"])
    if F.COL_WEIGHTS in values:
        probs = probs * values[F.COL_WEIGHTS]
    return probs


def _check_sample(starts: np.ndarray, values: dict, meta: dict) -> str:
    counts = values[F.COL_COUNTS].astype(np.int64)
    if not len(counts):
        return ""
    per_position = np.add.reduceat(counts, np.flatnonzero(starts))
    if np.any(counts < 1) or np.any(per_position != meta["samples"]):
        return f"counts do not sum to N = {meta['samples']} per position"
    return ""


_nothing = lambda starts, values, meta: ""  # noqa: E731

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "topk",
            "the K most likely ids",
            ("k",),
            lambda weighted: (F.COL_LOGPROBS,),
            _decode_topk,
            _nothing,
            lambda meta: f"K = {meta.get('k')}",
            truncated=True,
            draws=False,
        ),
        Mode(
            "sample",
            "N draws from the full distribution (RS-KD)",
            ("samples", "sampler", "proposal_temperature"),
            lambda weighted: (F.COL_COUNTS,) + ((F.COL_WEIGHTS,) if weighted else ()),
            _decode_sample,
            _check_sample,
            lambda meta: f"N = {meta.get('samples')} draws",
            truncated=False,
            draws=True,
        ),
        Mode(
            "logprob",
            "only each token's log-prob",
            (),
            lambda weighted: (),
            lambda values, meta: np.zeros(0, dtype=np.float32),
            _nothing,
            lambda meta: "token log-probs only",
            truncated=False,
            draws=False,
        ),
    )
}
assert tuple(MODES) == F.MODES


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode must be one of {F.MODES}, got {name!r}")
    return MODES[name]
