"""The storage seam on a local disk, on a real S3 endpoint over HTTP (moto's server on
127.0.0.1) and on an fsspec filesystem: the same primitives with the same meaning; whole
publication (a killed multipart upload leaves no object); conditional create; one-line
errors for a missing bucket and refused credentials that never show a key."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from sparsekd.errors import StorageError
from sparsekd.storage import STAGING, STALE_STAGING_S, STORE_TIMEOUT_ENV, LocalStore, open_store
from tests.helpers import error_line, run_cli
from tests.s3 import BlackHole, DelayProxy, S3Server, endpoint_env


@pytest.fixture(params=["local", "s3", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "folder")
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return open_store(f"{bucket}/some/prefix")
    return open_store(f"memory://sparsekd-test/{uuid.uuid4().hex}")


def test_primitives_mean_the_same_everywhere(store):
    assert store.size("a.json") is None and store.list("") == {}
    store.put("a.json", b"1")
    store.put("sub/b.bin", b"22")
    store.put("sub/c.bin", b"333")
    store.put("subway.bin", b"4444")
    assert store.read("sub/c.bin") == b"333" and store.size("sub/b.bin") == 2
    assert store.list("sub/") == {"sub/b.bin": 2, "sub/c.bin": 3}
    assert store.list("sub") == {"sub/b.bin": 2, "sub/c.bin": 3, "subway.bin": 4}
    assert sorted(store.top()) == ["a.json", "sub", "subway.bin"]
    f = store.open("sub/c.bin")
    assert f.read_at(2, 1) == b"33"
    store.put("a.json", b"replaced")
    assert store.read("a.json") == b"replaced"
    assert store.put_new("a.json", b"other") is False and store.read("a.json") == b"replaced"
    assert store.put_new("new.json", b"n") is True and store.read("new.json") == b"n"
    store.delete("sub/b.bin")
    store.delete("absent")  # deleting what is not there is not an error
    assert list(store.list("sub/")) == ["sub/c.bin"]
    with pytest.raises(FileNotFoundError):
        store.read("sub/b.bin")
    assert store.sha256("sub/c.bin") == __import__("hashlib").sha256(b"333").hexdigest()


def test_s3_uses_conditional_create_and_multipart_for_large_objects(s3_bucket):
    store = open_store(f"{s3_bucket}/p")
    assert store.conditional
    big = os.urandom(9 << 20)  # above SMALL_OBJECT: a multipart upload through pyarrow
    store.put("big.bin", big)
    assert store.read("big.bin") == big and store.size("big.bin") == len(big)


def test_a_killed_multipart_upload_publishes_nothing(s3_server, s3_bucket, tmp_path):
    """A process killed in the middle of a large upload: no object appears under its name
    (the upload is never completed), and a listing does not show it."""
    started = []
    with DelayProxy(s3_server.port, delay_s=0.05, on_request=started.append) as proxy:
        script = tmp_path / "put.py"
        script.write_text(
            "import os, sys\n"
            "from sparsekd.storage import open_store\n"
            f"open_store('{s3_bucket}/p').put('big.bin', os.urandom(40 << 20))\n"
        )
        env = {**os.environ, **proxy.env}
        proc = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not any(b"partNumber=2" in r for r in started):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(b"?uploads" in r for r in started), "no multipart upload was started"
    store = open_store(f"{s3_bucket}/p")
    assert store.size("big.bin") is None and store.list("") == {}


def test_local_staging_is_private_and_only_stale_folders_are_swept(tmp_path):
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    a.put("x/one", b"1")
    b.put("x/two", b"2")
    assert a._staging != b._staging  # same process, same folder: still two staging folders
    (b._staging / "half-written").write_bytes(b"y")
    old = time.time() - STALE_STAGING_S - 10
    os.utime(b._staging, (old, old))
    live = a._staging
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    killed = tmp_path / STAGING / f"{socket.gethostname()}-{gone.stdout.strip()}-0123abcd"
    killed.mkdir()  # a worker of this host killed mid-write, a moment ago
    (killed / "half-written").write_bytes(b"z")
    LocalStore(tmp_path).put("x/three", b"3")  # a new writer sweeps what is stale, only that
    assert not b._staging.exists() and not killed.exists() and live.exists()
    assert LocalStore(tmp_path).list("") == {"x/one": 1, "x/three": 1, "x/two": 1}
    a.close()
    assert not live.exists()


def test_a_missing_bucket_is_one_line(s3_server, smollm2_dir):
    for args in (
        ["inspect", "s3://no-such-bucket-here/cache"],
        ["build-cache", "--teacher", smollm2_dir, "--engine", "hf", "--out",
         "s3://no-such-bucket-here/cache", "--max-sequences", "1", "--seq-len", "16", "--quiet"],
        ["build-cache", "--teacher", smollm2_dir, "--corpus", "s3://no-such-bucket-here/data/",
         "--engine", "hf", "--out", "s3://no-such-bucket-here/c", "--quiet"],
    ):  # fmt: skip
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = error_line(proc)
        assert line.startswith("sparsekd: error: ") and "s3://no-such-bucket-here/" in line, line
        assert "the bucket does not exist" in line, line


def test_refused_credentials_are_one_line_without_the_key(smollm2_dir):
    secret = "verysecretvalue123"
    with S3Server(auth=True) as server:
        env = {
            **server.env,
            "AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY00",
            "AWS_SECRET_ACCESS_KEY": secret,
        }
        for args in (
            ["inspect", "s3://anybucket/cache"],
            ["build-cache", "--teacher", smollm2_dir, "--engine", "hf", "--out",
             "s3://anybucket/cache", "--max-sequences", "1", "--seq-len", "16", "--quiet"],
        ):  # fmt: skip
            proc = run_cli(*args, env=env)
            assert proc.returncode == 2, proc.stderr[-2000:]
            line = error_line(proc)
            assert line.startswith("sparsekd: error: s3://anybucket/cache: "), line
            assert "credentials were refused" in line or "access denied" in line, line
            out = proc.stdout + proc.stderr
            assert secret not in out and "AKIANOTAREALKEY00" not in out


def test_credentials_in_a_uri_are_refused():
    with pytest.raises(StorageError, match="credentials in a URI are refused"):
        open_store("s3://key:secret@bucket/cache")


def _hanging_store_env(kind: str, port: int) -> dict:
    """The environment that points a store of `kind` at a server on `port`."""
    if kind == "s3":
        return {**endpoint_env(port), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


_EVERY_PRIMITIVE = """
import json, os, sys, time
from sparsekd.storage import open_store
store = open_store(sys.argv[1])
calls = {
    "listing": lambda: store.list("records/"),
    "size": lambda: store.size("manifest.json"),
    "read": lambda: store.read("manifest.json"),
    "put": lambda: store.put("records/x.json", b"{}"),
    "put_new": lambda: store.put_new("build_config.json", b"{}"),
    "exists": store.exists,
}
out = {}
for name, call in calls.items():
    started = time.monotonic()
    try:
        call()
        out[name] = [time.monotonic() - started, None]
    except Exception as e:
        out[name] = [time.monotonic() - started, f"{type(e).__name__}: {e}"]
print(json.dumps(out), flush=True)
os._exit(0)  # not waiting for the abandoned calls' own retries, as the CLI does not
"""


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_every_operation_on_a_store_that_never_answers_ends_within_its_bound(kind):
    """A store whose endpoint accepts connections and never answers: each primitive ends
    in a StorageError naming the store and the bound, within the bound (1 s here), never
    in a client's endless wait or retry loop (pyarrow's GCS client has no stall timeout).
    In a process of its own: the abandoned client calls keep the clients' thread pools
    busy until their own retries end, which would slow the tests after it."""
    bound = 1.0
    uri = f"{kind}://hung-{uuid.uuid4().hex[:8]}/cache"
    with BlackHole() as hole:
        env = {**os.environ, **_hanging_store_env(kind, hole.port), STORE_TIMEOUT_ENV: str(bound)}
        proc = subprocess.run([sys.executable, "-c", _EVERY_PRIMITIVE, uri], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert hole.connections  # the client did reach the endpoint, and waited on it
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, (took, error) in json.loads(proc.stdout.splitlines()[-1]).items():
        assert error is not None and error.startswith(
            f"StorageError: {uri}: the store did not answer within {bound:g} s"
        ), error
        assert took < bound + 0.5, (name, took)
    with pytest.raises(StorageError, match=f"{STORE_TIMEOUT_ENV}='soon'"):
        os.environ[STORE_TIMEOUT_ENV] = "soon"
        try:
            open_store(f"{kind}://other-{uuid.uuid4().hex[:8]}/cache").size("x")
        finally:
            del os.environ[STORE_TIMEOUT_ENV]


@pytest.mark.parametrize("kind", ["gs", "s3"])
def test_a_build_into_a_store_that_never_answers_is_one_line(kind, tiny_llama_dir):
    """The reported case: `build-cache --out gs://...` against a store that never answers
    said nothing for 15 minutes; now one line naming the URI and the bound, exit 2, and the
    process ends then (it does not wait for the abandoned calls' retries: pyarrow's S3
    client would hold its exit about 100 s more)."""
    with BlackHole() as hole:
        env = {**_hanging_store_env(kind, hole.port), STORE_TIMEOUT_ENV: "2"}
        started = time.monotonic()
        proc = run_cli("build-cache", "--teacher", tiny_llama_dir, "--engine", "hf", "--out",
                       f"{kind}://hung-bucket/cache", "--max-sequences", "1", "--seq-len",
                       "16", "--quiet", env=env, timeout=300)  # fmt: skip
        took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc)
    assert line.startswith(f"sparsekd: error: {kind}://hung-bucket/cache: the store did not "
                           "answer within 2 s"), line  # fmt: skip
    assert took < 30, took  # the interpreter's start and imports (~10 s here) and the bound


def test_transient_errors_are_retried(s3_server):
    """Every third request answered with a 503 "slow down" and a hang-up: puts (small and
    multipart), reads and listings still succeed, by the clients' retries with backoff."""
    bucket = s3_server.make_bucket(f"retry-{uuid.uuid4().hex[:8]}")
    with DelayProxy(s3_server.port, fail_every=3) as proxy:
        os.environ.update(proxy.env)
        try:
            store = open_store(f"{bucket}/x")  # a new store: its clients use the proxy
            big = os.urandom(9 << 20)
            for i in range(4):
                store.put(f"small-{i}", b"s" * 100)
            store.put("big", big)
            assert store.put_new("small-0", b"other") is False
            assert store.read("big") == big and len(store.list("")) == 5
        finally:
            os.environ.update(s3_server.env)
    assert proxy.failed >= 3


def _limited(kb: int, *args) -> subprocess.CompletedProcess:
    """`sparsekd *args` with files limited to `kb` KiB (ulimit -f): every write past it
    fails with EFBIG, as on a full disk."""
    cmd = " ".join(["ulimit -f", str(kb), ";", "exec", sys.executable, "-m", "sparsekd",
                    *(f"'{a}'" for a in args)])  # fmt: skip
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)


def test_writers_on_a_disk_that_refuses_them_are_one_line_and_leave_nothing_half_written(
    tmp_path, hf_topk_cache, tiny_student, tiny_llama_dir, smollm2_dir
):
    def one_line(proc, named):
        line = error_line(proc)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert line.startswith("sparsekd: error: cannot write") and named in line, line
        assert "a file-size limit was reached" in line, line

    train = ["train-student", "--cache", hf_topk_cache, "--student", tiny_student,
             "--steps", 2, "--batch-size", 2, "--quiet"]  # fmt: skip
    out = tmp_path / "ckpt"
    one_line(_limited(256, *train, "--out", out, "--save-every", 1), "the checkpoint")
    assert not list((out / "checkpoints").glob("step-*"))  # only a hidden, undone folder
    out = tmp_path / "final"
    one_line(_limited(256, *train, "--out", out), f"{out / 'final'}")
    assert not (out / "final").exists()
    out = tmp_path / "student"
    one_line(_limited(256, "init-student", "--like", smollm2_dir, "--out", out, "--layers", 1,
                      "--hidden", 64, "--heads", 2), f"{out}")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
    out = tmp_path / "teacher"
    one_line(_limited(1024, "prepare-teacher", "--out", out), f"{out}")
    assert not out.exists() or not any(out.iterdir())
    out = tmp_path / "cache"
    build = ["build-cache", "--teacher", tiny_llama_dir, "--engine", "hf", "--out", out,
             "--seq-len", 32, "--max-sequences", 4, "--quiet"]  # fmt: skip
    one_line(_limited(8, *build), f"{out}/shards/")
    assert not list(out.glob("shards/*/*.parquet"))
