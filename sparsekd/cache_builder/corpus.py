"""Corpus: input files -> packing domains -> documents, read and hashed per domain.

Inputs (`--corpus`, repeatable, order kept): a file, a folder (searched recursively,
symbolic links followed, sorted) or a glob (sorted), of `.jsonl`, `.jsonl.zst`, `.txt` or
`.parquet`, on a local disk or in an object store (`s3://bucket/data/`, a prefix, is a
folder; `s3://bucket/data/*.jsonl.zst` a glob). Every byte is read through the storage seam
(sparsekd.storage), by ranged reads of the domain being read. A `.txt` file is one
document; a `.jsonl` line and a Parquet row are one document each, the text taken from
`text_field`.

Packing domains. The corpus is cut, from the file list and the file sizes alone (one
listing or `stat` per input, no content read), into domains that are packed independently:
- a `.jsonl` or `.parquet` file of S bytes is ceil(S / domain_bytes) domains; domain k
  holds the lines (Parquet: row groups) that *begin* in bytes [k B, (k+1) B);
- a `.jsonl.zst` file is cut over its decompressed stream: domain k holds the lines that
  begin in decompressed bytes [k B, (k+1) B), the last one also every line after it.
  How many: ceil(D / B) for D the stream's size, read from the first zstd frame header
  (one ranged read of 18 bytes per file; zstd writes it when it compresses a whole file),
  or, when the header has no size (or a size smaller than the file: a first frame of
  several), D = S * ZST_RATIO_BOUND for S compressed bytes, the domains past the stream's
  end then being empty. A domain's reader decompresses the stream up to its range (a
  zstd frame cannot be entered in the middle), which costs little next to tokenising, and
  tokenises only its own lines; one worker's domains of a file share one decompression
  pass (`ZstStreams`);
- a `.txt` file is one domain; the built-in corpus is one domain.
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

import ast
import dataclasses
import fnmatch
import glob as globlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from sparsekd.cache_builder.chat import KINDS, LEARN, Conversation, parse_row
from sparsekd.cache_builder.generate import prompt_of
from sparsekd.config import check, setting
from sparsekd.errors import CorpusError, SparsekdError
from sparsekd.schemas import format as F
from sparsekd.storage import is_uri, join, open_store

SUFFIXES = {
    ".jsonl.zst": "jsonl.zst",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
    ".arrow": "arrow",  # a `datasets` save_to_disk folder's files (Arrow IPC streams)
}
SPLITTABLE = ("jsonl", "parquet")
LONG_POLICIES = ("split", "drop")
CHAT_PACKINGS = ("best_fit", "one_per_row")
DEFAULT_CORPUS = "builtin:stdlib-docs"
DEFAULT_CHAT_CORPUS = "builtin:stdlib-chat"  # conversations made from the same documentation
# A .jsonl.zst file of S bytes whose header gives no size is given domains for
# S * ZST_RATIO_BOUND decompressed bytes: text JSON lines compress 3-6x with zstd, so the
# domains past the stream's end are empty, and a file that compresses better still has
# every line read (by its last domain).
ZST_RATIO_BOUND = 8
ZST_HEADER_BYTES = 18  # the longest zstd frame header
ZST_SPLIT = 1  # in the corpus identity when a .jsonl.zst is read: how its domains are cut
READ_CHUNK = 1 << 20  # bytes per ranged read of a local file (object stores: 8 MiB)

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
        "File, folder or glob of .jsonl/.jsonl.zst/.txt/.parquet, local or a URI "
        "(s3://bucket/data/); repeatable. Default: the built-in corpus (Python's "
        "standard-library documentation).",
        flag="--corpus",
    )
    text_field: str = setting("text", "JSON/Parquet field holding the text.", flag=True)
    kind: str = setting(
        "auto",
        "text, chat (conversations and prompt/completion rows; docs/chat.md), or auto: each "
        "domain's kind from its first row.",
        choices=KINDS,
    )
    messages_field: str = setting(
        "messages", "Field of a conversation's messages (ShareGPT's 'conversations' too)."
    )
    chat_template: str | None = setting(
        None, "A Jinja chat template file (default: the teacher tokenizer's template)."
    )
    learn: str = setting(
        "assistant",
        "Which tokens of a conversation the student learns: assistant (each assistant "
        "message's output and its end-of-turn token) or all.",
        choices=LEARN,
    )
    long_conversations: str = setting(
        "split",
        "A conversation longer than a row: split (between turns; a turn longer than a row is "
        "dropped and counted) or drop (counted).",
        choices=LONG_POLICIES,
    )
    chat_packing: str = setting(
        "best_fit",
        "Rows of conversations: best_fit (several whole conversations per row, the rest "
        "padded) or one_per_row.",
        choices=CHAT_PACKINGS,
    )
    attention: str = setting(
        "document",
        "What a position's target is conditioned on: document (its own document only: the "
        "teacher reads each document of a row alone, and the student sees the same "
        "boundaries) or row (every earlier token of the row, as one sequence).",
        choices=F.ATTENTIONS,
    )
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
    (`path`, for messages), how it is parsed, its size, and the folder (`root`, a path or a
    URI) whose store reads it under `name`."""

    name: str
    path: str
    format: str
    size: int
    root: str = "."
    span: int | None = None  # .jsonl.zst: the decompressed bytes its domains cover
    mtime_ns: int | None = None  # as listed (None: the store keeps no time)

    def store(self):
        return open_store(self.root)


@dataclass(frozen=True)
class Domain:
    """A packing domain: the records of `source` that begin in bytes [start, end) (of the
    decompressed stream for a .jsonl.zst; its last domain has end = None: to the end)."""

    index: int
    source: Source
    part: int
    start: int
    end: int | None

    @property
    def where(self) -> str:
        if self.start == 0 and (self.end is None or self.end >= self.source.size):
            if self.source.format != "jsonl.zst" or self.end is None:
                return self.source.path
        span = "decompressed bytes" if self.source.format == "jsonl.zst" else "bytes"
        return f"{self.source.path} {span} {self.start}..{'' if self.end is None else self.end}"


def _format_of(path: str) -> str | None:
    for suffix, fmt in SUFFIXES.items():
        if path.endswith(suffix):
            return fmt
    return None


def _unreadable(e: OSError):
    raise CorpusError(f"corpus folder {e.filename} cannot be read ({e.strerror})") from e


def _walk(root: str) -> list[str]:
    """Files under `root`, following symbolic links to directories (each real directory once).
    A folder that cannot be read is an error: a corpus is read whole or not at all."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_unreadable):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames]
    return sorted(found)


def resolve_sources(paths: tuple[str, ...]) -> list[Source]:
    """Expand files, folders and globs (local or URIs) into the ordered list of inputs."""
    out: list[Source] = []
    for p in paths:
        if p in (DEFAULT_CORPUS, DEFAULT_CHAT_CORPUS):
            out.append(Source(p, p, "builtin", 0))
        elif is_uri(p):
            out += _remote_sources(p)
        else:
            out += _local_sources(p)
    return [_with_span(s) if s.format == "jsonl.zst" else s for s in _once(out)]


def _with_span(src: Source) -> Source:
    """A .jsonl.zst with the decompressed size its domains cover (module docstring)."""
    import zstandard

    head = src.store().open(src.name).read_at(min(ZST_HEADER_BYTES, src.size), 0)
    try:
        size = zstandard.frame_content_size(head)
    except zstandard.ZstdError:  # not a zstd file: refused by name when it is read
        size = -1
    span = size if size >= src.size else src.size * ZST_RATIO_BOUND
    return dataclasses.replace(src, span=span)


KINDS = "/".join(SUFFIXES)


def _local_sources(p: str) -> list[Source]:
    if os.path.isdir(p):
        files = [f for f in _walk(p) if _format_of(f)]
        base = p
        if not files:
            raise CorpusError(f"corpus directory {p} holds no {KINDS} file")
    elif os.path.isfile(p):
        if not _format_of(p):
            raise CorpusError(f"corpus file {p}: unsupported type (use {KINDS})")
        files, base = [p], os.path.dirname(p)
    elif any(c in p for c in "*?["):
        files = sorted(f for f in globlib.glob(p, recursive=True) if _format_of(f))
        base = os.path.dirname(p.split("*")[0].split("?")[0].split("[")[0])
        if not files:
            raise CorpusError(f"corpus glob {p!r} matches no {KINDS} file")
    elif os.path.exists(p):
        raise CorpusError(f"corpus path {p} is not a regular file (a device, FIFO or socket)")
    else:
        raise CorpusError(f"corpus path not found: {p}")
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise CorpusError(f"corpus file {f}: cannot read ({e.strerror})") from e
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the build forever
            raise CorpusError(f"corpus file {f} is not a regular file (a FIFO, device or socket)")
        name = os.path.relpath(f, base or ".")
        out.append(Source(name, f, _format_of(f), st.st_size, base or ".", mtime_ns=st.st_mtime_ns))
    return out


def _once(sources: list[Source]) -> list[Source]:
    """Refuse the same file read twice: given twice, a folder and a file inside it, or a
    link beside its target (local files, by their resolved path)."""
    seen: dict[str, str] = {}
    for s in sources:
        if s.format == "builtin" or is_uri(s.path):
            key = s.path
        else:
            key = os.path.realpath(s.path)
        if key in seen:
            raise CorpusError(
                f"corpus file {s.path} is {seen[key]} again (given twice, inside a folder also "
                "given, or a link to it): give each file once"
            )
        seen[key] = s.path
    return sources


def _remote_sources(p: str) -> list[Source]:
    """A URI: an object, a prefix (a folder), or a glob over the names under a prefix."""
    if any(c in p for c in "*?["):
        cut = min(p.index(c) for c in "*?[" if c in p)
        root = p[:cut].rsplit("/", 1)[0]
        pattern = p[len(root) + 1 :]
        listed = open_store(root).listing("")
        found = {n: st for n, st in listed.items() if fnmatch.fnmatch(n, pattern)}
        what = f"corpus glob {p!r} matches no {KINDS} object"
    else:
        store = open_store(p)
        if store.size("") is not None:  # a single object
            root, name = p.rsplit("/", 1)
            if not _format_of(name):
                raise CorpusError(f"corpus file {p}: unsupported type (use {KINDS})")
            size, mtime = open_store(root).listing(name)[name]
            return [Source(name, p, _format_of(name), size, root, mtime_ns=mtime)]
        root, found = p.rstrip("/"), store.listing("")
        what = f"corpus folder {p} holds no {KINDS} object"
    files = [(n, st) for n, st in found.items() if _format_of(n)]
    if not files:
        if not open_store(root).exists():
            raise CorpusError(f"corpus {p}: the bucket does not exist")
        raise CorpusError(what)
    return [
        Source(n, join(root, n), _format_of(n), size, root, mtime_ns=mtime)
        for n, (size, mtime) in files
    ]


def plan_domains(sources: list[Source], domain_bytes: int) -> list[Domain]:
    """The packing domains of the corpus, from names and sizes only."""
    domains: list[Domain] = []
    for src in sources:
        if src.format in SPLITTABLE:
            parts, last_end = max(1, -(-src.size // domain_bytes)), src.size
        elif src.format == "jsonl.zst":
            parts, last_end = max(1, -(-src.span // domain_bytes)), None
        else:
            parts, last_end = 1, src.size
        for k in range(parts):
            end = last_end if k == parts - 1 else (k + 1) * domain_bytes
            domains.append(Domain(len(domains), src, k, k * domain_bytes, end))
    return domains


def corpus_identity(cfg: CorpusConfig, sources: list[Source], template_sha256=None) -> dict:
    """What names the corpus before any of it is read (content hashes come per domain):
    the files, the reading options, and how conversations are rendered, masked and packed
    (`template_sha256`: the chat template's)."""
    identity = {
        "sources": [[s.name, s.format, s.size] + ([s.span] if s.span else []) for s in sources],
        "text_field": cfg.text_field,
        "skip_bad_lines": cfg.skip_bad_lines,
        "max_sequences": cfg.max_sequences,
        "domain_bytes": cfg.domain_bytes,
        "kind": cfg.kind,
        "chat": None,
    }
    if cfg.kind != "text":
        identity["chat"] = {
            "messages_field": cfg.messages_field,
            "template_sha256": template_sha256,
            "learn": cfg.learn,
            "long_conversations": cfg.long_conversations,
            "packing": cfg.chat_packing,
        }
    if any(s.format == "jsonl.zst" for s in sources):
        identity["zst_split"] = ZST_SPLIT
    return identity


PROBE_BLOCK = 4096


def source_probe(src: Source) -> str | None:
    """A cheap fingerprint of a corpus file's content, taken by every worker that reads a
    part of it: its size and three blocks (start, middle, end). Workers that saw another
    probe of one file read two versions of it (the finaliser refuses that cache)."""
    if src.format == "builtin":
        return None
    f = src.store().open(src.name)
    h = hashlib.sha256(str(src.size).encode())
    for at in sorted({0, max(0, src.size // 2 - PROBE_BLOCK // 2), max(0, src.size - PROBE_BLOCK)}):
        h.update(f.read_at(min(PROBE_BLOCK, src.size - at), at))
    return h.hexdigest()


@dataclass
class DomainStats:
    documents: int = 0  # text documents or conversations read
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)


@dataclass
class ChatItem:
    """A conversation row and where it is (`where()`, computed only for a message)."""

    conv: Conversation
    where: object


class DomainReader:
    """Documents of one domain, in order; hashes what it reads (`content_sha256`) and counts
    malformed lines (or raises CorpusError naming file and line)."""

    def __init__(
        self,
        domain: Domain,
        text_field: str,
        skip_bad_lines: bool,
        zst: ZstStreams | None = None,
        *,
        kind: str = "auto",
        messages_field: str = "messages",
        prompts: bool = False,
    ):
        self.domain = domain
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.kind, self.messages_field = kind, messages_field
        self.prompts = prompts  # --generate: each row is a prompt (generate.prompt_of)
        self.stats = DomainStats()
        self.seen: str | None = None  # the domain's kind, from its first row: text or chat
        self.chat = None  # packing.ChatStats, when the domain holds conversations
        self.generate = None  # generate.GenerateStats, under --generate
        self._hash = hashlib.sha256()
        self._zst = zst or ZstStreams()

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
        if self.kind == "chat":
            self._bad(where(), "a text document where conversations were asked for")
            return None
        if not isinstance(text, str):
            self._bad(where(), self._no_text(None, text))
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            self._bad(where(), f"text holds an unpaired surrogate ({text[e.start]!r})")
            return None
        self.stats.documents += 1
        return text

    def _row(self, obj, where):
        """A row as a text or a ChatItem; None when it is skipped (counted) or empty."""
        conv = None
        if self.kind != "text":
            try:
                if self.prompts:
                    conv = prompt_of(obj, self.messages_field)
                else:
                    conv = parse_row(obj, self.messages_field)
            except ValueError as e:
                self._bad(where(), f"not a {'prompt' if self.prompts else 'conversation'}: {e}")
                return None
        got = "text" if conv is None else "chat"
        if got == "text" and self.prompts:
            self._bad(where(), f"no prompt ({self.messages_field!r}, 'conversations' or 'prompt')")
            return None
        if got == "text" and self.kind == "chat":
            self._bad(where(), f"no conversation ({self.messages_field!r}, 'conversations', or "
                               "'prompt' and 'completion')")  # fmt: skip
            return None
        if self.seen is not None and got != self.seen:
            self._bad(where(), f"a {got} row among rows of {self.seen} (one kind per file)")
            return None
        if conv is None:
            value = obj.get(self.text_field) if isinstance(obj, dict) else None
            if value is None and isinstance(obj, dict):
                self._bad(where(), self._no_text(list(obj), value))
                return None
            text = self._text(value, where)
            self.seen = self.seen or ("text" if text is not None else None)
            return text
        self.seen = "chat"
        self.stats.documents += 1
        return ChatItem(conv, where)

    def __iter__(self) -> Iterator[str | ChatItem]:
        src = self.domain.source
        read = {
            "builtin": self._builtin,
            "txt": self._txt,
            "jsonl": self._jsonl,
            "jsonl.zst": self._jsonl,
            "parquet": self._parquet,
            "arrow": self._arrow,
        }[src.format]
        try:
            yield from read()
        except SparsekdError:  # named already (a corpus or a storage error)
            raise
        except OSError as e:
            raise CorpusError(f"{src.path}: cannot read ({e.strerror or e})") from e
        except Exception as e:  # pyarrow / zstandard errors on corrupt files
            raise CorpusError(f"{src.path}: cannot read ({type(e).__name__}: {e})") from e

    def _builtin(self) -> Iterator[str | ChatItem]:
        if self.domain.source.name == DEFAULT_CHAT_CORPUS:
            for name, row in builtin_conversations():
                self._hash.update(json.dumps(row, sort_keys=True).encode())
                item = self._row(row, lambda name=name: name)
                if item is not None:
                    yield item
            return
        for name, text in builtin_documents():
            self._hash.update(f"{name}\0{len(text)}\0{text}".encode())
            if self._text(text, lambda name=name: name) is not None:
                yield text

    def _txt(self) -> Iterator[str]:
        src = self.domain.source
        data = src.store().read(src.name)
        self._hash.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise CorpusError(
                f"{src.path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from e
        if self._text(text, lambda: src.path) is not None:
            yield text

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset, line) of every line that begins in the domain; for .jsonl.zst the
        offset is in the decompressed stream."""
        d = self.domain
        if d.source.format == "jsonl.zst":
            lines = self._zst.lines(d.source, d.start, d.end)
        else:
            lines = _ranged_lines(d.source, d.start, d.end)
        for offset, line in lines:
            self._hash.update(line)
            yield offset, line

    def _where(self, offset: int) -> str:
        """`file:line` of a byte offset (counts lines only when an error is reported)."""
        src = self.domain.source
        if src.format == "jsonl.zst":
            return f"{src.path}: decompressed byte {offset}"
        f = src.store().open(src.name)
        n = sum(f.read_at(min(READ_CHUNK, offset - o), o).count(b"\n")
                for o in range(0, offset, READ_CHUNK))  # fmt: skip
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
            item = self._row(obj, lambda o=offset: self._where(o))
            if item is not None:
                yield item

    def _no_text(self, fields: list[str] | None, value) -> str:
        """Why a row or table has no text: the fields it has, and the setting that names
        each kind of field."""
        if (
            isinstance(value, list)
            and value
            and all(isinstance(m, dict) and "role" in m for m in value)
        ):
            return (
                f"field {self.text_field!r} holds conversations, not text: name it with "
                f"--set corpus.messages_field={self.text_field} (and no --text-field)"
            )
        if fields is None:  # the field is there, its value is not text
            return f"field {self.text_field!r} is not a string ({type(value).__name__})"
        found = ", ".join(map(repr, fields[:8])) or "none"
        return (
            f"no string field {self.text_field!r} (fields found: {found}); --text-field NAME "
            "names a text field, --set corpus.messages_field=NAME a field of conversations "
            "(lists of role/content messages)"
        )

    def _columns(self, names: list[str]) -> list[str]:
        """The columns of a table to read: the text field, or the chat fields present."""
        chat = [n for n in (self.messages_field, "conversations", "prompt", "completion")
                if n in names]  # fmt: skip
        if self.kind == "chat" or (self.kind == "auto" and chat):
            if not chat:
                wanted = f"{self.messages_field!r}, 'conversations', 'prompt'"
                raise CorpusError(f"{self.domain.source.path}: no conversation column ({wanted})")
            return chat
        if self.text_field not in names:
            why = self._no_text(names, None).replace("string field", "column", 1)
            raise CorpusError(f"{self.domain.source.path}: {why.replace('fields', 'columns')}")
        return [self.text_field]

    def _table_rows(self, table, first_row: int) -> Iterator[str | ChatItem]:
        src = self.domain.source
        if table.column_names == [self.text_field]:  # text: hashed as before the chat rows
            for i, text in enumerate(table.column(0).to_pylist()):
                data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b""
                self._hash.update(len(data).to_bytes(8, "little") + data)
                out = self._text(text, lambda r=first_row + i: f"{src.path}: row {r}")
                if out is not None:
                    yield out
            return
        for i, obj in enumerate(table.to_pylist()):
            data = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")
            self._hash.update(len(data).to_bytes(8, "little") + data)
            item = self._row(obj, lambda r=first_row + i: f"{src.path}: row {r}")
            if item is not None:
                yield item

    def _arrow(self) -> Iterator[str | ChatItem]:
        """A `datasets` Arrow file (an IPC stream): one domain."""
        import pyarrow as pa

        src = self.domain.source
        reader = pa.ipc.open_stream(src.store().open(src.name))
        columns, row = self._columns(reader.schema.names), 0
        for batch in reader:
            table = pa.Table.from_batches([batch]).select(columns)
            yield from self._table_rows(table, row)
            row += batch.num_rows

    def _parquet(self) -> Iterator[str | ChatItem]:
        import pyarrow.parquet as pq

        d = self.domain
        pf = pq.ParquetFile(d.source.store().open(d.source.name))
        columns = self._columns(pf.schema_arrow.names)
        md, row = pf.metadata, 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            col = rg.column(0)
            begin = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            if d.start <= begin < d.end:
                yield from self._table_rows(pf.read_row_group(g, columns=columns), row)
            row += rg.num_rows


def _chunk_size(src: Source) -> int:
    return READ_CHUNK if src.store().local else 8 * READ_CHUNK


def _ranged_lines(src: Source, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines of a file that begin in bytes [start, end), by ranged
    reads: from byte start - 1 (the line holding it is someone else's) to the end of the
    last line that begins before `end`."""
    f = src.store().open(src.name)
    chunk = _chunk_size(src)
    pos = max(start - 1, 0)
    buf, at = b"", 0  # unread bytes, and where in `buf` the next line begins
    skip = start > 0
    while True:
        nl = buf.find(b"\n", at)
        if nl < 0:
            data = f.read_at(chunk, pos + len(buf)) if pos + len(buf) < src.size else b""
            if not data:
                if at < len(buf) and not skip and pos + at < end:
                    yield pos + at, buf[at:]
                return
            buf, pos, at = buf[at:] + data, pos + at, 0
            continue
        line, line_at = buf[at : nl + 1], pos + at
        at = nl + 1
        if skip:  # the rest of the line that holds byte start - 1
            skip = False
            continue
        if line_at >= end:
            return
        yield line_at, line


class ZstStreams:
    """One decompression pass per .jsonl.zst file for the domains a worker reads in order:
    a domain's lines are read from where the previous domain of that file stopped (or
    from the start, for an earlier range)."""

    def __init__(self):
        self._cursors: dict[str, _ZstCursor] = {}
        self.passes = 0  # decompression passes started (one per file when read in order)

    def lines(self, src: Source, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
        cur = self._cursors.get(src.path)
        if cur is None or cur.last >= start:  # it went past `start`: read again from 0
            cur = self._cursors[src.path] = _ZstCursor(src)
            self.passes += 1
        return cur.lines(start, end)


class _ZstCursor:
    """Lines of a (multi-frame) .jsonl.zst stream with their decompressed offsets. A file
    that ends inside a frame, or whose text does not end with a newline, is truncated:
    CorpusError naming it."""

    def __init__(self, src: Source):
        import zstandard

        self.src, self._zstd = src, zstandard
        self.f = src.store().open(src.name)
        self.pos = 0  # compressed bytes read
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False
        self.pending = b""  # decompressed bytes not yet cut into lines
        self.lines_ready: list[bytes] = []
        self.offset = 0  # decompressed offset of the next line
        self.last = -1  # decompressed offset of the last line taken
        self.done = False

    def _fill(self) -> bool:
        """Decompress the next chunk; False at the end of the stream."""
        while not self.lines_ready:
            if self.done:
                return False
            chunk = (
                self.f.read_at(_chunk_size(self.src), self.pos) if self.pos < self.src.size else b""
            )
            self.pos += len(chunk)
            if not chunk:
                self.done = True
                if self.in_frame:
                    raise CorpusError(
                        f"{self.src.path}: truncated (the file ends inside a zstd frame)"
                    )
                if self.pending:
                    raise CorpusError(
                        f"{self.src.path}: truncated (its text ends mid-line, without a newline)"
                    )
                return False
            while chunk:
                self.pending += self.dobj.decompress(chunk)
                self.in_frame = True
                if self.dobj.eof:  # a frame ended: the rest of the chunk starts the next one
                    chunk = self.dobj.unused_data
                    self.dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self.in_frame = False
                else:
                    chunk = b""
            *lines, self.pending = self.pending.split(b"\n")
            self.lines_ready = [ln + b"\n" for ln in reversed(lines)]
        return True

    def lines(self, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
        """The lines that begin in [start, end) (end None: to the end of the stream)."""
        while self._fill():
            line = self.lines_ready[-1]
            if end is not None and self.offset >= end:
                return  # kept for the next domain
            self.lines_ready.pop()
            at, self.offset = self.offset, self.offset + len(line)
            self.last = at
            if at >= start:
                yield at, line


def _stdlib_docs() -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(module name, module docstring, [(attribute, docstring)]) in a fixed order."""
    import importlib
    import inspect

    for name in _STDLIB_DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # e.g. turtle without tkinter: skip, the list stays ordered
            continue
        attrs = []
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                attrs.append((attr, doc))
        yield name, inspect.getdoc(mod) or "", attrs


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every document of the built-in corpus, in a fixed order."""
    for name, doc, attrs in _stdlib_docs():
        text = "\n\n".join(p for p in [doc, *(d for _, d in attrs)] if p)
        if text:
            yield f"{DEFAULT_CORPUS}:{name}", text


SYSTEM_PROMPT = "You are a concise assistant who explains Python's standard library."


def _documented(tree, prefix: str = ""):
    """(dotted name, docstring) of every documented class and function of a parsed module,
    nested ones included, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 16:
                yield name, doc
            yield from _documented(node, name + ".")


def builtin_conversations() -> Iterator[tuple[str, dict]]:
    """(name, row) of the built-in chat corpus (`builtin:stdlib-chat`), in a fixed order:
    for each documented class and function in the source of the built-in corpus's modules
    (read from the source files, so what other libraries patch at run time does not
    change it), a user asks about it and the assistant answers with its docstring; every
    third conversation opens with a system prompt, every third goes on for a second turn
    about the module itself."""
    import importlib.util

    i = 0
    for name in _STDLIB_DOC_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        doc = ast.get_docstring(tree) or ""
        first_para = doc.split("\n\n")[0] if doc else f"The `{name}` module."
        for attr, adoc in _documented(tree):
            messages = [
                {"role": "user", "content": f"What is `{name}.{attr}` for?"},
                {"role": "assistant", "content": adoc},
            ]
            if i % 3 == 1:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            elif i % 3 == 2:
                messages += [
                    {"role": "user", "content": f"And the `{name}` module as a whole?"},
                    {"role": "assistant", "content": first_para},
                ]
            yield f"{DEFAULT_CHAT_CORPUS}:{name}.{attr}", {"messages": messages}
            i += 1
