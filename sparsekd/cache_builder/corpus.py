"""Corpus reading and packing: documents -> one token stream -> sequences of exactly L tokens.

Inputs (`--corpus`, repeatable, order kept): a file, a directory (searched recursively,
sorted) or a glob (sorted), of `.jsonl`, `.jsonl.zst`, `.txt` or `.parquet`. A `.txt` file
is one document; a `.jsonl` line and a Parquet row are one document each, the text taken
from `text_field`.

Packing: every document is tokenised without special tokens and followed by EOS; the
documents are concatenated into one stream; sequence i is `stream[i*L : (i+1)*L]` and its
`next_token` is `stream[(i+1)*L]` (so the last position of every sequence has a real
target). The incomplete tail of the stream is dropped. `seq_id = i` is stable: the same
inputs, tokenizer and L give the same sequences, byte for byte.

`corpus_fingerprint` hashes the input bytes (in order) plus the reading options; it is the
corpus identity recorded in every shard, cheap to compute before any tokenisation.

The built-in default corpus (`DEFAULT_CORPUS`) is the standard library's own documentation:
the docstrings of a fixed list of pure-Python stdlib modules, present on every machine
with Python, with no download.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUFFIXES = (".jsonl.zst", ".jsonl", ".txt", ".parquet")
DEFAULT_CORPUS = "builtin:stdlib-docs"

# Pure-Python modules with long, natural-English docstrings; fixed order for determinism.
_STDLIB_DOC_MODULES = (
    "argparse",
    "asyncio.events",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "netrc",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)


class CorpusError(ValueError):
    """A corpus input that cannot be read (missing, unsupported, malformed)."""


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    paths: tuple[str, ...] = (DEFAULT_CORPUS,)
    text_field: str = "text"
    seq_len: int = 512
    max_sequences: int | None = None
    skip_bad_lines: bool = False

    def __post_init__(self):
        if not self.paths:
            raise ValueError("corpus.paths: at least one --corpus is required")
        if self.seq_len < 2:
            raise ValueError(f"corpus.seq_len must be >= 2, got {self.seq_len}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"corpus.max_sequences must be >= 1, got {self.max_sequences}")


@dataclass
class CorpusStats:
    documents: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)


def _suffix(path: str) -> str | None:
    for s in SUFFIXES:
        if path.endswith(s):
            return s
    return None


def resolve_inputs(paths: tuple[str, ...]) -> list[str]:
    """Expand files, directories and globs into an ordered list of readable files."""
    files: list[str] = []
    for p in paths:
        if p == DEFAULT_CORPUS:
            files.append(p)
            continue
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and _suffix(str(f)))
            if not found:
                raise CorpusError(f"corpus directory {p} holds no {'/'.join(SUFFIXES)} file")
            files.extend(found)
        elif os.path.isfile(p):
            if not _suffix(p):
                raise CorpusError(f"corpus file {p}: unsupported type (use {'/'.join(SUFFIXES)})")
            files.append(p)
        elif any(c in p for c in "*?["):
            found = sorted(f for f in globlib.glob(p, recursive=True) if _suffix(f))
            if not found:
                raise CorpusError(f"corpus glob {p!r} matches no {'/'.join(SUFFIXES)} file")
            files.extend(found)
        else:
            raise CorpusError(f"corpus path not found: {p}")
    return files


def _builtin_documents() -> Iterator[tuple[str, str]]:
    import importlib
    import inspect

    for name in _STDLIB_DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # e.g. turtle without tkinter: skip, the list stays ordered
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
        text = "\n\n".join(p for p in parts if p)
        if text:
            yield f"{DEFAULT_CORPUS}:{name}", text


def _open_text_lines(path: str) -> Iterator[str]:
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as fh:
            reader = zstandard.ZstdDecompressor().stream_reader(fh)
            yield from io.TextIOWrapper(reader, encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as fh:
            yield from fh


def iter_documents(
    files: list[str], text_field: str, skip_bad_lines: bool, stats: CorpusStats
) -> Iterator[str]:
    """Yield document texts in corpus order; malformed lines raise or are counted."""

    def bad(where: str, why: str):
        if not skip_bad_lines:
            raise CorpusError(f"{where}: {why} (use --skip-bad-lines to skip such lines)")
        stats.bad_lines += 1
        if len(stats.bad_examples) < 5:
            stats.bad_examples.append(f"{where}: {why}")

    for path in files:
        if path == DEFAULT_CORPUS:
            for _, text in _builtin_documents():
                stats.documents += 1
                yield text
            continue
        try:
            if path.endswith(".txt"):
                text = Path(path).read_text(encoding="utf-8")
                stats.documents += 1
                yield text
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                if text_field not in pf.schema_arrow.names:
                    raise CorpusError(f"{path}: no column {text_field!r} (--text-field)")
                for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                    for text in batch.column(0).to_pylist():
                        if not isinstance(text, str):
                            bad(path, f"{text_field!r} is not a string")
                            continue
                        stats.documents += 1
                        yield text
            else:
                for lineno, line in enumerate(_open_text_lines(path), start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad(f"{path}:{lineno}", f"malformed JSON ({e.msg})")
                        continue
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        bad(f"{path}:{lineno}", f"no string field {text_field!r}")
                        continue
                    stats.documents += 1
                    yield text
        except CorpusError:
            raise
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from e
        except Exception as e:  # pyarrow / zstandard errors on corrupt files
            raise CorpusError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 over the input files' bytes in order and the reading options."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.text_field, cfg.skip_bad_lines, cfg.max_sequences]).encode())
    for path in resolve_inputs(cfg.paths):
        h.update(b"\0file\0")
        if path == DEFAULT_CORPUS:
            for name, text in _builtin_documents():
                h.update(name.encode())
                h.update(text.encode())
            continue
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pack_sequences(
    cfg: CorpusConfig,
    tokenizer,
    eos_id: int,
    stats: CorpusStats | None = None,
    batch_docs: int = 256,
) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield `(seq_id, input_ids[int32, L], next_token)` in stream order."""
    stats = stats if stats is not None else CorpusStats()
    L = cfg.seq_len
    files = resolve_inputs(cfg.paths)
    buf = np.empty(0, dtype=np.int32)
    seq_id = 0

    def batches():
        docs = []
        for text in iter_documents(files, cfg.text_field, cfg.skip_bad_lines, stats):
            docs.append(text)
            if len(docs) == batch_docs:
                yield docs
                docs = []
        if docs:
            yield docs

    for docs in batches():
        enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
        pieces = [buf]
        for ids in enc:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos_id], dtype=np.int32))
        buf = np.concatenate(pieces)
        n_full = (len(buf) - 1) // L  # each sequence needs L tokens plus its next token
        for i in range(n_full):
            yield seq_id, buf[i * L : (i + 1) * L].copy(), int(buf[(i + 1) * L])
            seq_id += 1
            if cfg.max_sequences is not None and seq_id >= cfg.max_sequences:
                return
        buf = buf[n_full * L :]
