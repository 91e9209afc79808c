"""The cache modes, each defined once: one `Mode` entry holds everything the rest of sparsekd
needs to know about a mode, so a new mode is one entry here plus its teacher-head kernel:

    settings, defaults   the encoder settings that belong to it (flags of build-cache) and
                         their values when not given
    identity             the effective settings (`effective`), and whether it is weighted
    columns              the value columns stored beside `ids`, their decoding to teacher
                         probabilities, the reader's checks, what `inspect` says of it
    paths                which teacher paths can produce it, `auto`'s first (docs/format.md)
    draws                whether the teacher head draws samples for it (a top-K: setting k)
    view                 its stored support from the teacher head's output (encoder.py)
    from_logprobs        its stored support from the top-K log-probs vLLM returns (the
                         log-prob path, and --generate's capture during generation), or
                         None: vLLM cannot give it

The modes:

    topk     the K most likely ids and their log-probs (quantised): a head of the teacher,
             summing to <= 1 (inspect reports the tail mass outside it)
    sample   N draws from the teacher (Random Sampling KD) as distinct ids with counts,
             and importance weights p / r when drawn from a tempered proposal r: an
             unbiased estimate of p (inspect estimates the entropy from unweighted draws)
    logprob  no support: only each learnt position's token log-prob (the cheap pass of a
             MiniPLM reference model)

No code outside this file compares a mode's name: it asks the entry (`get_mode`).

Shapes: n stored ids of one sequence (concatenated over its learnt positions); P positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sparsekd.schemas import format as F

# Every mode setting, in the order of a cache's identity (each belongs to one mode).
MODE_SETTINGS = ("k", "samples", "sampler", "proposal_temperature")


@dataclass
class Support:
    """The stored targets of P positions, in their stored dtypes."""

    support_size: np.ndarray  # uint16 [P]
    ids: np.ndarray  # int32 [n], ascending within each position
    values: dict  # value column -> [n] array


def from_topk(ids_PK: np.ndarray, logprobs_PK: np.ndarray) -> Support:
    P, K = ids_PK.shape
    return Support(
        np.full(P, K, dtype=np.uint16),
        ids_PK.reshape(-1).astype(np.int32),
        {F.COL_LOGPROBS: F.quantize_logprobs(logprobs_PK.reshape(-1))},
    )


def from_samples(
    ids_PN: np.ndarray, counts_PN: np.ndarray, weights_PN: np.ndarray | None = None
) -> Support:
    """Distinct sampled ids (-1 padded) with counts and optional importance weights."""
    valid = ids_PN >= 0
    values = {F.COL_COUNTS: counts_PN[valid].astype(np.uint16)}
    if weights_PN is not None:
        values[F.COL_WEIGHTS] = weights_PN[valid].astype(np.float32)
    return Support(valid.sum(1).astype(np.uint16), ids_PN[valid].astype(np.int32), values)


def empty(P: int) -> Support:
    return Support(np.zeros(P, dtype=np.uint16), np.zeros(0, dtype=np.int32), {})


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str  # the CLI help
    settings: tuple[str, ...]  # encoder settings that apply to this mode only (MODE_SETTINGS)
    defaults: dict  # their values when not given
    columns: Callable[[bool], tuple[str, ...]]  # (weighted) -> value columns aligned with ids
    decode: Callable[[dict, dict], np.ndarray]  # (values [n] by column, meta) -> probs [n]
    check: Callable[[np.ndarray, dict, dict], str]  # (position starts, values, meta) -> problem
    describe: Callable[[dict], str]  # meta -> what inspect says of the support
    truncated: bool  # the support is the teacher's head: inspect reports the tail mass
    draws: bool  # the support is draws: the head samples; inspect estimates the entropy
    paths: tuple[str, ...]  # teacher paths that can produce it; the first is `auto`'s
    view: Callable[[dict, slice], Support]  # (teacher-head output, rows) -> its support
    # (ids [P, K], log-probs [P, K], token log-probs [P]) from vLLM -> its support
    from_logprobs: Callable | None = None
    weighted_by: Callable[[dict], bool] = field(default=lambda values: False)

    @property
    def has_support(self) -> bool:
        return bool(self.columns(False))

    @property
    def default_path(self) -> str:
        return self.paths[0]

    def effective(self, name: str, given):
        """A mode setting's value: as given, else this mode's default; None for a setting
        of another mode."""
        if name not in self.settings:
            return None
        return self.defaults[name] if given is None else given

    def weighted(self, settings: dict) -> bool:
        """Does it store importance weights, with these effective settings?"""
        return self.weighted_by(settings)


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


def _view_sample(out: dict, rows: slice) -> Support:
    w = out["sample_weights"][rows] if "sample_weights" in out else None
    return from_samples(out["sample_ids"][rows], out["sample_counts"][rows], w)


_nothing = lambda starts, values, meta: ""  # noqa: E731

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "topk",
            "the K most likely ids",
            settings=("k",),
            defaults={"k": 8},
            columns=lambda weighted: (F.COL_LOGPROBS,),
            decode=_decode_topk,
            check=_nothing,
            describe=lambda meta: f"K = {meta.get('k')}",
            truncated=True,
            draws=False,
            paths=("logprob", "hidden"),
            view=lambda out, rows: from_topk(out["topk_ids"][rows], out["topk_logprobs"][rows]),
            from_logprobs=lambda ids, lp, tok: from_topk(ids, lp),
        ),
        Mode(
            "sample",
            "N draws from the full distribution (RS-KD)",
            settings=("samples", "sampler", "proposal_temperature"),
            defaults={"samples": 50, "sampler": "iid", "proposal_temperature": 1.0},
            columns=lambda weighted: (F.COL_COUNTS,) + ((F.COL_WEIGHTS,) if weighted else ()),
            decode=_decode_sample,
            check=_check_sample,
            describe=lambda meta: f"N = {meta.get('samples')} draws",
            truncated=False,
            draws=True,
            paths=("hidden",),
            view=_view_sample,
            weighted_by=lambda s: s["proposal_temperature"] != 1.0,
        ),
        Mode(
            "logprob",
            "only each token's log-prob",
            settings=(),
            defaults={},
            columns=lambda weighted: (),
            decode=lambda values, meta: np.zeros(0, dtype=np.float32),
            check=_nothing,
            describe=lambda meta: "token log-probs only",
            truncated=False,
            draws=False,
            paths=("hidden",),
            view=lambda out, rows: empty(len(out["token_logprob"][rows])),
            from_logprobs=lambda ids, lp, tok: empty(len(tok)),
        ),
    )
}
NAMES = tuple(MODES)


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode must be one of {NAMES}, got {name!r}")
    return MODES[name]


def arrow_schema(mode: str, weighted: bool = False, **kwargs):
    """The Arrow schema of a shard of this mode (format.arrow_schema with its value
    columns)."""
    return F.arrow_schema(get_mode(mode).columns(weighted), **kwargs)
