"""Sparse encoder: one work unit -> the teacher's sparse view of every position.

`teacher_view(engine, enc, seed, unit)` runs the teacher on the unit's sequences and
returns, per sequence, its token log-probs [L] and its `Support`: `support_size [L]`, the
concatenated `ids` (ascending within each position) and the value arrays aligned with
them, in their stored dtypes (see `schemas.format`).

Two paths (docs/format.md): `logprob` asks vLLM for prompt log-probs (top-K only);
`hidden` takes the final hidden states and applies the LM head in sparsekd's teacher-head
kernel (top-K, importance sampling, token log-probs), a chunk of positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsekd.config import check, setting
from sparsekd.schemas import format as F

PATHS = ("auto", "logprob", "hidden")
# The top-K sizes accepted. vLLM would go to V, but its cost grows with K and nothing beyond
# a few hundred has been shown to help a student.
MAX_TOPK = 1024
MAX_SAMPLES = 65535  # counts are uint16


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    mode: str = setting(
        "topk",
        "topk: the K most likely ids; sample: N draws from the full distribution (RS-KD); "
        "logprob: only each token's log-prob.",
        flag=True,
        choices=F.MODES,
    )
    k: int | None = setting(None, "Top-K size (mode topk; default 8).", flag=True)
    samples: int | None = setting(
        None, "Draws per position N (mode sample; default 50).", flag=True
    )
    sampler: str | None = setting(
        None,
        "iid multinomial draws (default) or systematic (same mean, less variance); mode sample.",
        flag=True,
        choices=F.SAMPLERS,
    )
    proposal_temperature: float | None = setting(
        None,
        "Draw from softmax(z / tau); tau != 1 stores importance weights (mode sample; default 1).",
        flag=True,
    )
    path: str = setting(
        "auto",
        "logprob: vLLM prompt log-probs; hidden: hidden states + sparsekd's head; auto: "
        "logprob for topk, hidden otherwise.",
        flag=True,
        choices=PATHS,
    )

    def __post_init__(self):
        for name, mode in (
            ("k", "topk"),
            ("samples", "sample"),
            ("sampler", "sample"),
            ("proposal_temperature", "sample"),
        ):
            check(
                getattr(self, name) is None or self.mode == mode,
                f"encoder.{name} (--{name.replace('_', '-')}) applies to --mode {mode} only, "
                f"not --mode {self.mode}",
            )
        check(1 <= self.top_k <= MAX_TOPK, f"encoder.k must be in 1..{MAX_TOPK}, got {self.k}")
        check(
            1 <= self.num_samples <= MAX_SAMPLES,
            f"encoder.samples must be in 1..{MAX_SAMPLES}, got {self.samples}",
        )
        check(self.tau > 0, "encoder.proposal_temperature must be > 0")
        check(
            not (self.path == "logprob" and self.mode != "topk"),
            f"mode {self.mode} needs the hidden-state path (vLLM's log-prob API cannot sample "
            "the full distribution); drop --path logprob",
        )

    @property
    def top_k(self) -> int:
        return 8 if self.k is None else self.k

    @property
    def num_samples(self) -> int:
        return 50 if self.samples is None else self.samples

    @property
    def tau(self) -> float:
        return 1.0 if self.proposal_temperature is None else self.proposal_temperature

    @property
    def draw(self) -> str:
        return self.sampler or "iid"

    @property
    def resolved_path(self) -> str:
        if self.path != "auto":
            return self.path
        return "logprob" if self.mode == "topk" else "hidden"

    @property
    def weighted(self) -> bool:
        return self.mode == "sample" and self.tau != 1.0

    def identity(self) -> dict:
        """The settings a cache's content depends on (effective values, None where unused)."""
        sample = self.mode == "sample"
        return {
            "mode": self.mode,
            "k": self.top_k if self.mode == "topk" else None,
            "samples": self.num_samples if sample else None,
            "sampler": self.draw if sample else None,
            "proposal_temperature": self.tau if sample else None,
            "weighted": self.weighted,
            "path": self.resolved_path,
        }


@dataclass
class Support:
    support_size: np.ndarray  # uint16 [L]
    ids: np.ndarray  # int32 [n]
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


@dataclass
class TeacherView:
    token_logprobs: list[np.ndarray]  # per sequence, float32 [L]
    supports: list[Support]


def teacher_view(engine, enc: EncoderConfig, seed: int, seq_ids, input_ids, next_tokens):
    """Run the teacher on one unit's sequences (lists of equal-length arrays)."""
    if enc.resolved_path == "logprob":
        tb = engine.run(input_ids, next_tokens, k=enc.top_k)
        supports = [from_topk(i, lp) for i, lp in zip(tb.topk_ids, tb.topk_logprobs)]
        return TeacherView(tb.token_logprobs, supports)
    return _hidden_view(engine, enc, seed, seq_ids, input_ids, next_tokens)


def _hidden_view(engine, enc: EncoderConfig, seed: int, seq_ids, input_ids, next_tokens):
    import torch

    from sparsekd.kernels.teacher_head import default_chunk_rows, sampling_uniforms, teacher_head

    W, b = engine.lm_head()
    L = len(input_ids[0])
    # sequences per teacher-head call: a chunk's worth of positions on the device at a time
    per_call = max(1, default_chunk_rows(W.shape[0], W.device) // L)
    view = TeacherView([], [])
    for s0 in range(0, len(input_ids), per_call):
        ids, nxt = input_ids[s0 : s0 + per_call], next_tokens[s0 : s0 + per_call]
        hidden = torch.cat(engine.hidden(ids, nxt)).to(W.device, W.dtype)  # [n * L, D]
        labels = torch.from_numpy(np.concatenate([np.append(x[1:], t) for x, t in zip(ids, nxt)]))
        targets = None
        if enc.mode == "sample":
            draws = [
                sampling_uniforms(seed, int(s), L, enc.num_samples, enc.draw)
                for s in seq_ids[s0 : s0 + per_call]
            ]
            targets = torch.cat(draws)
        out = teacher_head(
            hidden,
            W,
            labels.to(W.device),
            k=enc.top_k if enc.mode == "topk" else 0,
            targets=targets,
            tau=enc.tau,
            bias=b,
        )
        out = {
            key: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for key, v in out.items()
        }
        for i in range(len(ids)):
            rows = slice(i * L, (i + 1) * L)
            view.token_logprobs.append(out["token_logprob"][rows])
            if enc.mode == "topk":
                view.supports.append(from_topk(out["topk_ids"][rows], out["topk_logprobs"][rows]))
            elif enc.mode == "sample":
                w = out["sample_weights"][rows] if "sample_weights" in out else None
                view.supports.append(
                    from_samples(out["sample_ids"][rows], out["sample_counts"][rows], w)
                )
            else:
                view.supports.append(empty(L))
    return view
