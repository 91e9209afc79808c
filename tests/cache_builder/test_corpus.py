"""Corpus reading and packing: every input format, determinism, EOS placement, bad lines."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from sparsekd.cache_builder.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusStats,
    corpus_fingerprint,
    pack_sequences,
)

DOCS = [f"Document number {i} says something about topic {i % 3}. " * (i + 1) for i in range(12)]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _write_all_formats(d):
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:4]))
    raw = "".join(json.dumps({"text": t, "other": 1}) + "\n" for t in DOCS[4:7]).encode()
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (d / "c.txt").write_text(DOCS[7])
    pq.write_table(pa.table({"text": DOCS[8:]}), d / "d.parquet")


def _pack(tok, paths, L=32, **kw):
    cfg = CorpusConfig(paths=tuple(map(str, paths)), seq_len=L, **kw)
    return list(pack_sequences(cfg, tok, tok.eos_token_id))


def test_all_formats_pack_to_the_expected_stream(tmp_path, tok):
    _write_all_formats(tmp_path)
    seqs = _pack(tok, [tmp_path], L=32)
    stream = []
    for t in DOCS:  # directory order is sorted: a.jsonl, b.jsonl.zst, c.txt, d.parquet
        stream += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = (len(stream) - 1) // 32
    assert len(seqs) == n
    for i, (sid, ids, nxt) in enumerate(seqs):
        assert sid == i and ids.dtype == np.int32 and len(ids) == 32
        assert ids.tolist() == stream[i * 32 : (i + 1) * 32]
        assert nxt == stream[(i + 1) * 32]


def test_packing_is_deterministic_and_glob_matches_files(tmp_path, tok):
    _write_all_formats(tmp_path)
    a = _pack(tok, [tmp_path])
    b = _pack(
        tok,
        [
            tmp_path / "*.jsonl",
            tmp_path / "b.jsonl.zst",
            tmp_path / "c.txt",
            tmp_path / "d.parquet",
        ],
    )
    assert [(s, x.tobytes(), n) for s, x, n in a] == [(s, x.tobytes(), n) for s, x, n in b]
    cfg = CorpusConfig(paths=(str(tmp_path),), seq_len=32)
    assert corpus_fingerprint(cfg) == corpus_fingerprint(cfg)


def test_fingerprint_changes_with_content(tmp_path, tok):
    (tmp_path / "x.txt").write_text("one two three")
    cfg = CorpusConfig(paths=(str(tmp_path / "x.txt"),), seq_len=4)
    before = corpus_fingerprint(cfg)
    (tmp_path / "x.txt").write_text("one two four")
    assert corpus_fingerprint(cfg) != before


def test_builtin_default_corpus_exists_and_is_stable(tok):
    a = list(pack_sequences(CorpusConfig(seq_len=128, max_sequences=20), tok, tok.eos_token_id))
    b = list(pack_sequences(CorpusConfig(seq_len=128, max_sequences=20), tok, tok.eos_token_id))
    assert len(a) == 20
    assert all(x[1].tobytes() == y[1].tobytes() for x, y in zip(a, b))
    text = tok.decode(a[0][1])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # natural-language text


def test_malformed_line_names_file_and_line(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n{not json\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed JSON"):
        _pack(tok, [p], L=2)
    stats = CorpusStats()
    cfg = CorpusConfig(paths=(str(p),), seq_len=2, skip_bad_lines=True)
    list(pack_sequences(cfg, tok, tok.eos_token_id, stats))
    assert stats.bad_lines == 2 and stats.documents == 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.jsonl", "corpus path not found"),
        (lambda d: (d / "x.csv").write_text("a") and d / "x.csv", "unsupported type"),
        (lambda d: (d / "b.txt").write_bytes(b"\xff\xfe\xfa") and d / "b.txt", "not UTF-8"),
        (
            lambda d: (d / "z.jsonl.zst").write_bytes(b"garbage") and d / "z.jsonl.zst",
            "cannot read",
        ),
        (lambda d: str(d / "*.nothing"), "matches no"),
    ],
)
def test_unreadable_corpus_inputs(tmp_path, tok, make, match):
    with pytest.raises(CorpusError, match=match):
        _pack(tok, [make(tmp_path)])


def test_parquet_without_text_field(tmp_path, tok):
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        _pack(tok, [tmp_path / "x.parquet"])
    assert len(_pack(tok, [tmp_path / "x.parquet"], L=2, text_field="body")) >= 1
