"""The storage seam: every byte of corpus, cache, index, manifest and records is read and
written through a `Store`, chosen by the URI of its folder.

    store = open_store("s3://bucket/caches/run1")   # gs://..., a local path, any fsspec URL
    store.put("manifest.json", data)                # appears whole or not at all
    store.put_new("build_config.json", data)        # conditional create: False if it exists
    f = store.open("shards/00000/00000000-00000.parquet")   # f.read_at(n, offset): ranged
    store.list("records/domains/")                  # {name relative to the folder: size}

Names inside a store are relative, with "/" separators. Object stores have no rename, no
append and no directories: everything sparsekd writes is one whole object, published by
one `put` (a single PUT, or a multipart upload whose completion publishes it), so a reader
or a killed writer never sees part of one.

The kinds of store:

- `LocalStore` (a path or `file://`): a `put` writes into this process's private staging
  folder `.tmp/<host>-<pid>-<random>/`, fsyncs the file, renames it into place and fsyncs
  the destination folder; `put_new` does the same with link(2), which fails when the name
  exists. A staging folder whose process is gone (same host, pid not running) or untouched
  for an hour belongs to a dead writer and is swept by the next writer.
- `S3Store` (`s3://bucket/prefix`): pyarrow's native S3 client for reads (ranged GETs),
  listings and large writes (multipart upload, parts sent in the background, retried with
  exponential backoff); objects below `SMALL_OBJECT` bytes are one PutObject through boto3,
  which also gives `put_new` its `If-None-Match: *` (S3's conditional create). Without
  boto3, `put_new` is a check then a put.
- `PyarrowStore` (`gs://bucket/prefix`): pyarrow's native GCS client; `put_new` is a check
  then a put (pyarrow exposes no precondition).
- `FsspecStore` (any other protocol fsspec knows: `memory://`, `az://`, `hdfs://`, ...):
  `put_new` through fsspec's create mode where the filesystem has one.

Credentials are never part of a URI (a URI with user info is refused): each client finds
them where it always does (environment, profile files, instance metadata). An S3-compatible
store is named by the standard `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` variables.
Errors of the store itself (no such bucket, access denied, bad credentials, an endpoint
that does not answer) are `StorageError`s with one line that names the URI, never a key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from sparsekd.errors import SparsekdError, StorageError

STAGING = ".tmp"  # LocalStore: per-process staging folders, under the store's root
STALE_STAGING_S = 3600  # a staging folder untouched this long belongs to a dead process
SMALL_OBJECT = 8 << 20  # S3: below this, one PutObject; above, a multipart upload
READ_CHUNK = 8 << 20
S3_RETRY_ATTEMPTS = 10  # pyarrow's standard AWS retry strategy: exponential backoff
STORE_TIMEOUT_ENV = "SPARSEKD_STORE_TIMEOUT_S"
STORE_TIMEOUT_S = 120.0  # default bound of one remote store operation, retries included
SLOWEST_WRITE = 1 << 20  # bytes/s: a write's bound grows by its size at this rate
# S3 clients' own timeouts, each capped by the bound: pyarrow's are the AWS SDK's defaults
# (connect 1 s, 3 s without a byte), boto3's its own (60 s, 60 s)
PYARROW_S3_TIMEOUTS_S = (1.0, 3.0)
BOTO3_TIMEOUTS_S = (60.0, 60.0)


def process_tag() -> str:
    """A name no other process uses: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _dead_here(tag: str) -> bool:
    """Whether `tag` (a `process_tag`) names a process of this host that no longer runs.
    A pid reused since reads as alive: the folder then waits for the time-based sweep."""
    host, _, rest = tag.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def is_uri(path) -> bool:
    """A URI with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


def absolute(uri: str | os.PathLike) -> str:
    """A URI as it is; a local path made absolute (for records that outlive the cwd)."""
    return str(uri) if is_uri(uri) else str(Path(uri).resolve())


def join(uri: str, name: str) -> str:
    """`uri` + "/" + `name` for URIs and paths alike."""
    return str(uri).rstrip("/") + "/" + name if name else str(uri)


# --- local files (also used directly for run directories, which are always local) ----------


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o644)  # caches are shared between users


def atomic_write_file(path: str | os.PathLike, data: bytes) -> None:
    """A local file written whole or not at all: a unique temporary file beside `path`,
    fsynced, renamed over it, the folder fsynced (for run directories and checkpoints)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_WRITE_ERRORS = {
    "no space left": "no space left on the device",
    "file too large": "a file-size limit was reached (ulimit -f)",
    "disk quota": "the disk quota is exhausted",
    "read-only file system": "the file system is read-only",
    "permission denied": "permission denied",
}


def write_error(e: BaseException) -> str | None:
    """What an error raised while writing says in words, when it is the disk's (full,
    a size limit, read-only): torch, safetensors and tokenizers wrap OSErrors in their own
    exception types, so the message is what tells."""
    text = str(e).lower()
    return next((why for key, why in _WRITE_ERRORS.items() if key in text), None)


def publish_folder(path: str | os.PathLike, write) -> Path:
    """A local folder written whole or not at all: `write(tmp)` fills a temporary sibling,
    which then replaces `path`. A disk that refuses the writes is a one-line StorageError
    naming `path`, and nothing half-written is left under its name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{process_tag()}.tmp")
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.{process_tag()}.old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_error(e)
        if why is None:
            raise
        raise StorageError(f"cannot write {path}: {why}") from e
    fsync_dir(path.parent)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _error(error):
    if error is None:
        from sparsekd.errors import CacheError

        return CacheError
    return error


def parse_json(data: bytes, where: str, error=None) -> dict:
    """A JSON object from bytes; `error` (default CacheError) names `where` when it is not."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(error)(f"{where} is not valid JSON") from e
    if not isinstance(obj, dict):
        raise _error(error)(f"{where} is not a JSON object")
    return obj


def read_json_file(path: str | os.PathLike, what: str, error=None) -> dict:
    """A local JSON document (run directories, checkpoints)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise _error(error)(f"{what} not found: {path}") from e
    return parse_json(data, f"{what} {path}", error)


def json_bytes(obj) -> bytes:
    """The one JSON encoding of sparsekd's small documents (manifest, records, configs)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# --- the store interface ---------------------------------------------------------------------


class Store:
    """A folder of named objects. Subclasses implement the primitives."""

    uri: str
    local = False  # a POSIX folder: sizes and bytes can change after publication
    conditional = False  # put_new is atomic (not a check, then a put)

    def url(self, name: str = "") -> str:
        """Where `name` is, for messages and for foreign readers."""
        return join(self.uri, name)

    # reads
    def open(self, name: str):
        """A pyarrow random-access file: each `read_at` is a ranged read (thread-safe on an
        object store, where it is one GET); opening may cost one request (its size)."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """The object's size, None when it does not exist."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every object whose name starts with `prefix`: {name: size}, sorted by name."""
        return {n: size for n, (size, _) in self.listing(prefix).items()}

    def listing(self, prefix: str = "") -> dict[str, tuple[int, int | None]]:
        """As `list`, with each object's modification time: {name: (size, mtime_ns)}
        (None where the store keeps no time)."""
        raise NotImplementedError

    def top(self) -> list[str]:
        """The first components of every name in the store (what a folder listing shows)."""
        return sorted({n.split("/", 1)[0] for n in self.list("")})

    def exists(self) -> bool:
        """The folder exists (an object store: its bucket exists)."""
        raise NotImplementedError

    # writes
    def put(self, name: str, data: bytes) -> None:
        """Publish `data` as `name` (replacing it): whole or not at all."""
        raise NotImplementedError

    def put_new(self, name: str, data: bytes) -> bool:
        """Publish `data` as `name` unless it exists; False when it did. Atomic where
        `conditional`; elsewhere a check, then a put (a race between two writers of the
        same new name can let the second overwrite the first)."""
        if self.size(name) is not None:
            return False
        self.put(name, data)
        return True

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        for name in self.list(prefix):
            self.delete(name)

    def close(self) -> None:
        """Release what this process holds (a LocalStore's staging folder)."""

    # derived
    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        f = self.open(name)
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
        return h.hexdigest()

    def read_json(self, name: str, what: str, error=None) -> dict:
        """A small JSON document; `error` (default CacheError) when missing or malformed."""
        try:
            data = self.read(name)
        except FileNotFoundError as e:
            raise _error(error)(f"{what} not found: {self.url(name)}") from e
        return parse_json(data, f"{what} {self.url(name)}", error)

    def put_json(self, name: str, obj) -> None:
        self.put(name, json_bytes(obj))


class LocalStore(Store):
    local = True
    conditional = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(str(root).removeprefix("file://"))
        self.uri = str(root)
        self._staging: Path | None = None

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def open(self, name: str):
        import pyarrow as pa

        return pa.OSFile(str(self._path(name)), "r")

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def size(self, name: str) -> int | None:
        try:
            st = os.stat(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def exists(self) -> bool:
        return self.root.is_dir()

    def listing(self, prefix: str = "") -> dict[str, tuple[int, int | None]]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder)
        out = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            for f in filenames:
                name = rel + f
                if not f.startswith(".") and name.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, f))
                    except FileNotFoundError:  # deleted while listing
                        continue
                    out[name] = (st.st_size, st.st_mtime_ns)
        return dict(sorted(out.items()))

    def top(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))

    def _stage(self, data: bytes, name: str) -> Path:
        """`data` in a fresh, fsynced file of this process's staging folder; a disk that
        refuses it (full, a size limit, read-only) is a StorageError naming `name`."""
        if self._staging is None:
            parent = self.root / STAGING
            self._sweep(parent)
            self._staging = parent / process_tag()
        tmp = self._staging / uuid.uuid4().hex
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
            _write_synced(tmp, data)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            why = write_error(e)
            if why is None:
                raise
            raise StorageError(f"cannot write {self.url(name)}: {why}") from e
        return tmp

    @staticmethod
    def _sweep(parent: Path) -> None:
        """Remove the staging folders of dead writers: one of this host whose process is
        gone (a worker killed mid-write), or any untouched for `STALE_STAGING_S`."""
        if not parent.is_dir():
            return
        now = time.time()
        for d in parent.iterdir():
            try:
                if _dead_here(d.name) or now - d.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(d, ignore_errors=True)
            except FileNotFoundError:  # another process swept it first
                pass

    def put(self, name: str, data: bytes) -> None:
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._stage(data, name)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)

    def put_new(self, name: str, data: bytes) -> bool:
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._stage(data, name)
        try:
            os.link(tmp, final)  # fails if `final` exists: an atomic create
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return True

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if prefix.endswith("/") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            super().delete_prefix(prefix)

    def sha256(self, name: str) -> str:
        return sha256_file(self._path(name))

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _classify(message: str) -> str | None:
    """What a store's error message says went wrong, in words (None: not a store error)."""
    m = message.lower()
    if "oauth2 access token" in m or "default credentials" in m:
        return (
            "no Google Cloud credentials were found (set GOOGLE_APPLICATION_CREDENTIALS to "
            "a key file, or run where the metadata server answers)"
        )
    if "no_such_bucket" in m or "nosuchbucket" in m or "bucket does not exist" in m:
        return "the bucket does not exist"
    if any(k in m for k in ("invalid_access_key", "invalidaccesskey", "signature_does_not",
                            "signaturedoesnotmatch", "expired_token", "expiredtoken",
                            "invalidtoken", "unrecognizedclient")):  # fmt: skip
        return "the credentials were refused (check AWS_ACCESS_KEY_ID / the profile in use)"
    if "access_denied" in m or "accessdenied" in m or "forbidden" in m or "403" in m:
        return "access denied (missing credentials or no permission)"
    if "could not resolve" in m or "couldn't connect" in m or "connection refused" in m:
        return "the endpoint cannot be reached"
    if "network_connection" in m or "curlcode" in m:
        return "the endpoint cannot be reached"
    return None


def store_timeout() -> float:
    """The time bound of one operation on a remote store, in seconds (STORE_TIMEOUT_ENV)."""
    raw = os.environ.get(STORE_TIMEOUT_ENV)
    if raw is None:
        return STORE_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise StorageError(f"{STORE_TIMEOUT_ENV}={raw!r}: give a number of seconds above 0")
    return seconds


_ABANDONED: list[threading.Thread] = []  # store calls given up on by `_within`


def abandoned_calls() -> int:
    """Store calls given up on that are still running in their client: a process that
    has reported the error exits without waiting for them (cli.exit), as a client's own
    shutdown would (pyarrow's S3 finaliser waits for its retries to end)."""
    return sum(t.is_alive() for t in _ABANDONED)


def _within(seconds: float, call, late: str):
    """call() in a thread of its own, waited for at most `seconds`; a StorageError saying
    `late` when it has not returned by then (the thread is left to the client's own
    timeouts: it is a daemon, and holds nothing the caller uses)."""
    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="sparsekd-store", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        _ABANDONED.append(thread)
        raise StorageError(late)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _remote(method):
    """A remote store's operation: bounded in time (store_timeout(), plus the time a write
    of its size takes at SLOWEST_WRITE), and its client's errors about access, buckets or
    endpoints turned into a one-line StorageError naming the store (a missing object stays
    FileNotFoundError)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        seconds = store_timeout()
        seconds += sum(len(a) for a in args if isinstance(a, bytes)) / SLOWEST_WRITE
        late = (
            f"{self.uri}: the store did not answer within {seconds:g} s ({method.__name__}); "
            f"check the endpoint and the network, or raise {STORE_TIMEOUT_ENV}"
        )
        try:
            return _within(seconds, lambda: method(self, *args, **kwargs), late)
        except (FileNotFoundError, SparsekdError):
            raise
        except Exception as e:
            why = _classify(f"{type(e).__name__} {e} {getattr(e, 'response', '')}")
            if why is None:
                raise
            raise StorageError(f"{self.uri}: {why}") from e

    return wrapper


class PyarrowStore(Store):
    """A folder of a pyarrow.fs filesystem (S3, GCS): `base` is "bucket/prefix"."""

    def __init__(self, uri: str, fs, base: str):
        self.uri, self.fs, self.base = uri.rstrip("/"), fs, base.strip("/")

    def _key(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    @_remote
    def open(self, name: str):
        return self.fs.open_input_file(self._key(name))

    @_remote
    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._key(name)) as f:
            return f.readall()

    @_remote
    def size(self, name: str) -> int | None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._key(name))
        return info.size if info.type == pafs.FileType.File else None

    @_remote
    def exists(self) -> bool:
        import pyarrow.fs as pafs

        bucket = self.base.split("/", 1)[0]
        return self.fs.get_file_info(bucket).type == pafs.FileType.Directory

    @_remote
    def listing(self, prefix: str = "") -> dict[str, tuple[int, int | None]]:
        import pyarrow.fs as pafs

        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        sel = pafs.FileSelector(self._key(folder), recursive=True, allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File:
                continue
            name = info.path[len(self.base) + 1 :]
            if name.startswith(prefix):
                out[name] = (info.size, info.mtime_ns)
        return dict(sorted(out.items()))

    @_remote
    def top(self) -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.base, recursive=False, allow_not_found=True)
        return sorted(i.path[len(self.base) + 1 :] for i in self.fs.get_file_info(sel))

    @_remote
    def put(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._key(name)) as f:
            f.write(data)

    @_remote
    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass


class S3Store(PyarrowStore):
    """S3 and S3-compatible stores: pyarrow for reads, listings and multipart uploads;
    boto3 (when installed) for small objects and conditional creates."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        u = urlparse(uri)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        seconds = store_timeout()
        kwargs = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(S3_RETRY_ATTEMPTS),
            "connect_timeout": min(PYARROW_S3_TIMEOUTS_S[0], seconds),
            "request_timeout": min(PYARROW_S3_TIMEOUTS_S[1], seconds),
        }
        if endpoint:
            e = urlparse(endpoint)
            kwargs.update(endpoint_override=e.netloc, scheme=e.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        elif not endpoint:
            late = f"{uri}: the bucket's region was not found within {seconds:g} s"
            try:
                kwargs["region"] = _within(seconds, lambda: pafs.resolve_s3_region(u.netloc), late)
            except OSError as e:
                raise StorageError(f"{uri}: {_classify(str(e)) or 'bucket region unknown'}") from e
        super().__init__(uri, pafs.S3FileSystem(**kwargs), f"{u.netloc}/{u.path.strip('/')}")
        self.bucket = u.netloc
        try:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"},
                connect_timeout=min(BOTO3_TIMEOUTS_S[0], seconds),
                read_timeout=min(BOTO3_TIMEOUTS_S[1], seconds),
            )
            self._client = boto3.client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
            self.conditional = True
        except ImportError:
            self._client = None

    def _object_key(self, name: str) -> str:
        return self._key(name).split("/", 1)[1]

    def put(self, name: str, data: bytes) -> None:
        if self._client is None or len(data) >= SMALL_OBJECT:
            return super().put(name, data)
        self._put_object(name, data)

    @_remote
    def _put_object(self, name: str, data: bytes, **extra) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._object_key(name), Body=data, **extra)

    def put_new(self, name: str, data: bytes) -> bool:
        if self._client is None:
            return super().put_new(name, data)
        from botocore.exceptions import ClientError

        try:
            self._put_object(name, data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise
        return True


def _mtime_ns(info: dict) -> int | None:
    """An fsspec listing entry's modification time (each filesystem names it its own way)."""
    import datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, str):
            try:
                v = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, datetime.datetime):
            return int(v.timestamp() * 1e9)
        if isinstance(v, (int, float)):
            return int(v * 1e9)
    return None


class FsspecStore(Store):
    """Any filesystem fsspec knows, for the protocols pyarrow has no client for."""

    def __init__(self, uri: str):
        try:
            import fsspec
        except ImportError as e:
            raise StorageError(f"{uri}: this protocol needs fsspec (pip install fsspec)") from e
        protocol = urlparse(uri).scheme
        try:
            self.fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{uri}: no filesystem for {protocol}:// ({e})") from e
        self.uri = uri.rstrip("/")
        self.base = self.fs._strip_protocol(self.uri).rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    @_remote
    def open(self, name: str):
        import pyarrow as pa

        return pa.PythonFile(self.fs.open(self._key(name), "rb"), mode="r")

    @_remote
    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    @_remote
    def size(self, name: str) -> int | None:
        try:
            info = self.fs.info(self._key(name))
        except FileNotFoundError:
            return None
        return info["size"] if info["type"] == "file" else None

    @_remote
    def exists(self) -> bool:
        return self.fs.exists(self.base)

    @_remote
    def listing(self, prefix: str = "") -> dict[str, tuple[int, int | None]]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:
            found = self.fs.find(self._key(folder), detail=True)
        except FileNotFoundError:
            return {}
        strip = len(self.fs._strip_protocol(self.base).rstrip("/")) + 1
        out = {}
        for path, info in found.items():
            name = self.fs._strip_protocol(path)[strip:]
            if info["type"] == "file" and name.startswith(prefix):
                out[name] = (info["size"], _mtime_ns(info))
        return dict(sorted(out.items()))

    @_remote
    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(name), data)

    @_remote
    def put_new(self, name: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._key(name), data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):  # no create mode here
            return super().put_new(name, data)
        return True

    @_remote
    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass


@functools.lru_cache(maxsize=64)
def open_store(uri: str | os.PathLike) -> Store:
    """The store of the folder at `uri` (one instance per URI per process)."""
    uri = str(uri)
    u = urlparse(uri)
    if not is_uri(uri):
        return LocalStore(uri)
    if u.username or u.password:
        raise StorageError(
            f"{u.scheme}://{u.hostname}...: credentials in a URI are refused (they would be "
            "recorded with the cache); use the environment or a profile"
        )
    if u.scheme == "s3":
        return S3Store(uri)
    if u.scheme in ("gs", "gcs"):
        return _gcs_store(uri)
    return FsspecStore(uri)


def _gcs_store(uri: str) -> Store:
    """GCS through pyarrow's client (fsspec's gcsfs where pyarrow was built without it),
    its retries limited to half of store_timeout(); STORAGE_EMULATOR_HOST (or
    CLOUD_STORAGE_EMULATOR_ENDPOINT) names an emulator, reached without credentials."""
    import datetime

    try:
        from pyarrow.fs import GcsFileSystem
    except ImportError:
        return FsspecStore(uri)
    # half the bound: the client gives up, with its own reason, before the bound is reached
    half = max(1, int(store_timeout() / 2))
    kwargs = {"retry_time_limit": datetime.timedelta(seconds=half)}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get(
        "CLOUD_STORAGE_EMULATOR_ENDPOINT"
    )
    if emulator:
        e = urlparse(emulator if "//" in emulator else f"http://{emulator}")
        kwargs.update(anonymous=True, scheme=e.scheme, endpoint_override=e.netloc)
    u = urlparse(uri)
    return PyarrowStore(uri, GcsFileSystem(**kwargs), f"{u.netloc}/{u.path.strip('/')}")


__all__ = [
    "Store",
    "LocalStore",
    "PyarrowStore",
    "S3Store",
    "FsspecStore",
    "StorageError",
    "open_store",
    "store_timeout",
    "abandoned_calls",
    "is_uri",
    "absolute",
    "join",
    "atomic_write_file",
    "fsync_dir",
    "sha256_file",
    "publish_folder",
    "write_error",
    "json_bytes",
    "parse_json",
    "read_json_file",
]
