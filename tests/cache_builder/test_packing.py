"""Document boundaries recorded by packing: text rows begin a document at each EOS after the
row's start, rows of conversations at each piece and at the padding after them; with row
attention every row is one document. The position ids the student gets restart at each;
the teacher's requests are exactly the documents that hold a learnt position, ending at
their last one. A damaged `doc_starts` column is refused by the reader."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from sparsekd.cache_builder.chat import Rendered
from sparsekd.cache_builder.encoder import documents
from sparsekd.cache_builder.packing import pack, pack_chat
from sparsekd.schemas import format as F


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


DOCS = ["One two three.", "Four.", "Five six seven eight nine ten eleven.", "Twelve", "End."]


@pytest.mark.parametrize("L", [5, 8, 13])
def test_text_rows_begin_a_document_at_each_eos_after_the_rows_start(tok, L):
    eos = tok.eos_token_id
    stream, begins = [], []
    for d in DOCS * 3:
        stream += tok(d, add_special_tokens=False).input_ids
        begins.append(len(stream))  # the EOS that ends a document begins the next
        stream.append(eos)
    rows = list(pack(DOCS * 3, tok, eos, L, batch_docs=2))  # documents cross batches
    assert len(rows) == (len(stream) - 1) // L
    for i, row in enumerate(rows):
        want = [0] + [b - i * L for b in begins if i * L < b < (i + 1) * L]
        assert row.doc_starts.tolist() == want
        assert row.input_ids.tolist() == stream[i * L : (i + 1) * L]
        for s in want[1:]:
            assert row.input_ids[s] == eos
        pos = F.position_ids_of(row.doc_starts, L)
        assert pos[0] == 0 and all(pos[s] == 0 for s in want)
        assert np.all(pos[1:][np.diff(pos) != 1] == 0)  # +1, or a restart at 0
    assert max(len(r.doc_starts) for r in rows) >= 2  # the case is exhibited
    row_rows = list(pack(DOCS * 3, tok, eos, L, batch_docs=2, attention="row"))
    assert all(r.doc_starts.tolist() == [0] for r in row_rows)
    assert [r.input_ids.tolist() for r in row_rows] == [r.input_ids.tolist() for r in rows]


def _piece(n: int, first: int, learnt_from: int) -> Rendered:
    ids = np.arange(first, first + n, dtype=np.int32)
    return Rendered(ids, np.arange(n) >= learnt_from, [0])


def test_rows_of_conversations_begin_a_document_at_each_piece_and_the_padding():
    pieces = [_piece(5, 100, 2), _piece(3, 200, 1), _piece(6, 300, 3), _piece(2, 400, 1)]
    rows = list(pack_chat(pieces, lambda r: r, L=10, pad_id=0))  # rows of 11 tokens
    # best fit: [5, 3, 2] + 1 padding, [6] + 5 padding
    assert [r.doc_starts.tolist() for r in rows] == [[0, 5, 8], [0, 6]]
    assert rows[0].input_ids[8:].tolist() == [400, 401]  # the last token is next_token
    assert rows[0].next_token == 0
    one = list(pack_chat(pieces, lambda r: r, L=10, pad_id=0, packing="one_per_row"))
    assert [r.doc_starts.tolist() for r in one] == [[0, 5], [0, 3], [0, 6], [0, 2]]
    row = list(pack_chat(pieces, lambda r: r, L=10, pad_id=0, attention="row"))
    assert all(r.doc_starts.tolist() == [0] for r in row)


def test_the_teachers_requests_are_the_documents_with_learnt_positions():
    pieces = [_piece(5, 100, 2), _piece(3, 200, 3), _piece(2, 400, 1)]  # the 2nd learns none
    (row,) = list(pack_chat(pieces, lambda r: r, L=10, pad_id=0))
    assert row.doc_starts.tolist() == [0, 5, 8]
    docs = documents([row.input_ids], [row.next_token], [row.loss_mask], [row.doc_starts])
    # position p is learnt when token p + 1 is: piece 1 learns tokens 2..4 (positions 1..3),
    # piece 3 token 9 (position 8); each request ends at its last learnt position and
    # carries the token that position predicts
    assert [(d.start, d.tokens.tolist(), d.next_token) for d in docs] == [
        (0, [100, 101, 102, 103], 104),
        (8, [400], 401),
    ]
    assert np.concatenate([d.learnt for d in docs]).sum() == row.loss_mask.sum()


def test_position_ids_restart_at_every_start():
    assert F.position_ids_of(np.array([0, 3, 4]), 7).tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert F.position_ids_of(F.ROW_START, 4).tolist() == [0, 1, 2, 3]
    assert F.doc_spans(np.array([0, 3, 4]), 7) == [(0, 3), (3, 4), (4, 7)]


@pytest.mark.parametrize(
    "starts, why",
    [
        ([[1, 3]], "do not begin at 0"),
        ([[0, 9]], "reach past position"),
        ([[0, 4, 4]], "not ascending"),
        ([[]], "empty"),
    ],
)
def test_a_damaged_doc_starts_column_is_refused(tmp_path, starts, why):
    from sparsekd import open_cache
    from sparsekd.cache_builder.encoder import from_topk
    from sparsekd.cache_builder.writer import encode_table, write_shard
    from sparsekd.errors import CacheError
    from sparsekd.schemas.manifest import ShardIndex, write_manifest
    from sparsekd.storage import open_store

    L, K = 8, 2
    meta = {
        "format": F.FORMAT_NAME, "mode": "topk", "k": K, "seq_len": L, "fingerprint": "f" * 64,
        "vocab_size": 100, "tokenizer_hash": "t" * 64, "logprob_scale": F.LOGPROB_SCALE,
        "weighted": False, "row_group_size": F.ROW_GROUP_SIZE, "teacher": "x",
        "samples": None, "attention": "document",
    }  # fmt: skip
    ids = np.tile(np.arange(K, dtype=np.int32), (L, 1))
    sup = from_topk(ids, np.full((L, K), -1.0, np.float32))
    t = encode_table(
        "topk", [0], [np.arange(L, dtype=np.int32)], [1], [np.ones(L, bool)],
        [np.full(L, -1.0, np.float32)], [sup],
        doc_starts=[np.asarray(s, np.int32) for s in starts],
    )  # fmt: skip
    store = open_store(tmp_path)
    entry = write_shard(store, 0, 0, t, meta)
    write_manifest(store, meta=meta, fingerprint="f" * 64, shards=ShardIndex.from_entries([entry]))
    with pytest.raises(CacheError, match=why):
        list(open_cache(tmp_path))
