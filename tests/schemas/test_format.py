"""The shard format's pieces: log-prob quantisation, sequence ids, and the row-group content
checksums (what a correct decode returns, whatever the slicing)."""

import numpy as np
import pyarrow as pa

from sparsekd.schemas import format as F


def test_quantisation_error_is_bounded():
    lp = -np.random.default_rng(0).exponential(5.0, size=100_000).astype(np.float32)
    lp = np.concatenate([lp, np.float32([-70.0, -1e4, -np.inf])])
    back = F.dequantize_logprobs(F.quantize_logprobs(lp))
    floor = -F.LOGPROB_MAX_Q / F.LOGPROB_SCALE
    inside = lp > floor
    assert np.abs(back - lp)[inside].max() <= 0.5 / F.LOGPROB_SCALE + 1e-6
    assert back[~inside].min() >= floor - 1e-3
    # another scale is honoured both ways
    assert (
        np.abs(F.dequantize_logprobs(F.quantize_logprobs(lp[:100], 512.0), 512.0) - lp[:100]).max()
        <= 1 / 1024 + 1e-6
    )


def test_seq_ids_name_their_domain():
    ids = F.make_seq_id(7, np.arange(3))
    assert ids.tolist() == [7 << 32, (7 << 32) + 1, (7 << 32) + 2]
    assert F.seq_domain(ids).tolist() == [7, 7, 7]
    assert F.shard_relpath(12_345, 3) == "shards/00012/00012345-00003.parquet"


def _table(n=40):
    rng = np.random.default_rng(0)
    L = 5
    lengths = rng.integers(0, 4, size=n * L)
    per_row = lengths.reshape(n, L).sum(1)
    ids = rng.integers(0, 100, size=int(per_row.sum())).astype(np.int32)

    def lists(values, lens, typ):
        off = np.zeros(len(lens) + 1, np.int32)
        np.cumsum(lens, out=off[1:])
        return pa.ListArray.from_arrays(pa.array(off), pa.array(values, typ))

    return pa.table(
        {
            "seq_id": pa.array(np.arange(n, dtype=np.int64)),
            "support_size": lists(lengths.astype(np.uint16), [L] * n, pa.uint16()),
            "ids": lists(ids, per_row, pa.int32()),
        }
    )


def test_checksums_of_slices_equal_those_of_the_decoded_groups(tmp_path):
    import pyarrow.parquet as pq

    t = _table()
    sums = F.row_group_checksums(t)
    assert len(sums) == 3  # 40 rows in groups of 16
    pq.write_table(t, tmp_path / "t.parquet", row_group_size=F.ROW_GROUP_SIZE)
    pf = pq.ParquetFile(tmp_path / "t.parquet")
    decoded = [F.checksum(F.column_arrays(pf.read_row_group(g))) for g in range(3)]
    assert decoded == sums


def test_a_changed_value_changes_the_checksum():
    t = _table()
    cols = F.column_arrays(t.slice(0, 16))
    base = F.checksum(cols)
    lengths, values = cols["ids"]
    for k in (0, len(values) // 2, len(values) - 1):
        changed = dict(cols)
        v = values.copy()
        v[k] ^= 1
        changed["ids"] = (lengths, v)
        assert F.checksum(changed) != base
    moved = dict(cols)  # same values, one id moved to the next row: lengths differ
    lens = lengths.copy()
    lens[0] -= 1 if lens[0] else -1
    lens[1] += 1 if lengths[0] else -1
    moved["ids"] = (lens, values)
    assert F.checksum(moved) != base
