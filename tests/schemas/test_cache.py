"""open_cache and every read: the writer -> reader round trip, the refusals, and a
corruption sweep: bit flips at many offsets of a real shard are each detected by a normal
read or provably harmless (the decoded rows are identical)."""

import json
import shutil

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.errors import CacheError
from sparsekd.schemas import format as F
from sparsekd.schemas.cache import in_sorted
from tests.helpers import flip_bit, shard_files, synthetic_cache


@pytest.fixture
def synth(tmp_path):
    written = synthetic_cache(tmp_path / "c")
    return tmp_path / "c", written


def _rows(cache):
    """Everything a reader gets, as plain lists (for exact comparison)."""
    out = []
    for s in cache:
        off, ids, probs = s.targets()
        out.append(
            (
                s.seq_id,
                s.input_ids.tolist(),
                s.next_token,
                s.token_logprobs.tolist(),
                off.tolist(),
                ids.tolist(),
                probs.tolist(),
            )
        )
    return out


def test_writer_to_open_cache_round_trip(synth):
    path, w = synth
    cache = open_cache(path)
    L = 7
    assert len(cache) == 9 and cache.num_tokens == 9 * L and cache.meta["mode"] == "topk"
    assert len(cache.index) == 3 and cache.index.relpath(2) == "shards/00000/00000000-00002.parquet"
    seqs = list(cache)
    assert [s.seq_id for s in seqs] == w["seq_ids"]
    for i, s in enumerate(seqs):
        assert s.input_ids.dtype == np.int32 and np.array_equal(s.input_ids, w["ids"][i])
        assert np.array_equal(s.labels, np.append(w["ids"][i][1:], w["nxt"][i]))
        np.testing.assert_allclose(
            s.token_logprobs, w["tok_lp"][i], atol=0.5 / F.LOGPROB_SCALE + 1e-6
        )
        off, ids, probs = s.targets()
        assert np.array_equal(ids, w["top_ids"][i].reshape(-1))
        np.testing.assert_allclose(np.log(probs), w["top_lp"][i].reshape(-1), atol=1e-3)
    shard, group, rows = cache.row_groups()
    assert (
        shard.tolist() == [0, 1, 2] and group.tolist() == [0, 0, 0] and rows.tolist() == [4, 4, 1]
    )


def test_open_cache_refusals(tmp_path, synth):
    path, _ = synth
    with pytest.raises(CacheError, match="not found"):
        open_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a sparsekd cache"):
        open_cache(tmp_path / "empty")
    good = json.loads((path / "manifest.json").read_text())
    cases = [
        (
            lambda m: m.update(schema_version=1),
            "schema version 1; this sparsekd reads versions 2, 3",
        ),
        (lambda m: m["meta"].pop("seq_len"), "meta 'seq_len' is missing"),
        (lambda m: m["meta"].update(mode="dense"), "meta mode 'dense' is not one of"),
        (lambda m: m["meta"].update(logprob_scale=None), "meta 'logprob_scale' is missing"),
        (lambda m: m.update(shards={"a": 1}) or m.pop("index"), "'index' is missing"),
        (lambda m: m["index"]["shards"].pop("sha256"), "shard index reference is missing"),
        (lambda m: m["index"]["shards"].update(sha256="0" * 64), "does not match its checksum"),
        (lambda m: m.update(num_sequences=10), "its num_sequences is 10, its shard index says 9"),
    ]
    for mutate, match in cases:
        m = json.loads(json.dumps(good))
        mutate(m)
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CacheError, match=match):
            open_cache(path)
    (path / "manifest.json").write_text("{truncated")
    with pytest.raises(CacheError, match="not valid JSON"):
        open_cache(path)


def test_manifest_meta_edits_are_caught_against_the_shards(synth):
    """A manifest whose meta was edited (vocabulary, tokenizer) disagrees with every shard's
    own metadata: the first read says so."""
    path, _ = synth
    good = json.loads((path / "manifest.json").read_text())
    for key, value in (("vocab_size", 1001), ("tokenizer_hash", "u" * 64), ("mode", "sample")):
        m = json.loads(json.dumps(good))
        m["meta"][key] = value
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CacheError, match=f"its {key} is .* the manifest says"):
            list(open_cache(path))


def test_a_shard_copied_in_from_another_cache_is_refused(tmp_path, synth):
    path, _ = synth
    # seed 1: the same rows, another cache's identity: the footer recorded in the index
    # differs (it holds the fingerprint) before the fingerprint itself is compared
    for seed, match in ((1, "its footer is not the one the index recorded"), (2, "")):
        other = tmp_path / f"other-{seed}"
        synthetic_cache(other, seed=seed, fingerprint="e" * 64)
        a, b = shard_files(path)[1], shard_files(other)[1]
        saved = a.read_bytes()
        shutil.copy(b, a)
        with pytest.raises(CacheError, match=f"00000000-00001.parquet.*{match}"):
            list(open_cache(path))
        a.write_bytes(saved)


def test_a_truncated_shard_is_refused_by_size(synth):
    path, _ = synth
    s = shard_files(path)[1]
    s.write_bytes(s.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"bytes, the manifest says \d+ \(truncated"):
        list(open_cache(path))


def test_corruption_sweep_every_flip_is_detected_or_harmless(synth):
    """One bit flipped at each of many offsets of a shard: a normal read either raises a
    CacheError naming the shard or returns exactly the original rows."""
    path, _ = synth
    shard = shard_files(path)[0]
    original = shard.read_bytes()
    clean = _rows(open_cache(path))
    size = len(original)
    offsets = sorted(set(np.linspace(0, size - 1, 300).astype(int).tolist()))
    detected = harmless = 0
    for off in offsets:
        flip_bit(shard, off)
        try:
            rows = _rows(open_cache(path))
        except CacheError as e:
            assert "00000000-00000.parquet" in str(e), str(e)
            detected += 1
        else:
            assert rows == clean, f"a flip at byte {off} of {size} changed the data silently"
            harmless += 1
        shard.write_bytes(original)
    assert detected + harmless == len(offsets) and detected > len(offsets) // 2


def test_in_sorted_is_membership_in_the_sorted_keys():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 1 << 40, 5000))
    values = np.concatenate([keys[::7], keys[::11] + 1, [0, 1 << 41]])
    assert np.array_equal(in_sorted(values, keys), np.isin(values, keys))
    assert not in_sorted(values, keys[:0]).any()
