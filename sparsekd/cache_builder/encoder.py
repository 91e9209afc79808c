"""Sparse encoder: one work unit -> the teacher's sparse view of every position.

`teacher_view(engine, enc, seed, seq_ids, input_ids, next_tokens, loss_masks, doc_starts)`
runs the teacher on the unit's documents, each one alone (`documents`: a row's documents
are the teacher's requests, so a target depends on its own document only and not on what
packing put before it; the prompt of a conversation is context) and returns, per
sequence and at its learnt positions only, the token log-probs and the `Support`:
`support_size` per learnt position, the concatenated `ids` (ascending within each
position) and the value arrays aligned with them, in their stored dtypes (schemas.modes).
On the hidden-state path the head itself runs on the learnt positions only.

Two paths (docs/format.md): `logprob` asks vLLM for prompt log-probs (top-K only);
`hidden` takes the final hidden states and applies the LM head in sparsekd's teacher-head
kernel (top-K, importance sampling, token log-probs), a chunk of positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsekd.config import check, setting
from sparsekd.schemas import format as F
from sparsekd.schemas.modes import (  # noqa: F401 (the builders, importable from here too)
    MODE_SETTINGS,
    MODES,
    NAMES,
    Mode,
    Support,
    empty,
    from_samples,
    from_topk,
    get_mode,
)

PATHS = ("auto", "logprob", "hidden")
# The top-K sizes accepted. vLLM would go to V, but its cost grows with K and nothing beyond
# a few hundred has been shown to help a student.
MAX_TOPK = 1024
MAX_SAMPLES = 65535  # counts are uint16


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    mode: str = setting(
        "topk",
        "; ".join(f"{m.name}: {m.summary}" for m in MODES.values()) + ".",
        flag=True,
        choices=NAMES,
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
        for mode in MODES.values():
            for name in mode.settings:
                check(
                    getattr(self, name) is None or self.mode == mode.name,
                    f"encoder.{name} (--{name.replace('_', '-')}) applies to --mode "
                    f"{mode.name} only, not --mode {self.mode}",
                )
        check(
            "k" not in self.spec.settings or 1 <= self.top_k <= MAX_TOPK,
            f"encoder.k must be in 1..{MAX_TOPK}, got {self.k}",
        )
        check(
            not self.spec.draws or 1 <= self.num_samples <= MAX_SAMPLES,
            f"encoder.samples must be in 1..{MAX_SAMPLES}, got {self.samples}",
        )
        check(self.tau > 0, "encoder.proposal_temperature must be > 0")
        check(
            self.path == "auto" or self.path in self.spec.paths,
            f"mode {self.mode} needs the hidden-state path (vLLM's log-prob API cannot sample "
            "the full distribution); drop --path logprob",
        )

    @property
    def spec(self) -> Mode:
        """The mode's entry in the mode table (schemas.modes)."""
        return get_mode(self.mode)

    def effective(self, name: str):
        """A mode setting's value (given, or the mode's default); None if not this mode's."""
        return self.spec.effective(name, getattr(self, name))

    @property
    def top_k(self) -> int:
        """The K the teacher head computes: 0 for a mode that stores no top-K."""
        return self.effective("k") or 0

    @property
    def num_samples(self) -> int:
        return self.effective("samples") or 0

    @property
    def tau(self) -> float:
        """The proposal temperature: 1 (the teacher itself) for a mode that draws nothing."""
        tau = self.effective("proposal_temperature")
        return 1.0 if tau is None else tau

    @property
    def draw(self) -> str | None:
        return self.effective("sampler")

    @property
    def resolved_path(self) -> str:
        return self.spec.default_path if self.path == "auto" else self.path

    @property
    def weighted(self) -> bool:
        return self.spec.weighted({n: self.effective(n) for n in self.spec.settings})

    def identity(self) -> dict:
        """The settings a cache's content depends on (effective values, None where unused)."""
        return {
            "mode": self.mode,
            **{name: self.effective(name) for name in MODE_SETTINGS},
            "weighted": self.weighted,
            "path": self.resolved_path,
        }


@dataclass
class TeacherView:
    token_logprobs: list[np.ndarray]  # per sequence, float32 [n learnt]
    supports: list[Support]  # per sequence, over its learnt positions


@dataclass
class Document:
    """One teacher request: a document of a row, read alone (schemas.format, "Documents")."""

    row: int  # the row it belongs to (index in the unit's lists)
    start: int  # its first position in the row
    tokens: np.ndarray  # int32 [m]: its tokens, through its last learnt position
    next_token: int  # the target of its last position (the row's token after it)
    learnt: np.ndarray  # bool [m]: the row's loss mask over these positions


def documents(input_ids, next_tokens, masks, doc_starts) -> list[Document]:
    """The documents of a unit's rows that hold a learnt position, in row and position
    order (so their learnt positions, concatenated, are the rows' in order). A document
    ends at its last learnt position: the teacher never computes positions nobody learns
    after it (a conversation's closing newline, the padding)."""
    docs = []
    for r, (x, nxt, mask, starts) in enumerate(zip(input_ids, next_tokens, masks, doc_starts)):
        L = len(x)
        for a, b in F.doc_spans(starts, L):
            learnt = np.flatnonzero(mask[a:b])
            if not len(learnt):
                continue
            end = a + int(learnt[-1]) + 1
            label = int(x[end]) if end < L else int(nxt)
            docs.append(Document(r, a, x[a:end], label, mask[a:end]))
    return docs


def teacher_view(
    engine, enc: EncoderConfig, seed: int, seq_ids, input_ids, next_tokens, masks, doc_starts
):
    """Run the teacher on one unit's sequences (lists of equal-length arrays; `masks`:
    bool [L] per sequence, the learnt positions; `doc_starts`: each row's documents, every
    one read alone)."""
    docs = documents(input_ids, next_tokens, masks, doc_starts)
    if enc.resolved_path == "logprob":
        return _logprob_view(engine, enc, len(input_ids), docs)
    return _hidden_view(engine, enc, seed, seq_ids, input_ids, next_tokens, masks, docs)


def _per_row(n_rows: int, docs: list[Document], parts: list) -> list[list]:
    """Each row's parts (one per document, in order)."""
    rows = [[] for _ in range(n_rows)]
    for d, part in zip(docs, parts):
        rows[d.row].append(part)
    return rows


def _logprob_view(engine, enc: EncoderConfig, n_rows: int, docs: list[Document]) -> TeacherView:
    if docs:
        tb = engine.run([d.tokens for d in docs], [d.next_token for d in docs], k=enc.top_k)
    parts = (
        []
        if not docs
        else [
            (i[d.learnt], lp[d.learnt], t[d.learnt])
            for d, i, lp, t in zip(docs, tb.topk_ids, tb.topk_logprobs, tb.token_logprobs)
        ]
    )
    view = TeacherView([], [])
    K = enc.top_k
    for row in _per_row(n_rows, docs, parts):
        ids = np.concatenate([p[0] for p in row]) if row else np.zeros((0, K), np.int32)
        lp = np.concatenate([p[1] for p in row]) if row else np.zeros((0, K), np.float32)
        tok = np.concatenate([p[2] for p in row]) if row else np.zeros(0, np.float32)
        view.supports.append(enc.spec.from_logprobs(ids, lp, tok))
        view.token_logprobs.append(tok)
    return view


def _hidden_view(
    engine, enc: EncoderConfig, seed: int, seq_ids, input_ids, next_tokens, masks, docs
):
    import torch

    from sparsekd.kernels.teacher_head import default_chunk_rows, sampling_uniforms, teacher_head

    W, b = engine.lm_head()
    L = len(input_ids[0])
    # sequences per teacher-head call: a chunk's worth of positions on the device at a time
    per_call = max(1, default_chunk_rows(W.shape[0], W.device) // L)
    view = TeacherView([], [])
    for s0 in range(0, len(input_ids), per_call):
        ids, nxt = input_ids[s0 : s0 + per_call], next_tokens[s0 : s0 + per_call]
        mine = [d for d in docs if s0 <= d.row < s0 + per_call]
        if not mine:  # nothing learnt here (rows of padding): nothing to compute
            for _ in ids:
                view.token_logprobs.append(np.zeros(0, np.float32))
                view.supports.append(empty(0))
            continue
        mask = np.concatenate(masks[s0 : s0 + per_call])
        rows = torch.from_numpy(np.flatnonzero(mask))
        states = engine.hidden([d.tokens for d in mine], [d.next_token for d in mine])
        # each document's learnt positions, in row and position order: the rows' learnt
        # positions in order
        hidden = torch.cat(
            [h[torch.from_numpy(np.flatnonzero(d.learnt))] for d, h in zip(mine, states)]
        ).to(W.device, W.dtype)  # [n, D]
        labels = torch.from_numpy(np.concatenate([F.labels_of(x, t) for x, t in zip(ids, nxt)]))
        targets = None
        if enc.spec.draws:  # the draws of every position, kept at the learnt ones
            draws = [
                sampling_uniforms(seed, int(s), L, enc.num_samples, enc.draw)
                for s in seq_ids[s0 : s0 + per_call]
            ]
            targets = torch.cat(draws)[rows]
        out = teacher_head(
            hidden,
            W,
            labels[rows].to(W.device),
            k=enc.top_k,
            targets=targets,
            tau=enc.tau,
            bias=b,
        )
        out = {
            key: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for key, v in out.items()
        }
        ends = np.cumsum([int(m.sum()) for m in masks[s0 : s0 + per_call]])
        for lo, hi in zip(np.concatenate([[0], ends[:-1]]), ends):
            part = slice(int(lo), int(hi))
            view.token_logprobs.append(out["token_logprob"][part])
            view.supports.append(enc.spec.view(out, part))
    return view
