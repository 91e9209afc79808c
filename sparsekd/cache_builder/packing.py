"""Packing: a domain's documents -> one token stream -> sequences of L tokens -> work units.

Within a domain every document is tokenised without special tokens and followed by EOS;
the documents are concatenated; sequence i is `stream[i L : (i+1) L]` and its
`next_token` is `stream[(i+1) L]` (so the last position of every sequence has a real
target). The incomplete tail of each domain is dropped (L / 2 tokens per domain on
average: 0.01 % of a 32 MiB domain at L = 2048). `seq_id = (domain << 32) | i` is stable:
the same domain, tokenizer and L give the same sequences, byte for byte, whatever else the
corpus holds and whoever packs it.

Work unit (domain d, part j) is sequences [j S, (j+1) S) of domain d: one shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from sparsekd.errors import CorpusError
from sparsekd.schemas import format as F


@dataclass
class Unit:
    domain: int
    part: int
    seq_ids: np.ndarray  # int64 [n]
    input_ids: list[np.ndarray]  # n x int32 [L]
    next_tokens: list[int]

    def tokens_sha256(self) -> str:
        """Hash of the unit's tokens: a re-run compares it with the recorded one to notice a
        corpus that changed under a half-built cache."""
        h = hashlib.sha256(np.asarray(self.next_tokens, np.int32).tobytes())
        for ids in self.input_ids:
            h.update(ids.tobytes())
        return h.hexdigest()


def pack(
    texts: Iterable[str], tokenizer, eos_id: int, L: int, limit: int | None = None, batch_docs=256
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield `(input_ids int32 [L], next_token)` in stream order, at most `limit`."""
    if limit == 0:
        return
    buf = np.empty(0, dtype=np.int32)
    n = 0
    docs: list[str] = []
    it = iter(texts)
    while True:
        docs = [t for _, t in zip(range(batch_docs), it)]
        if not docs:
            return
        enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
        eos = np.asarray([eos_id], dtype=np.int32)
        buf = np.concatenate([buf, *(x for ids in enc for x in (np.asarray(ids, np.int32), eos))])
        n_full = (len(buf) - 1) // L  # each sequence needs L tokens plus its next token
        for i in range(n_full):
            yield buf[i * L : (i + 1) * L].copy(), int(buf[(i + 1) * L])
            n += 1
            if limit is not None and n >= limit:
                return
        buf = buf[n_full * L :]


def units(domain: int, sequences: Iterable[tuple[np.ndarray, int]], S: int) -> Iterator[Unit]:
    """Group a domain's sequences into work units of S."""
    part, ids, nxt = 0, [], []
    for x, t in sequences:
        ids.append(x)
        nxt.append(t)
        if len(ids) == S:
            yield _unit(domain, part, ids, nxt, S)
            part, ids, nxt = part + 1, [], []
    if ids:
        yield _unit(domain, part, ids, nxt, S)


def _unit(domain: int, part: int, ids, nxt, S: int) -> Unit:
    first = part * S
    if first + len(ids) > F.MAX_DOMAIN_SEQUENCES:
        raise CorpusError(
            f"domain {domain} packs to more than {F.MAX_DOMAIN_SEQUENCES} sequences: split "
            "its file, or lower --set corpus.domain_bytes"
        )
    seq_ids = F.make_seq_id(domain, np.arange(first, first + len(ids), dtype=np.int64))
    return Unit(domain, part, seq_ids, ids, nxt)
