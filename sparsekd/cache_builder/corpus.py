"""Corpus: input files -> packing domains -> documents, read and hashed per domain.

Inputs (`--corpus`, repeatable, order kept): a file, a directory (searched recursively,
symbolic links followed, sorted) or a glob (sorted), of `.jsonl`, `.jsonl.zst`, `.txt` or
`.parquet`. A `.txt` file is one document; a `.jsonl` line and a Parquet row are one
document each, the text taken from `text_field`.

Packing domains. The corpus is cut, from the file list and the file sizes alone (one
`stat` per file, no content read), into domains that are packed independently:
- a `.jsonl` or `.parquet` file of S bytes is ceil(S / domain_bytes) domains; domain k
  holds the lines (Parquet: row groups) that *begin* in bytes [k B, (k+1) B);
- a `.jsonl.zst` or `.txt` file is one domain (zstd frames cannot be entered mid-stream);
- the built-in corpus is one domain.
Domains are numbered in corpus order. A worker reads, decodes and hashes only the domains
it owns; each domain's content hash (`DomainReader.content_sha256`, over the bytes or
texts it read) is recorded with its shards. The corpus identity (`corpus_identity`) is the
file list (names relative to their `--corpus` argument, formats, sizes) plus the reading
options; the content hashes complete it in the manifest.

The built-in default corpus (`DEFAULT_CORPUS`) is the standard library's own documentation:
the docstrings of a fixed list of pure-Python stdlib modules, present on every machine
with Python, with no download.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sparsekd.config import check, setting
from sparsekd.errors import CorpusError

SUFFIXES = {".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl", ".txt": "txt", ".parquet": "parquet"}
SPLITTABLE = ("jsonl", "parquet")
DEFAULT_CORPUS = "builtin:stdlib-docs"

# Pure-Python modules with long, natural-English docstrings; fixed order for determinism.
_STDLIB_DOC_MODULES = (
    "argparse asyncio.events base64 bisect calendar collections configparser contextlib copy "
    "csv dataclasses datetime decimal difflib email.message enum fileinput fnmatch fractions "
    "ftplib functools getopt gettext glob gzip heapq hmac html.parser http.client http.server "
    "imaplib inspect ipaddress json locale logging mailbox netrc numbers optparse os pathlib "
    "pickle pprint queue random re sched selectors shelve shlex shutil smtplib socketserver "
    "statistics string subprocess tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback turtle typing unittest.case urllib.parse urllib.request uuid warnings wave "
    "weakref xml.dom.minidom zipfile"
).split()


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    paths: tuple[str, ...] = setting(
        (DEFAULT_CORPUS,),
        "File, directory or glob of .jsonl/.jsonl.zst/.txt/.parquet; repeatable. Default: "
        "the built-in corpus (Python's standard-library documentation).",
        flag="--corpus",
    )
    text_field: str = setting("text", "JSON/Parquet field holding the text.", flag=True)
    seq_len: int = setting(512, "Tokens per packed sequence.", flag=True)
    max_sequences: int | None = setting(
        None,
        "Keep only the first M sequences of the corpus (a trial run: every worker packs the "
        "domains before the cut to find it).",
        flag=True,
    )
    skip_bad_lines: bool = setting(
        False, "Count malformed lines (and undecodable text) instead of failing.", flag=True
    )
    domain_bytes: int = setting(
        32 << 20,
        "Bytes of a .jsonl/.parquet file per packing domain (the unit a worker reads).",
    )

    def __post_init__(self):
        check(bool(self.paths), "corpus.paths: at least one --corpus is required")
        check(self.seq_len >= 2, f"corpus.seq_len must be >= 2, got {self.seq_len}")
        check(
            self.max_sequences is None or self.max_sequences >= 1,
            f"corpus.max_sequences must be >= 1, got {self.max_sequences}",
        )
        check(self.domain_bytes >= 1 << 16, "corpus.domain_bytes must be >= 65536")


@dataclass(frozen=True)
class Source:
    """One input file: its recorded name (relative to its --corpus argument), where it is
    read from, how it is parsed, and its size."""

    name: str
    path: str
    format: str
    size: int


@dataclass(frozen=True)
class Domain:
    """A packing domain: the records of `source` that begin in bytes [start, end)."""

    index: int
    source: Source
    part: int
    start: int
    end: int

    @property
    def where(self) -> str:
        if self.start == 0 and self.end >= self.source.size:
            return self.source.path
        return f"{self.source.path} bytes {self.start}..{self.end}"


def _format_of(path: str) -> str | None:
    for suffix, fmt in SUFFIXES.items():
        if path.endswith(suffix):
            return fmt
    return None


def _walk(root: str) -> list[str]:
    """Files under `root`, following symbolic links to directories (each real directory once)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames]
    return sorted(found)


def resolve_sources(paths: tuple[str, ...]) -> list[Source]:
    """Expand files, directories and globs into the ordered list of input files."""
    out: list[Source] = []
    kinds = "/".join(SUFFIXES)
    for p in paths:
        if p == DEFAULT_CORPUS:
            out.append(Source(DEFAULT_CORPUS, DEFAULT_CORPUS, "builtin", 0))
            continue
        if os.path.isdir(p):
            files = [f for f in _walk(p) if _format_of(f)]
            base = p
            if not files:
                raise CorpusError(f"corpus directory {p} holds no {kinds} file")
        elif os.path.isfile(p):
            if not _format_of(p):
                raise CorpusError(f"corpus file {p}: unsupported type (use {kinds})")
            files, base = [p], os.path.dirname(p)
        elif any(c in p for c in "*?["):
            files = sorted(f for f in globlib.glob(p, recursive=True) if _format_of(f))
            base = os.path.dirname(p.split("*")[0].split("?")[0].split("[")[0])
            if not files:
                raise CorpusError(f"corpus glob {p!r} matches no {kinds} file")
        else:
            raise CorpusError(f"corpus path not found: {p}")
        for f in files:
            try:
                size = os.stat(f).st_size
            except OSError as e:
                raise CorpusError(f"corpus file {f}: cannot read ({e.strerror})") from e
            out.append(Source(os.path.relpath(f, base or "."), f, _format_of(f), size))
    return out


def plan_domains(sources: list[Source], domain_bytes: int) -> list[Domain]:
    """The packing domains of the corpus, from names and sizes only."""
    domains: list[Domain] = []
    for src in sources:
        parts = max(1, -(-src.size // domain_bytes)) if src.format in SPLITTABLE else 1
        for k in range(parts):
            end = src.size if k == parts - 1 else (k + 1) * domain_bytes
            domains.append(Domain(len(domains), src, k, k * domain_bytes, end))
    return domains


def corpus_identity(cfg: CorpusConfig, sources: list[Source]) -> dict:
    """What names the corpus before any of it is read (content hashes come per domain)."""
    return {
        "sources": [[s.name, s.format, s.size] for s in sources],
        "text_field": cfg.text_field,
        "skip_bad_lines": cfg.skip_bad_lines,
        "max_sequences": cfg.max_sequences,
        "domain_bytes": cfg.domain_bytes,
    }


@dataclass
class DomainStats:
    documents: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)


class DomainReader:
    """Documents of one domain, in order; hashes what it reads (`content_sha256`) and counts
    malformed lines (or raises CorpusError naming file and line)."""

    def __init__(self, domain: Domain, text_field: str, skip_bad_lines: bool):
        self.domain = domain
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.stats = DomainStats()
        self._hash = hashlib.sha256()

    @property
    def content_sha256(self) -> str:
        return self._hash.hexdigest()

    def _bad(self, where: str, why: str) -> None:
        if not self.skip_bad_lines:
            raise CorpusError(f"{where}: {why} (use --skip-bad-lines to skip such lines)")
        self.stats.bad_lines += 1
        if len(self.stats.bad_examples) < 5:
            self.stats.bad_examples.append(f"{where}: {why}")

    def _text(self, text, where) -> str | None:
        """A document's text, or None (counted) when it is not usable text. `where()` names
        the line, computed only for an error."""
        if not isinstance(text, str):
            self._bad(where(), f"no string field {self.text_field!r}")
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            self._bad(where(), f"text holds an unpaired surrogate ({text[e.start]!r})")
            return None
        self.stats.documents += 1
        return text

    def __iter__(self) -> Iterator[str]:
        src = self.domain.source
        read = {
            "builtin": self._builtin,
            "txt": self._txt,
            "jsonl": self._jsonl,
            "jsonl.zst": self._jsonl,
            "parquet": self._parquet,
        }[src.format]
        try:
            yield from read()
        except CorpusError:
            raise
        except OSError as e:
            raise CorpusError(f"{src.path}: cannot read ({e.strerror or e})") from e
        except Exception as e:  # pyarrow / zstandard errors on corrupt files
            raise CorpusError(f"{src.path}: cannot read ({type(e).__name__}: {e})") from e

    def _builtin(self) -> Iterator[str]:
        for name, text in builtin_documents():
            self._hash.update(f"{name}\0{len(text)}\0{text}".encode())
            if self._text(text, lambda name=name: name) is not None:
                yield text

    def _txt(self) -> Iterator[str]:
        path = self.domain.source.path
        data = Path(path).read_bytes()
        self._hash.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise CorpusError(
                f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from e
        if self._text(text, lambda: path) is not None:
            yield text

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset, line) of every line that begins in the domain; for .jsonl.zst the
        offset is in the decompressed stream."""
        d = self.domain
        if d.source.format == "jsonl.zst":
            yield from _zst_lines(d.source.path, self._hash)
            return
        with open(d.source.path, "rb") as fh:
            if d.start > 0:  # the first line that begins at or after `start`
                fh.seek(d.start - 1)
                fh.readline()
            pos = fh.tell()
            while pos < d.end:
                line = fh.readline()
                if not line:
                    break
                self._hash.update(line)
                yield pos, line
                pos += len(line)

    def _where(self, offset: int) -> str:
        """`file:line` of a byte offset (counts lines only when an error is reported)."""
        src = self.domain.source
        if src.format == "jsonl.zst":
            return f"{src.path}: decompressed byte {offset}"
        with open(src.path, "rb") as fh:
            n = fh.read(offset).count(b"\n")
        return f"{src.path}:{n + 1}"

    def _jsonl(self) -> Iterator[str]:
        for offset, raw in self._lines():
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(self._where(offset), f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(self._where(offset), f"malformed JSON ({e.msg})")
                continue
            value = obj.get(self.text_field) if isinstance(obj, dict) else None
            text = self._text(value, lambda o=offset: self._where(o))
            if text is not None:
                yield text

    def _parquet(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        d = self.domain
        pf = pq.ParquetFile(d.source.path)
        if self.text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{d.source.path}: no column {self.text_field!r} (--text-field)")
        md, row = pf.metadata, 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            col = rg.column(0)
            begin = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            if d.start <= begin < d.end:
                texts = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
                for i, text in enumerate(texts):
                    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b""
                    self._hash.update(len(data).to_bytes(8, "little") + data)
                    out = self._text(text, lambda r=row + i: f"{d.source.path}: row {r}")
                    if out is not None:
                        yield out
            row += rg.num_rows


def _zst_lines(path: str, content_hash) -> Iterator[tuple[int, bytes]]:
    """Lines of a (multi-frame) .jsonl.zst file; a file that ends inside a frame, or whose
    text does not end with a newline, is truncated: CorpusError naming it."""
    import zstandard

    pending = b""
    offset = 0
    dobj = zstandard.ZstdDecompressor().decompressobj()
    in_frame = False
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            content_hash.update(chunk)
            while chunk:
                out = dobj.decompress(chunk)
                in_frame = True
                pending += out
                if dobj.eof:  # a frame ended: the rest of the chunk starts the next one
                    chunk = dobj.unused_data
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                    in_frame = False
                else:
                    chunk = b""
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield offset, line + b"\n"
                offset += len(line) + 1
    if in_frame:
        raise CorpusError(f"{path}: truncated (the file ends inside a zstd frame)")
    if pending:
        raise CorpusError(f"{path}: truncated (its text ends mid-line, without a newline)")


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every document of the built-in corpus, in a fixed order."""
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
