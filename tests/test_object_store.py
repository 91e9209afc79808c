"""A cache on a real S3 endpoint (moto's server over HTTP on 127.0.0.1), read by everything
that reads a local one: open_cache, inspect (--verify), the training reader (resume by
seeking), CacheDataset, evaluate and train-student. Each gives what it gives on the local
copy; a byte flipped in an uploaded shard is caught on read."""

import json

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.errors import CacheError
from sparsekd.inspection import verify_cache
from sparsekd.student_train.reader import CacheReader
from tests.helpers import copy_cache, run_cli, s3_flip_byte, synthetic_cache


@pytest.fixture(scope="module")
def pair(s3_server, hf_topk_cache):
    """The real SmolLM2 top-8 cache, and its copy on S3."""
    bucket = s3_server.make_bucket("object-store-read")
    return hf_topk_cache, copy_cache(hf_topk_cache, f"{bucket}/caches/topk")


def _rows(cache):
    return [
        (
            s.seq_id,
            s.input_ids.tolist(),
            s.token_logprobs.tolist(),
            [a.tolist() for a in s.targets()],
        )
        for s in cache
    ]


def test_open_cache_and_inspect_read_the_same_cache(pair):
    local, remote = pair
    assert _rows(open_cache(remote)) == _rows(open_cache(local))
    a = json.loads(run_cli("inspect", local, "--verify", "--json", check=True).stdout)
    b = json.loads(run_cli("inspect", remote, "--verify", "--json", check=True).stdout)
    assert a == b


def test_a_flipped_byte_in_an_uploaded_shard_is_caught_on_read(s3_server, pair):
    bucket = s3_server.make_bucket("object-store-flip")
    remote = copy_cache(pair[0], f"{bucket}/c")
    cache = open_cache(remote)
    name = cache.index.relpath(1)
    s3_flip_byte(s3_server, remote, name, int(cache.index.bytes[1]) // 3)
    with pytest.raises(CacheError, match=name.split("/")[-1]):
        _rows(open_cache(remote))
    problems = verify_cache(remote)
    assert any(name in p and "sha256 differs" in p for p in problems), problems


def test_reader_resumes_on_s3_exactly_as_on_the_local_disk(s3_server, tmp_path):
    local = tmp_path / "c"
    synthetic_cache(local, n=120, L=5, K=3, per_shard=16)
    remote = copy_cache(local, f"{s3_server.make_bucket('object-store-resume')}/c")
    a = CacheReader(open_cache(local), batch_size=7, seed=7, shuffle_buffer=40, prefetch=0)
    batches, states = [], []
    for _ in range(40):  # into the third epoch
        batches.append(a.__next__()["seq_id"].tolist())
        states.append(a.state_dict())
    a.close()
    for k in (0, 16, 33):
        b = CacheReader(open_cache(remote), batch_size=7, seed=7, shuffle_buffer=40)
        b.load_state_dict(states[k])
        assert [next(b)["seq_id"].tolist() for _ in range(40 - k - 1)] == batches[k + 1 :], k
        b.close()
    r = CacheReader(open_cache(remote), batch_size=7, seed=7, shuffle_buffer=40, read_ahead=0)
    assert [next(r)["seq_id"].tolist() for _ in range(10)] == batches[:10]
    r.close()


def test_cache_dataset_reads_a_uri(pair):
    from sparsekd.integrations.torch import CacheDataset

    local, remote = pair
    ids = lambda ds: [e.seq.seq_id for e in ds]  # noqa: E731
    assert ids(CacheDataset(remote, seed=3)) == ids(CacheDataset(local, seed=3))


def test_train_student_and_evaluate_from_s3(pair, tiny_student, tmp_path):
    local, remote = pair
    runs = {}
    for where, cache in (("local", local), ("s3", remote)):
        out = tmp_path / where
        run_cli(
            "train-student", "--cache", cache, "--eval-cache", cache, "--eval-every", 3,
            "--student", tiny_student, "--out", out, "--steps", 3, "--batch-size", 2, "--quiet",
            check=True,
        )  # fmt: skip
        timing = ("tokens_per_s", "data_wait_s", "data_wait_frac")
        runs[where] = [
            {k: v for k, v in json.loads(x).items() if k not in timing}
            for x in (out / "metrics.jsonl").read_text().splitlines()
        ]
        runs[where + "-eval"] = json.loads(
            run_cli(
                "evaluate", "--model", out / "final", "--cache", cache, "--json", check=True
            ).stdout
        )
    assert runs["s3"] == runs["local"] and runs["s3-eval"] == runs["local-eval"]
    assert np.isfinite(runs["s3-eval"]["lm_loss"])
