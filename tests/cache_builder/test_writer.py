"""The shard writer: a failure in its background thread reaches the caller. (Temporary files
are the storage seam's: tests/test_storage.py.)"""

import time

import pytest

from sparsekd.cache_builder.writer import ShardWriter


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
