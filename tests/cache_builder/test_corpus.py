"""Corpus reading and packing: every input format, packing domains (every record read once,
by exactly one domain), content hashes, truncated and malformed input named by file and
line, symbolic links followed."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from sparsekd.cache_builder.corpus import (
    ZST_RATIO_BOUND,
    CorpusConfig,
    DomainReader,
    ZstStreams,
    builtin_documents,
    corpus_identity,
    plan_domains,
    resolve_sources,
)
from sparsekd.cache_builder.packing import pack, units
from sparsekd.errors import CorpusError
from sparsekd.schemas import format as F

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


def _documents(paths, domain_bytes=32 << 20, **kw):
    cfg = CorpusConfig(paths=tuple(map(str, paths)), domain_bytes=domain_bytes, **kw)
    domains = plan_domains(resolve_sources(cfg.paths), cfg.domain_bytes)
    readers = [DomainReader(d, cfg.text_field, cfg.skip_bad_lines) for d in domains]
    return domains, readers, [list(r) for r in readers]


def test_each_file_is_a_domain_packed_on_its_own(tmp_path, tok):
    _write_all_formats(tmp_path)
    domains, _, docs = _documents([tmp_path])
    assert [d.source.name for d in domains] == ["a.jsonl", "b.jsonl.zst", "c.txt", "d.parquet"]
    assert docs == [DOCS[:4], DOCS[4:7], [DOCS[7]], DOCS[8:]]
    L = 16
    for d, texts in zip(domains, docs):
        stream = []
        for t in texts:
            stream += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs = list(pack(texts, tok, tok.eos_token_id, L))
        assert len(seqs) == (len(stream) - 1) // L  # the domain's tail is dropped
        for i, (ids, nxt, mask, *_) in enumerate(seqs):
            assert ids.dtype == np.int32 and ids.tolist() == stream[i * L : (i + 1) * L]
            assert nxt == stream[(i + 1) * L] and mask.all()  # text: every position learnt
        parts = list(units(d.index, seqs, S=2))
        assert len(parts) >= 2 and [len(u.seq_ids) for u in parts][:-1] == [2] * (len(parts) - 1)
        assert parts[1].seq_ids.tolist() == F.make_seq_id(d.index, np.arange(2, 4)).tolist()


def test_a_large_jsonl_is_cut_at_line_starts_and_every_line_read_once(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 97)}) + "\n" for i in range(6000)]
    (tmp_path / "big.jsonl").write_text("".join(lines))
    size = (tmp_path / "big.jsonl").stat().st_size
    domains, readers, docs = _documents([tmp_path / "big.jsonl"], domain_bytes=1 << 16)
    assert len(domains) == -(-size // (1 << 16)) > 3
    flat = [t for part in docs for t in part]
    assert flat == [json.loads(x)["text"] for x in lines]  # each line once, in order
    # a domain reads the lines that begin in its byte range, and hashes them
    offsets = np.cumsum([0] + [len(x.encode()) for x in lines])[:-1]
    for d, part in zip(domains, docs):
        inside = [i for i, o in enumerate(offsets) if d.start <= o < d.end]
        assert part == [json.loads(lines[i])["text"] for i in inside]
    again = _documents([tmp_path / "big.jsonl"], domain_bytes=1 << 16)[1]
    assert [r.content_sha256 for r in readers] == [r.content_sha256 for r in again]


def test_parquet_domains_take_the_row_groups_that_begin_in_them(tmp_path):
    texts = [f"row {i} " + "y" * 300 for i in range(4000)]
    pq.write_table(
        pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=150, compression="none"
    )
    domains, _, docs = _documents([tmp_path / "p.parquet"], domain_bytes=1 << 16)
    assert len(domains) > 2 and sum(1 for d in docs if d) > 2
    assert [t for part in docs for t in part] == texts


def test_content_hash_changes_with_one_byte_and_identity_with_the_format(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "one two three"}) + "\n")
    _, (r,), _ = _documents([p])
    p.write_text(json.dumps({"text": "one two thref"}) + "\n")  # same size
    _, (r2,), _ = _documents([p])
    assert r.content_sha256 != r2.content_sha256
    ident = corpus_identity(CorpusConfig(), resolve_sources((str(p),)))
    assert ident["sources"] == [["x.jsonl", "jsonl", p.stat().st_size]]
    os.rename(p, tmp_path / "x.txt")  # same bytes, parsed as one plain-text document
    ident2 = corpus_identity(CorpusConfig(), resolve_sources((str(tmp_path / "x.txt"),)))
    assert ident2["sources"] == [["x.txt", "txt", ident["sources"][0][2]]]


def test_multi_frame_zst_is_read_whole_and_a_truncated_one_is_refused(tmp_path):
    c = zstandard.ZstdCompressor()
    rows = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(9)]
    frames = [c.compress("".join(rows[i : i + 3]).encode()) for i in (0, 3, 6)]
    (tmp_path / "ok.jsonl.zst").write_bytes(b"".join(frames))
    assert _documents([tmp_path / "ok.jsonl.zst"])[2] == [[f"doc {i}" for i in range(9)]]
    mid_line = c.compress("".join(rows[6:])[:-8].encode())  # a frame ending mid-line
    (tmp_path / "cut.jsonl.zst").write_bytes(b"".join(frames[:2]) + mid_line)
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.zst: truncated \(its text ends mid-line"):
        _documents([tmp_path / "cut.jsonl.zst"], skip_bad_lines=True)
    data = b"".join(frames)
    (tmp_path / "torn.jsonl.zst").write_bytes(data[:-5])
    with pytest.raises(CorpusError, match=r"torn\.jsonl\.zst: truncated \(the file ends inside"):
        _documents([tmp_path / "torn.jsonl.zst"])


@pytest.mark.parametrize("sized", [True, False])
def test_a_large_jsonl_zst_is_split_into_ranges_of_its_decompressed_stream(tmp_path, sized):
    """Domains of a .jsonl.zst are line ranges of the decompressed stream, as many as its
    size in the frame header asks (without one: planned from the compressed size, the
    ones past the end empty); every line is read once, by the domain its first byte falls
    in; one worker's domains share one decompression pass."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(4000)]
    lines = [
        json.dumps({"text": f"line {i} " + " ".join(rng.choice(words, 1 + i % 17))}) + "\n"
        for i in range(6000)
    ]
    raw = "".join(lines).encode()
    path = tmp_path / "big.jsonl.zst"
    if sized:  # one frame, its size in the header (what zstd writes for a whole file)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    else:  # two frames, no sizes (a streaming writer)
        c = zstandard.ZstdCompressor(level=3, write_content_size=False)
        cut = len("".join(lines[:2500]).encode())
        path.write_bytes(c.compress(raw[:cut]) + c.compress(raw[cut:]))
    B = 1 << 16
    (src,) = resolve_sources((str(path),))
    domains = plan_domains([src], B)
    span = len(raw) if sized else path.stat().st_size * ZST_RATIO_BOUND
    assert src.span == span and len(domains) == -(-span // B) > 3
    zst = ZstStreams()
    readers = [DomainReader(d, "text", False, zst) for d in domains]
    docs = [list(r) for r in readers]
    assert [t for part in docs for t in part] == [json.loads(x)["text"] for x in lines]
    offsets = np.cumsum([0] + [len(x.encode()) for x in lines])[:-1]
    for d, part in zip(domains, docs):
        inside = [i for i, o in enumerate(offsets) if o >= d.start and (d.end is None or o < d.end)]
        assert part == [json.loads(lines[i])["text"] for i in inside]
    assert all(docs[: len(raw) // B]) and not any(docs[len(raw) // B + 1 :])
    assert zst.passes == 1 and next(iter(zst._cursors.values())).pos == path.stat().st_size
    # a worker that owns every third domain reads the same lines, with the same hashes
    mine = ZstStreams()
    for d in domains[1::3]:
        r = DomainReader(d, "text", False, mine)
        assert list(r) == docs[d.index] and r.content_sha256 == readers[d.index].content_sha256
    assert mine.passes == 1
    ident = corpus_identity(CorpusConfig(), [src])
    assert ident["zst_split"] == 1 and ident["sources"][0][3] == span
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(raw)
    assert "zst_split" not in corpus_identity(CorpusConfig(), resolve_sources((str(plain),)))


def test_bad_lines_are_named_by_file_and_line_or_counted(tmp_path):
    good = json.dumps({"text": "fine"})
    body = "\n".join([good, "{not json", json.dumps({"txt": "x"}), '{"text": "\\ud800"}', good])
    p = tmp_path / "bad.jsonl"
    p.write_bytes(body.encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed JSON"):
        _documents([p])
    _, (r,), docs = _documents([p], skip_bad_lines=True)
    assert docs == [["fine", "fine"]] and r.stats.bad_lines == 4 and r.stats.documents == 2
    assert any("bad.jsonl:4: text holds an unpaired surrogate" in x for x in r.stats.bad_examples)
    assert any("bad.jsonl:6: not UTF-8" in x for x in r.stats.bad_examples)
    # a bad line in a later domain still carries its line number in the whole file
    lines = [json.dumps({"text": "a" * 100}) + "\n"] * 2000 + ["{oops\n"]
    (tmp_path / "late.jsonl").write_text("".join(lines))
    with pytest.raises(CorpusError, match=r"late\.jsonl:2001: malformed JSON"):
        _documents([tmp_path / "late.jsonl"], domain_bytes=1 << 16)


def test_symlinked_subdirectories_are_followed_once(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "x.jsonl").write_text(json.dumps({"text": "linked"}) + "\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "direct"}) + "\n")
    os.symlink(real, corpus / "linked")
    os.symlink(corpus, corpus / "linked" / "loop")  # a cycle must not be walked forever
    names = [s.name for s in resolve_sources((str(corpus),))]
    assert names[:2] == ["a.jsonl", "linked/x.jsonl"]
    assert len(names) == len(set(os.path.realpath(corpus / n) for n in names))


def test_builtin_default_corpus_exists_and_is_stable(tok):
    docs = [t for _, t in builtin_documents()]
    assert len(docs) > 50
    a = list(pack(docs, tok, tok.eos_token_id, 128, limit=20))
    b = list(pack([t for _, t in builtin_documents()], tok, tok.eos_token_id, 128, limit=20))
    assert len(a) == 20 and all(x[0].tobytes() == y[0].tobytes() for x, y in zip(a, b))
    text = tok.decode(a[0][0])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # natural-language text


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.jsonl", "corpus path not found"),
        (lambda d: (d / "x.csv").write_text("a") and d / "x.csv", "unsupported type"),
        (
            lambda d: (d / "b.txt").write_bytes(b"ok\n\xff\xfe\xfa") and d / "b.txt",
            r"b\.txt:2: not UTF-8",
        ),
        (
            lambda d: (d / "z.jsonl.zst").write_bytes(b"garbage") and d / "z.jsonl.zst",
            "cannot read",
        ),
        (lambda d: str(d / "*.nothing"), "matches no"),
    ],
)
def test_unreadable_corpus_inputs(tmp_path, make, match):
    with pytest.raises(CorpusError, match=match):
        _documents([make(tmp_path)])


def test_parquet_without_text_field(tmp_path):
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        _documents([tmp_path / "x.parquet"])
    assert _documents([tmp_path / "x.parquet"], text_field="body")[2] == [["a b c"]]


def test_a_corpus_is_read_whole_and_each_file_once(tmp_path):
    """An unreadable folder inside the corpus, a file given twice (directly, through its
    folder, or through a link), a FIFO or a device: each refused by name."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    row = json.dumps({"text": "some text"}) + "\n"
    (d / "a.jsonl").write_text(row)
    (d / "sub" / "b.jsonl").write_text(row)
    assert len(resolve_sources((str(d),))) == 2
    with pytest.raises(CorpusError, match=r"a\.jsonl is .*a\.jsonl again"):
        resolve_sources((str(d / "a.jsonl"), str(d / "a.jsonl")))
    with pytest.raises(CorpusError, match=r"b\.jsonl is .*b\.jsonl again \(given twice, inside"):
        resolve_sources((str(d), str(d / "sub" / "b.jsonl")))
    os.symlink(d / "a.jsonl", d / "link.jsonl")
    with pytest.raises(CorpusError, match="or a link to it"):
        resolve_sources((str(d),))
    (d / "link.jsonl").unlink()
    os.mkfifo(d / "pipe.jsonl")
    with pytest.raises(CorpusError, match=r"pipe\.jsonl is not a regular file"):
        resolve_sources((str(d),))
    (d / "pipe.jsonl").unlink()
    with pytest.raises(CorpusError, match="/dev/null is not a regular file"):
        resolve_sources(("/dev/null",))
    # a folder that cannot be read (as root: without the capability to override file modes)
    (d / "sub").chmod(0)
    code = (
        f"from sparsekd.cache_builder.corpus import resolve_sources; resolve_sources(({str(d)!r},))"
    )
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    proc = subprocess.run([*drop, sys.executable, "-c", code], capture_output=True, text=True)
    (d / "sub").chmod(0o755)
    assert "CorpusError: corpus folder" in proc.stderr and "sub cannot be read" in proc.stderr
