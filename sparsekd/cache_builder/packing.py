"""Packing: a domain's documents -> rows of L + 1 tokens and their loss masks -> work units.

Every row records where its documents begin (`Row.doc_starts`, schemas.format): the
teacher reads each document alone and the student sees the same boundaries.

Text (`pack`). Every document is tokenised without special tokens and followed by EOS;
the documents are concatenated; sequence i is `stream[i L : (i+1) L]` and its
`next_token` is `stream[(i+1) L]` (so the last position of every sequence has a real
target). Every position is learnt. The incomplete tail of each domain is dropped (L / 2
tokens per domain on average: 0.01 % of a 32 MiB domain at L = 2048). With document
attention, a document of the row begins at the EOS that ends the one before it (the EOS is
the next document's first token, as a BOS would be): the last token of a document predicts
its EOS from the document alone, and the EOS predicts the next document's first token from
nothing before it. A row's first document may continue one begun in the row before (the
stream is cut every L tokens), and is read from the row's start. With row attention
(`corpus.attention = row`), a row is one document.

Conversations (`pack_chat`). A row of L + 1 tokens holds whole conversations (rendered by
chat.ChatRenderer), never a part of one: best fit (each conversation goes to the open row
it fills best; at most OPEN_ROWS rows are open, the fullest closes when a new one is
needed), or one per row; the rest of a row is padding, never learnt. A conversation
longer than a row is split between turns into pieces that fit (a turn longer than a row
is dropped and counted), or dropped and counted (`corpus.long_conversations`). Position p
is learnt when token p + 1 is (schemas.format: position p predicts token p + 1).

`seq_id = (domain << 32) | i` is stable: the same domain, tokenizer, settings and L give
the same rows, byte for byte, whatever else the corpus holds and whoever packs it. Work
unit (domain d, part j) is rows [j S, (j+1) S) of domain d: one shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sparsekd.errors import CorpusError
from sparsekd.schemas import format as F

OPEN_ROWS = 32  # best fit: rows open at once


class Row(NamedTuple):
    """One packed row: what the teacher reads and the student learns."""

    input_ids: np.ndarray  # int32 [L]
    next_token: int
    loss_mask: np.ndarray  # bool [L]
    doc_starts: np.ndarray  # int32 [documents]: 0, then each later document's first position
    targets: tuple | None = None  # a generated answer's targets at the learnt positions


@dataclass
class Unit:
    domain: int
    part: int
    seq_ids: np.ndarray  # int64 [n]
    input_ids: list[np.ndarray]  # n x int32 [L]
    next_tokens: list[int]
    loss_masks: list[np.ndarray]  # n x bool [L]
    doc_starts: list[np.ndarray]  # n x int32 [documents of the row]
    # --generate with targets captured during generation: per row, (ids [n, K], logprobs
    # [n, K], token log-probs [n]) at its n learnt positions (generate.py); else None
    targets: list[tuple] | None = None
    texts: list[str] | None = None  # --generate: each row's text (its tokens decoded)

    def tokens_sha256(self) -> str:
        """Hash of the unit's tokens and masks: a re-run compares it with the recorded one
        to notice a corpus that changed under a half-built cache."""
        h = hashlib.sha256(np.asarray(self.next_tokens, np.int32).tobytes())
        for ids in self.input_ids:
            h.update(ids.tobytes())
        for mask in self.loss_masks:
            if not mask.all():  # all-learnt rows hash as they did before the mask
                h.update(np.packbits(mask).tobytes())
        for starts in self.doc_starts:
            if len(starts) > 1:  # rows of one document hash as they did before v4
                h.update(starts.tobytes())
        return h.hexdigest()


@dataclass
class ChatStats:
    """What packing did to a domain's conversations (recorded with the domain)."""

    conversations: int = 0
    split: int = 0  # longer than a row, cut between turns
    dropped: int = 0  # longer than a row, dropped (or a piece: a turn longer than a row)
    rows: int = 0  # rows stored
    tokens: int = 0  # conversation tokens in them (the rest is padding)
    learnt: int = 0  # learnt positions in them


def pack(
    texts: Iterable[str],
    tokenizer,
    eos_id: int,
    L: int,
    limit: int | None = None,
    batch_docs=256,
    attention: str = "document",
) -> Iterator[Row]:
    """Yield the rows of a stream of text documents in order, at most `limit`; every
    position is learnt (module docstring)."""
    learnt = np.ones(L, dtype=bool)
    if limit == 0:
        return
    buf = np.empty(0, dtype=np.int32)
    # stream positions (relative to buf) where a document begins: at each EOS after the first
    begins = np.empty(0, dtype=np.int64)
    n = 0
    docs: list[str] = []
    it = iter(texts)
    while True:
        docs = [t for _, t in zip(range(batch_docs), it)]
        if not docs:
            return
        enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
        eos = np.asarray([eos_id], dtype=np.int32)
        ends = len(buf) + np.cumsum([len(ids) + 1 for ids in enc]) - 1  # each document's EOS
        buf = np.concatenate([buf, *(x for ids in enc for x in (np.asarray(ids, np.int32), eos))])
        begins = np.concatenate([begins, ends])
        n_full = (len(buf) - 1) // L  # each sequence needs L tokens plus its next token
        for i in range(n_full):
            starts = F.ROW_START
            if attention == "document":
                inside = begins[(begins > i * L) & (begins < (i + 1) * L)] - i * L
                starts = np.concatenate([F.ROW_START, inside.astype(np.int32)])
            yield Row(buf[i * L : (i + 1) * L].copy(), int(buf[(i + 1) * L]), learnt, starts)
            n += 1
            if limit is not None and n >= limit:
                return
        buf = buf[n_full * L :]
        begins = begins[begins >= n_full * L] - n_full * L


def _pieces(r, C: int, long: str, stats: ChatStats) -> list[tuple[np.ndarray, np.ndarray]]:
    """A rendered conversation as pieces of at most C tokens (module docstring)."""
    if len(r.ids) <= C:
        return [(r.ids, r.learnt, r.targets, r.cut)]
    if long == "drop":
        stats.dropped += 1
        return []
    stats.split += 1
    bounds = [*r.turns, len(r.ids)]
    pieces, start = [], 0
    for a, b in zip(bounds, bounds[1:]):
        if b - a > C:  # one turn longer than a row: it cannot be placed whole
            if a > start:
                pieces.append((start, a))
            stats.dropped += 1
            start = b
        elif b - start > C:
            pieces.append((start, a))
            start = a
    if len(r.ids) > start:
        pieces.append((start, len(r.ids)))
    return [(r.ids[a:b], r.learnt[a:b], None, False) for a, b in pieces]


class _Rows:
    """Open rows of C tokens being filled with pieces (best fit, or one at a time)."""

    def __init__(self, C: int, pad_id: int, most_open: int, stats: ChatStats, attention: str):
        self.C, self.pad_id, self.most_open, self.stats = C, pad_id, most_open, stats
        self.attention = attention
        self.open: list[list] = []  # [free tokens, pieces], in the order they were opened

    def add(self, piece) -> list[tuple]:
        """Place a piece; return the rows closed to make room for it."""
        n, closed = len(piece[0]), []
        fits = [r for r in self.open if r[0] >= n] if self.most_open > 1 else []
        if fits:
            row = min(fits, key=lambda r: r[0])  # the fullest that fits (the first of equals)
        else:
            if len(self.open) >= self.most_open:
                full = min(self.open, key=lambda r: r[0])
                self.open.remove(full)
                closed.append(self.row(full))
            row = [self.C, []]
            self.open.append(row)
        row[0] -= n
        row[1].append(piece)
        return closed

    def flush(self) -> list[tuple]:
        rows, self.open = [self.row(r) for r in self.open], []
        return rows

    def row(self, open_row) -> tuple:
        ids = np.full(self.C, self.pad_id, dtype=np.int32)
        learnt = np.zeros(self.C, dtype=bool)
        at, targets, cut, starts = 0, [], False, []
        for p_ids, p_learnt, p_targets, p_cut in open_row[1]:
            starts.append(at)
            ids[at : at + len(p_ids)], learnt[at : at + len(p_ids)] = p_ids, p_learnt
            at += len(p_ids)
            targets.append(p_targets)
            cut |= p_cut
        starts.append(at)  # the padding after the pieces is a document of its own
        L = self.C - 1  # the row's last token is only a target: no document starts there
        if self.attention == "row":
            starts = F.ROW_START
        else:
            starts = np.asarray([s for s in starts if s < L], dtype=np.int32)
        x, nxt = F.row_of(ids)
        mask = learnt[1:].copy()  # position p is learnt when token p + 1 is
        if not any(t is not None for t in targets):
            return Row(x, nxt, mask, starts), at, cut
        # a generated answer's targets are those of its learnt tokens, in order; a row's
        # first token is a prompt's, so they are the row's learnt positions, in order
        joined = tuple(np.concatenate(parts) for parts in zip(*targets))
        if learnt[0] or len(joined[2]) != int(mask.sum()):
            raise AssertionError("generated targets do not match the row's learnt positions")
        return Row(x, nxt, mask, starts, joined), at, cut


def pack_chat(
    items: Iterable,
    render,
    L: int,
    pad_id: int,
    *,
    long: str = "split",
    packing: str = "best_fit",
    limit: int | None = None,
    stats: ChatStats | None = None,
    cut_rows: list[int] | None = None,
    attention: str = "document",
) -> Iterator[Row]:
    """Rows of whole conversations (with the targets of generated answers, when they have
    them), at most `limit`. `render(item)` gives a chat.Rendered; `cut_rows` collects the
    indices of the rows that hold a generated answer cut at its most new tokens."""
    stats = stats if stats is not None else ChatStats()
    most_open = OPEN_ROWS if packing == "best_fit" else 1
    rows = _Rows(L + 1, pad_id, most_open, stats, attention)
    done = 0

    def closed():  # rows closed by the items, then the rest
        for item in items:
            stats.conversations += 1
            for piece in _pieces(render(item), L + 1, long, stats):
                yield from rows.add(piece)
        yield from rows.flush()

    for row, used, cut in closed():
        if limit is not None and done >= limit:
            return
        if cut and cut_rows is not None:
            cut_rows.append(done)
        done += 1
        stats.rows += 1
        stats.tokens += used
        stats.learnt += int(row.loss_mask.sum())
        yield row


def units(domain: int, rows: Iterable[Row], S: int):
    """Group a domain's rows into work units of S."""
    part, chunk = 0, []
    for row in rows:
        chunk.append(row)
        if len(chunk) == S:
            yield _unit(domain, part, chunk, S)
            part, chunk = part + 1, []
    if chunk:
        yield _unit(domain, part, chunk, S)


def _unit(domain: int, part: int, rows: list[Row], S: int) -> Unit:
    first = part * S
    if first + len(rows) > F.MAX_DOMAIN_SEQUENCES:
        raise CorpusError(
            f"domain {domain} packs to more than {F.MAX_DOMAIN_SEQUENCES} sequences: split "
            "its file, or lower --set corpus.domain_bytes"
        )
    seq_ids = F.make_seq_id(domain, np.arange(first, first + len(rows), dtype=np.int64))
    targets = [r.targets for r in rows]
    if all(t is None for t in targets):
        targets = None
    else:  # a row of padding alone (no answer) has empty targets
        targets = [_no_targets(t) if t is None else t for t in targets]
    return Unit(
        domain,
        part,
        seq_ids,
        [r.input_ids for r in rows],
        [r.next_token for r in rows],
        [r.loss_mask for r in rows],
        [np.asarray(r.doc_starts, dtype=np.int32) for r in rows],
        targets,
    )


def _no_targets(_) -> tuple:
    return (np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
