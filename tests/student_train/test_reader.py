"""The training reader: streams disjoint and complete, resume by seeking (the exact batches of
an uninterrupted run, decoding one window whatever the position), prefetch, collation."""

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.student_train.reader import CacheReader, SequenceStream, collate
from tests.helpers import synthetic_cache


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """200 sequences in 13 shards of 16 (row groups of 16: one per shard)."""
    path = tmp_path_factory.mktemp("reader") / "c"
    synthetic_cache(path, n=200, L=5, K=3, per_shard=16)
    return open_cache(path)


def _ids(batch):
    return batch["seq_id"].tolist()


@pytest.mark.parametrize("streams", [1, 3, 8])
def test_streams_are_disjoint_contiguous_and_cover_an_epoch(big, streams):
    seen, shards = [], []
    for i in range(streams):
        st = SequenceStream(big, stream=i, streams=streams, seed=5, shuffle_buffer=32)
        ids = [s.seq_id for s, _ in st.iterate(epochs=1)]
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
        shards.append(set(st.shard.tolist()))
    assert set().union(*seen) == set(big.index.first_seq[0] + np.arange(200))
    assert sum(len(s) for s in seen) == 200
    # each stream opens only its own contiguous run of shards
    if streams > 1:
        assert all(max(a) <= min(b) for a, b in zip(shards, shards[1:]))


def test_resume_at_any_point_gives_the_uninterrupted_batches(big):
    a = CacheReader(big, batch_size=7, seed=7, shuffle_buffer=40, prefetch=0)
    batches, states = [], []
    for _ in range(80):  # 560 sequences: into the third epoch
        batches.append(_ids(next(a)))
        states.append(a.state_dict())
    for k in (0, 5, 28, 29, 57, 70):
        b = CacheReader(big, batch_size=7, seed=7, shuffle_buffer=40, prefetch=2)
        b.load_state_dict(states[k])
        assert [_ids(next(b)) for _ in range(80 - k - 1)] == batches[k + 1 :], k
        b.close()
    c = CacheReader(big, batch_size=7, seed=8, shuffle_buffer=40)
    with pytest.raises(ValueError, match="seed=7"):
        c.load_state_dict(states[3])
    c.close()


def test_resume_decodes_one_window_whatever_the_position(big, monkeypatch):
    """Seeking, not replaying: the first batch after a resume reads at most one window of
    row groups (shuffle_buffer sequences), late in an epoch as early."""
    reads = []
    original = big.read_group
    monkeypatch.setattr(big, "read_group", lambda i, g: reads.append((i, g)) or original(i, g))
    a = CacheReader(big, batch_size=4, seed=1, shuffle_buffer=32, prefetch=0)
    for _ in range(45):
        next(a)
    state = a.state_dict()
    expected = _ids(next(a))
    reads.clear()
    b = CacheReader(big, batch_size=4, seed=1, shuffle_buffer=32, prefetch=0)
    b.load_state_dict(state)
    assert _ids(next(b)) == expected
    assert len(reads) <= 2 + 1  # one window of 32 sequences = 2 row groups (+1 if it ends)


def test_keep_restricts_to_the_kept_sequences_from_the_index_alone(big):
    first = int(big.index.first_seq[0])
    keep = np.array([first + i for i in range(0, 200, 7)], dtype=np.int64)
    st = SequenceStream(big, seed=0, keep=keep)
    assert len(st.shard) == len({i // 16 for i in range(0, 200, 7)})
    got = sorted(s.seq_id for s, _ in st.iterate(epochs=1))
    assert got == keep.tolist()


def test_collate_matches_targets(big):
    seqs = list(big)[:2]
    b = collate(seqs)
    L = len(seqs[0].input_ids)
    assert b.input_ids.shape == b.labels.shape == (2, L) and b.teacher_ids.shape == (2, L, 3)
    assert b.teacher_probs.shape == (2, L, 3) and b.seq_id.tolist() == [s.seq_id for s in seqs]
    off, ids, probs = seqs[1].targets()
    p = 2
    assert b.teacher_ids[1, p].tolist() == ids[off[p] : off[p + 1]].tolist()
    np.testing.assert_array_equal(b.teacher_probs[1, p], probs[off[p] : off[p + 1]])
    assert b.labels[0, L - 1] == seqs[0].next_token


def _readers(cache, world, **kw):
    return [CacheReader(cache, batch_size=1, rank=r, world_size=world, seed=3,
                        shuffle_buffer=32, prefetch=0, **kw) for r in range(world)]  # fmt: skip


def _take(readers, n):
    """n steps of batch 1 on every rank: the seq_ids read, and each rank's state after."""
    ids = [i for _ in range(n) for r in readers for i in _ids(next(r))]
    return ids, [r.state_dict() for r in readers]


@pytest.mark.parametrize("keep_every", [None, 3])
@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (3, 2, 5), (2, 3, 1, 2)])
def test_resized_runs_read_every_sequence_of_the_epoch_once(big, worlds, keep_every):
    """Saved on W ranks, resumed on W' (and again, even during the carry pass): across the
    changes every sequence of the epoch is read exactly once, then the next epoch starts
    whole; the same resize twice gives the same order (a pure function of the positions)."""
    first = int(big.index.first_seq[0])
    everything = first + np.arange(200)
    keep = None if keep_every is None else everything[::keep_every].copy()
    epoch = set((everything if keep is None else keep).tolist())
    readers = _readers(big, worlds[0], keep=keep)
    seen, states = _take(readers, 7)
    for w in worlds[1:]:
        readers = _readers(big, w, keep=keep)
        twin = _readers(big, w, keep=keep)
        for r, t in zip(readers, twin):
            r.load_state_dicts(states)
            t.load_state_dicts(states)
        got, states = _take(readers, 5)
        assert _take(twin, 5)[0] == got
        seen += got
    # finish the epoch: each rank reads its carry pass to the end, then stops
    for r in readers:
        for _ in range(len(r.carry_stream.unread(r.state))):
            seen += _ids(next(r))
    dup = sorted(i for i in set(seen) if seen.count(i) > 1)
    assert not dup and set(seen) == epoch, (dup[:5], sorted(epoch - set(seen))[:5])
    nxt = set()
    for r in readers:  # the next epoch: every rank reads its ordinary stream, whole
        assert r.state["epoch"] == r.carry["next_epoch"] - 1
        nxt |= {i for _ in range(r.stream.sequences) for i in _ids(next(r))}
    assert nxt == epoch


def test_a_resize_is_refused_with_another_seed(big):
    _, states = _take(_readers(big, 2), 3)
    other = CacheReader(big, batch_size=1, seed=4, shuffle_buffer=32, prefetch=0)
    with pytest.raises(ValueError, match="another seed"):
        other.load_state_dicts(states)
