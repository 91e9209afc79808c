"""writer -> open_cache round trip, and open_cache's refusals."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparsekd import open_cache
from sparsekd.cache_builder.encode import from_topk
from sparsekd.cache_builder.writer import encode_table, write_shard
from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import CacheError, atomic_write_json, build_manifest


def test_quantisation_error_is_bounded():
    lp = -np.random.default_rng(0).exponential(5.0, size=100_000).astype(np.float32)
    lp = np.concatenate([lp, np.float32([-70.0, -1e4, -np.inf])])
    back = F.dequantize_logprobs(F.quantize_logprobs(lp))
    inside = lp > F.LOGPROB_MIN
    assert np.abs(back - lp)[inside].max() <= 0.5 / F.LOGPROB_SCALE + 1e-6
    assert back[~inside].min() >= F.LOGPROB_MIN - 1e-3


def test_writer_to_open_cache_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    L, K, V, n = 7, 5, 1000, 9
    seq_ids = list(range(n))
    ids = [rng.integers(0, V, size=L).astype(np.int32) for _ in range(n)]
    nxt = [int(x) for x in rng.integers(0, V, size=n)]
    top_ids = [
        np.sort(np.stack([rng.choice(V, K, replace=False) for _ in range(L)]), 1).astype(np.int32)
        for _ in range(n)
    ]
    top_lp = [
        np.log(rng.dirichlet(np.ones(K + 3), size=L)[:, :K]).astype(np.float32) for _ in range(n)
    ]
    tok_lp = [-rng.exponential(2, size=L).astype(np.float32) for _ in range(n)]
    meta = {"mode": "topk", "seq_len": L, "fingerprint": "f" * 64, "vocab_size": V}
    shards = {}
    for unit, (a, b) in enumerate([(0, 4), (4, 8), (8, 9)]):
        supports = [from_topk(i, lp) for i, lp in zip(top_ids[a:b], top_lp[a:b])]
        t = encode_table("topk", seq_ids[a:b], ids[a:b], nxt[a:b], tok_lp[a:b], supports)
        shards[unit] = write_shard(tmp_path, unit, t, meta)
    atomic_write_json(
        tmp_path / "manifest.json",
        build_manifest(
            meta, "f" * 64, shards, {"num_units": 3, "num_sequences": n, "bad_lines": 0}
        ),
    )

    cache = open_cache(tmp_path)
    assert len(cache) == n and cache.num_tokens == n * L and cache.meta["mode"] == "topk"
    seqs = list(cache)
    assert [s.seq_id for s in seqs] == seq_ids
    for i, s in enumerate(seqs):
        assert s.input_ids.dtype == np.int32 and np.array_equal(s.input_ids, ids[i])
        assert np.array_equal(s.labels, np.append(ids[i][1:], nxt[i]))
        assert s.token_logprobs.dtype == np.float32
        np.testing.assert_allclose(s.token_logprobs, tok_lp[i], atol=5e-4)
        offsets, tids, probs = s.targets()
        assert offsets.tolist() == list(range(0, L * K + 1, K))
        assert np.array_equal(tids, top_ids[i].reshape(-1))
        np.testing.assert_allclose(np.log(probs), top_lp[i].reshape(-1), atol=5e-4)
    # any Parquet reader sees the documented columns and the metadata
    pf = pq.ParquetFile(tmp_path / "shard-00000.parquet")
    assert pf.schema_arrow.names == [
        F.COL_SEQ_ID,
        F.COL_INPUT_IDS,
        F.COL_NEXT_TOKEN,
        F.COL_TOKEN_LOGPROB,
        F.COL_SUPPORT_SIZE,
        F.COL_IDS,
        F.COL_LOGPROBS,
    ]
    md = json.loads(pf.schema_arrow.metadata[F.META_KEY])
    assert md["unit"] == 0 and md["rows"] == 4 and md["fingerprint"] == "f" * 64


def test_open_cache_refusals(tmp_path, hf_topk_cache):
    with pytest.raises(CacheError, match="not found"):
        open_cache(tmp_path / "nope")
    with pytest.raises(CacheError, match="not a sparsekd cache"):
        open_cache(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(hf_topk_cache, bad)
    (bad / "manifest.json").write_text("{truncated")
    with pytest.raises(CacheError, match="not valid JSON"):
        open_cache(bad)
    m = json.loads((hf_topk_cache / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="schema version 99"):
        open_cache(bad)


def test_real_cache_targets_are_the_teachers_top_k(hf_topk_cache, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    cache = open_cache(hf_topk_cache)
    seq = next(iter(cache))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(
            model(torch.from_numpy(seq.input_ids.copy())[None].long()).logits[0], -1
        )
    offsets, ids, probs = seq.targets()
    for p in range(len(seq.input_ids)):
        sl = slice(offsets[p], offsets[p + 1])
        expect = set(logp[p].topk(8).indices.tolist())
        assert set(ids[sl].tolist()) == expect
        np.testing.assert_allclose(
            np.log(probs[sl]),
            logp[p][torch.from_numpy(ids[sl].astype(np.int64))].numpy(),
            atol=1e-3,
        )
    np.testing.assert_allclose(
        seq.token_logprobs,
        logp.gather(1, torch.from_numpy(seq.labels)[:, None].long())[:, 0],
        atol=1e-3,
    )


def test_iterating_a_corrupt_shard_raises_cache_error(tmp_path, hf_topk_cache):
    d = tmp_path / "c"
    shutil.copytree(hf_topk_cache, d)
    shard = d / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cache = open_cache(d)
    with pytest.raises(CacheError, match="shard-00001.parquet cannot be read"):
        list(cache)
