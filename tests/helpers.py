"""What many tests share: running the real `sparsekd` command, killing a build mid-job,
digests of a cache's files, and the one table of numerical tolerances."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# Tolerances, one table: (dtype of the computation) -> assert_close keywords, judged against
# a float64 oracle. Low precision is judged relative to plain torch's own error instead
# (tests/kernels/test_sparse_kl.py: error <= 2x torch's in the same dtype, plus atol).
TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
}
LOSS_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def run_cli(
    *args, check: bool = False, timeout: int = 600, fresh_process: bool = False, **kw
) -> subprocess.CompletedProcess:
    """Run the real `sparsekd` command: in this process (`cli.main`, its output captured),
    or in a fresh one where the test needs a process of its own (`fresh_process`, or an
    `env=`/`cwd=` of its own: nothing leaks into the test process). The same error policy,
    exit codes and output either way: `cli.main` is what the entry point runs."""
    if fresh_process or kw:
        env = {**os.environ, **kw.pop("env", {})}
        proc = subprocess.run(
            [sys.executable, "-m", "sparsekd", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            **kw,
        )
    else:
        import contextlib
        import io

        from sparsekd import cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # a command that exits by itself
                code = e.code if isinstance(e.code, int) else 1
        proc = subprocess.CompletedProcess(
            ["sparsekd", *args], code, out.getvalue(), err.getvalue()
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsekd {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(*args, timeout: int = 600, nproc: int = 2) -> subprocess.CompletedProcess:
    """`nproc` local ranks (gloo on CPU) of `args` under torchrun, one thread each. The
    rendezvous is `--standalone`: its store listens on a port the system picks, so runs on
    both xdist workers at once never meet on a fixed port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be sparsekd's one-line error."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("shards/*/*.parquet"))


def staged_files(cache: Path) -> list[Path]:
    """Files left in the private staging folders of writer processes."""
    return sorted(p for p in cache.glob(".tmp/*/*"))


def digests(cache: Path) -> dict[str, str]:
    """sha256 of every shard, index file and the manifest of a cache."""
    files = shard_files(cache) + sorted(cache.glob("index/*.parquet")) + [cache / "manifest.json"]
    return {
        p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.exists()
    }


def kill_build_after(out: Path, shards: int, *args, timeout: float = 300, env=None) -> int:
    """Start `sparsekd build-cache *args`, SIGKILL its whole process group (engine workers
    included) once `out` holds `shards` shard files; return how many were written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsekd", "build-cache", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.time() + timeout
    while time.time() < deadline and len(shard_files(out)) < shards and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(shard_files(out))


def flip_bit(path: Path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def synthetic_cache(
    path: Path, *, n=9, L=7, K=5, V=1000, per_shard=4, seed=1, fingerprint="f" * 64, masked=False
) -> dict:
    """A small top-K cache written by the real writer and manifest code, without a teacher:
    random tokens and targets, one domain; `masked`: about half the positions learnt.
    Returns what was written (every position's targets, and the masks), for comparison."""
    import numpy as np

    from sparsekd.cache_builder.encoder import from_topk
    from sparsekd.cache_builder.writer import encode_table, write_shard
    from sparsekd.schemas import format as F
    from sparsekd.schemas.manifest import ShardIndex, write_manifest
    from sparsekd.storage import open_store

    rng = np.random.default_rng(seed)
    seq_ids = [F.make_seq_id(0, i) for i in range(n)]
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
    masks = [rng.random(L) < 0.5 if masked else np.ones(L, bool) for _ in range(n)]
    meta = {
        "format": F.FORMAT_NAME,
        "mode": "topk",
        "k": K,
        "seq_len": L,
        "fingerprint": fingerprint,
        "vocab_size": V,
        "tokenizer_hash": "t" * 64,
        "logprob_scale": F.LOGPROB_SCALE,
        "weighted": False,
        "row_group_size": F.ROW_GROUP_SIZE,
        "teacher": "synthetic",
        "samples": None,
    }
    store, entries = open_store(path), []
    for part, a in enumerate(range(0, n, per_shard)):
        b = min(n, a + per_shard)
        m = masks[a:b]
        supports = [from_topk(i[k], lp[k]) for i, lp, k in zip(top_ids[a:b], top_lp[a:b], m)]
        tlp = [t[k] for t, k in zip(tok_lp[a:b], m)]
        t = encode_table("topk", seq_ids[a:b], ids[a:b], nxt[a:b], m, tlp, supports)
        entries.append(write_shard(store, 0, part, t, meta))
    write_manifest(
        store, meta=meta, fingerprint=fingerprint, shards=ShardIndex.from_entries(entries)
    )
    store.close()
    return {
        "seq_ids": seq_ids,
        "ids": ids,
        "nxt": nxt,
        "top_ids": top_ids,
        "top_lp": top_lp,
        "tok_lp": tok_lp,
        "masks": masks,
    }


def copy_cache(src, dst: str) -> str:
    """Every object of a cache folder copied to another (a path or a URI), through the
    storage seam; returns `dst`."""
    from sparsekd.storage import open_store

    a, b = open_store(src), open_store(dst)
    for name in a.list(""):
        b.put(name, a.read(name))
    b.close()
    return dst


def store_digests(server, uri: str) -> dict[str, str]:
    """`digests` of a cache in the bucket of `server`, read with boto3 (not sparsekd)."""
    import fnmatch

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    objs = server.objects(bucket, prefix)
    keep = lambda n: (
        fnmatch.fnmatch(n, "shards/*/*.parquet")
        or (  # noqa: E731
            fnmatch.fnmatch(n, "index/*.parquet") or n == "manifest.json"
        )
    )
    return {n: hashlib.sha256(b).hexdigest() for n, b in objs.items() if keep(n)}


def s3_flip_byte(server, uri: str, name: str, offset: int, mask: int = 0x10) -> None:
    """Rewrite one object of a cache in place with one byte changed (same size)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    key = f"{prefix}/{name}" if prefix else name
    c = server.client()
    data = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[offset] ^= mask
    c.put_object(Bucket=bucket, Key=key, Body=bytes(data))
