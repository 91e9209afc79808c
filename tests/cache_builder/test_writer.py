"""The shard writer: a failure in its background thread reaches the caller; temporary files
are private to the writing process and swept only when stale."""

import os
import time

import pytest

from sparsekd.cache_builder.writer import STALE_TMP_S, ShardFiles, ShardWriter


def test_an_error_in_the_writer_thread_reaches_the_caller():
    done = []
    w = ShardWriter(depth=1)
    w.put(lambda: done.append(1))

    def fail():
        raise OSError(28, "No space left on device")

    w.put(fail)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(5):
            w.put(lambda: done.append(2))
            time.sleep(0.05)
        w.close()
    assert done == [1]  # nothing after the failure ran


def test_temporary_files_are_private_and_only_stale_ones_are_swept(tmp_path):
    a, b = ShardFiles(tmp_path), ShardFiles(tmp_path)
    assert a.tmp != b.tmp  # same process, same worker index: still two folders
    a.write("shards/00000/00000000-00000.parquet", b"x" * 10)
    b.tmp.mkdir(parents=True)
    (b.tmp / "half.parquet.tmp").write_bytes(b"y")
    old = time.time() - STALE_TMP_S - 10
    os.utime(b.tmp, (old, old))
    live = ShardFiles(tmp_path)
    live.tmp.mkdir(parents=True)
    ShardFiles(tmp_path)  # a new writer sweeps what is stale, and only that
    assert not b.tmp.exists() and live.tmp.exists() and a.tmp.exists()
    assert (tmp_path / "shards/00000/00000000-00000.parquet").read_bytes() == b"x" * 10
