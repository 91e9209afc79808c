"""The training reader: ranks disjoint and complete, exact resume, collation."""

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.student_train.reader import CacheReader, collate


def test_ranks_are_disjoint_and_cover_an_epoch(hf_topk_cache):
    cache = open_cache(hf_topk_cache)  # 10 sequences in 3 shards (row groups of 16 -> 3)
    seen = []
    for rank in range(3):
        r = CacheReader(cache, batch_size=1, rank=rank, world_size=3, seed=5, shuffle_buffer=4)
        n = sum(e["rows"] for e in r.cache.shards[rank::3])
        ids = [int(next(r).seq_ids[0]) for _ in range(n)]
        assert len(set(ids)) == n
        seen.append(set(ids))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(10))


def test_resume_gives_the_identical_next_batches(hf_topk_cache):
    cache = open_cache(hf_topk_cache)
    a = CacheReader(cache, batch_size=3, seed=7, shuffle_buffer=5)
    for _ in range(4):  # crosses into the second epoch (10 sequences)
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    b = CacheReader(cache, batch_size=3, seed=7, shuffle_buffer=5)
    b.load_state_dict(state)
    for e in expected:
        got = next(b)
        for field in ("seq_ids", "input_ids", "labels", "ids", "probs"):
            assert np.array_equal(getattr(got, field), getattr(e, field)), field
    c = CacheReader(cache, batch_size=3, seed=8, shuffle_buffer=5)
    with pytest.raises(ValueError, match="seed=7"):
        c.load_state_dict(state)


def test_collate_matches_targets(hf_topk_cache):
    seqs = list(open_cache(hf_topk_cache))[:2]
    b = collate(seqs)
    L = len(seqs[0].input_ids)
    assert b.input_ids.shape == (2, L) and b.labels.shape == (2 * L,) and b.ids.shape == (2 * L, 8)
    off, ids, probs = seqs[1].targets()
    p = 5
    assert b.ids[L + p].tolist() == ids[off[p] : off[p + 1]].tolist()
    np.testing.assert_array_equal(b.probs[L + p], probs[off[p] : off[p + 1]])
    assert b.labels[L - 1] == seqs[0].next_token
