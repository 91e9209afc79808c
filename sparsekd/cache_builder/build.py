"""`build-cache`: own units -> pack -> teacher view -> encode -> write -> record -> finalize.

    plan = plan_build(cfg)                 plan.py: teacher, tokenizer, domains, identity
    ledger.claim()                         ledger.py: claim --out, refuse a foreign one
    for item in own_work(plan, ledger):    this file: the domains this worker owns, packed
        view = teacher.view(unit)          encoder.py through an engine (engines.py)
        writer.put(write unit)             writer.py: encode + zstd + publish + record, in
                                           a background thread beside the teacher
    try_finalize(...)                      ledger.py: index + manifest.json when all is done

`--out` is a local folder or an object-store URI: every byte goes through the storage
seam (sparsekd.storage), and the commit protocol (ledger.py) is the same on both.

Resume: re-running the same command skips finished units (after checking them) and redoes
the rest; a killed job completes byte-identical to an uninterrupted one, because a unit's
bytes depend only on its sequences, the teacher, the settings and the seed. Any split into
workers gives the same bytes.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.corpus import ChatItem, Domain, DomainReader, ZstStreams
from sparsekd.cache_builder.encoder import TeacherView, teacher_view
from sparsekd.cache_builder.engines import VllmEngine, make_engine
from sparsekd.cache_builder.generate import GenerateStats, Generator
from sparsekd.cache_builder.ledger import Ledger, domain_record, try_finalize
from sparsekd.cache_builder.packing import ChatStats, Unit, pack, pack_chat
from sparsekd.cache_builder.packing import units as units_of
from sparsekd.cache_builder.plan import BuildPlan, plan_build
from sparsekd.cache_builder.writer import ShardWriter, encode_table, write_shard
from sparsekd.errors import CorpusError
from sparsekd.schemas.manifest import MANIFEST
from sparsekd.schemas.modes import get_mode
from sparsekd.storage import open_store


@dataclass
class BuildStats:
    started: float = field(default_factory=time.perf_counter)
    first_teacher_call_s: float | None = None  # from start to the first teacher call
    teacher_s: float = 0.0
    domains_read: int = 0
    documents_read: int = 0
    sequences_packed: int = 0
    units_skipped: int = 0
    units_redone: int = 0
    shards_written: int = 0
    tokens_written: int = 0
    bad_lines: int = 0


class Teacher:
    """The engine, started on the first unit that needs it (a worker with nothing to do
    never starts one), and the check that this worker's teacher weights are the others'."""

    def __init__(self, plan: BuildPlan, ledger: Ledger, stats: BuildStats, engine=None):
        self.plan, self.ledger, self.stats = plan, ledger, stats
        self.engine, self.own = engine, engine is None
        self.gen_engine = None  # --generate when the view's engine cannot generate
        if engine is not None and engine.name != plan.cfg.teacher.engine:
            raise ValueError(
                f"engine {engine.name!r} given for a {plan.cfg.teacher.engine!r} build"
            )
        self.generator = Generator(plan, self._generating) if plan.cfg.generate.enabled else None

    def _first_call(self) -> None:
        if self.stats.first_teacher_call_s is None:
            self.ledger.check_teacher(self.plan.weights_sha256())  # joins the background hash
            self.stats.first_teacher_call_s = time.perf_counter() - self.stats.started

    def _started(self):
        cfg = self.plan.cfg
        if self.engine is None:
            self.engine = make_engine(
                cfg.teacher,
                k=cfg.encoder.top_k,
                seq_len=cfg.corpus.seq_len,
                seed=cfg.seed,
                path=cfg.encoder.resolved_path,
                generating=cfg.generate.enabled,
            )
        self._first_call()
        return self.engine

    def _generating(self):
        """The engine that writes the answers: the view's own when it is vLLM's log-prob
        engine (one engine, one pass), else one of its own."""
        cfg = self.plan.cfg
        if self.engine is not None and isinstance(self.engine, VllmEngine):
            return self._started()
        if cfg.encoder.resolved_path == "logprob" and self.engine is None:
            return self._started()
        if self.gen_engine is None:
            self._first_call()
            self.gen_engine = VllmEngine(
                cfg.teacher,
                k=max(1, cfg.encoder.top_k),
                seq_len=cfg.corpus.seq_len,
                seed=cfg.seed,
                generating=True,
            )
        return self.gen_engine

    def view(self, unit: Unit):
        if unit.targets is not None:  # captured during generation
            return _generated_view(self.plan.cfg.encoder.mode, unit.targets)
        self._started()
        cfg = self.plan.cfg
        t0 = time.perf_counter()
        v = teacher_view(
            self.engine,
            cfg.encoder,
            cfg.seed,
            unit.seq_ids,
            unit.input_ids,
            unit.next_tokens,
            unit.loss_masks,
            unit.doc_starts,
        )
        self.stats.teacher_s += time.perf_counter() - t0
        return v

    def close(self) -> None:
        if self.engine is not None and self.own:
            self.engine.close()
        if self.gen_engine is not None:
            self.gen_engine.close()


def row_texts(plan: BuildPlan, unit: Unit) -> list[str]:
    """A generated cache's rows as text: each row's L + 1 tokens decoded, special tokens
    kept, the padding after its last answer left out (every piece of such a row ends with
    its answer, so the row's text ends with its last learnt token: position p learnt means
    token p + 1 is)."""
    out = []
    for ids, nxt, mask in zip(unit.input_ids, unit.next_tokens, unit.loss_masks):
        tokens = np.append(ids, np.int32(nxt))
        learnt = np.flatnonzero(mask)
        end = int(learnt[-1]) + 2 if len(learnt) else 0
        out.append(plan.tokenizer.decode(tokens[:end].tolist(), skip_special_tokens=False))
    return out


def _generated_view(mode: str, targets: list[tuple]) -> TeacherView:
    """The unit's view from the targets its answers were generated with."""
    spec = get_mode(mode)
    supports = [spec.from_logprobs(ids, lp, tok) for ids, lp, tok in targets]
    return TeacherView([tok for _, _, tok in targets], supports)


@dataclass
class DomainEnd:
    """A domain whose units have all been handed out: its record is written once they are
    (`units` fills in as the writer finishes them)."""

    domain: Domain
    sequences: int
    learnt: int  # learnt positions in its rows
    reader: DomainReader
    old: dict | None  # the domain's earlier record, when it is being redone
    units: dict[int, dict]  # part -> unit record


def own_work(plan: BuildPlan, ledger: Ledger, stats: BuildStats, teacher: Teacher | None = None):
    """What this worker must compute, in corpus order: `(unit, units)` for each unit to
    write (`units`: its domain's unit records so far) and a `DomainEnd` after each owned
    domain's units. A domain owned by another worker is read only under --max-sequences
    (to find where the cut falls); a finished one is never read again."""
    cap = plan.cfg.corpus.max_sequences
    before = 0  # sequences of the corpus before this domain (tracked under a cap only)
    zst = ZstStreams()  # one decompression pass per .jsonl.zst for this worker's domains
    for d in plan.domains:
        owned = plan.worker.owns(d.index)
        if not owned and cap is None:
            continue
        limit = None if cap is None else max(0, cap - before)
        rec = ledger.domain_record(d.index)
        if rec is not None and (not owned or _domain_intact(ledger, rec)):
            before += rec["sequences"]
            continue
        if not owned:
            before += sum(1 for _ in _sequences(plan, d, limit, stats, zst)[1])
            continue
        reader, seqs = _sequences(plan, d, limit, stats, zst, teacher)
        done, units, n, learnt = ledger.unit_records(d.index), {}, 0, 0
        for unit in units_of(d.index, seqs, plan.shard_sequences):
            n += len(unit.seq_ids)
            learnt += sum(int(m.sum()) for m in unit.loss_masks)
            if _unit_done(ledger, done.get(unit.part), unit, stats):
                units[unit.part] = done[unit.part]
                continue
            yield unit, units
        yield DomainEnd(d, n, learnt, reader, rec, units)
        before += n


def _sequences(plan: BuildPlan, d: Domain, limit, stats: BuildStats, zst, teacher=None):
    corpus = plan.cfg.corpus
    reader = DomainReader(
        d,
        corpus.text_field,
        corpus.skip_bad_lines,
        zst,
        kind=corpus.kind,
        messages_field=corpus.messages_field,
        prompts=plan.cfg.generate.enabled,
    )
    stats.domains_read += limit != 0
    if plan.cfg.generate.enabled:
        return reader, _generated(plan, reader, teacher)
    return reader, _pack(plan, reader, limit)


def _generated(plan: BuildPlan, reader: DomainReader, teacher: Teacher):
    """--generate: the domain's prompts, answered by the teacher, packed whole."""
    corpus = plan.cfg.corpus
    reader.chat, reader.generate = ChatStats(), GenerateStats()
    answers = teacher.generator.answers(reader.domain.index, iter(reader), reader.generate)
    yield from pack_chat(
        answers,
        lambda rendered: rendered,
        corpus.seq_len,
        plan.pad_id,
        long=corpus.long_conversations,
        packing=corpus.chat_packing,
        stats=reader.chat,
        cut_rows=reader.generate.cut_rows,
        attention=corpus.attention,
    )


def _pack(plan: BuildPlan, reader: DomainReader, limit: int | None):
    """The domain's rows: text packed as one stream, conversations whole (packing.py); a
    domain's kind is its first row's."""
    corpus, tok = plan.cfg.corpus, plan.tokenizer
    items = iter(reader)
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if not isinstance(first, ChatItem):
        yield from pack(
            items, tok, tok.eos_token_id, corpus.seq_len, limit, attention=corpus.attention
        )
        return
    reader.chat = ChatStats()
    yield from pack_chat(
        items,
        lambda item: plan.renderer.render(item.conv, item.where),
        corpus.seq_len,
        plan.pad_id,
        long=corpus.long_conversations,
        packing=corpus.chat_packing,
        limit=limit,
        stats=reader.chat,
        attention=corpus.attention,
    )


def _domain_intact(ledger: Ledger, rec: dict) -> bool:
    """Every shard of a finished domain is there (on a local disk: with its sha256)."""
    return all(ledger.shard_ok(e, deep=ledger.store.local) for e in rec["shards"])


def _unit_done(ledger: Ledger, rec: dict | None, unit: Unit, stats: BuildStats) -> bool:
    if rec is None:
        return False
    if rec["tokens_sha256"] != unit.tokens_sha256():
        raise CorpusError(
            f"the corpus changed since {rec['file']} was written: domain {unit.domain} now "
            "packs to other tokens; restore the corpus or use another --out"
        )
    if ledger.shard_ok(rec, deep=ledger.store.local):
        stats.units_skipped += 1
        return True
    stats.units_redone += 1  # damaged or missing: written again, byte-identical
    return False


def _write_unit(plan: BuildPlan, ledger: Ledger, stats, bar, unit: Unit, units: dict, view):
    """Encode, compress, publish and record one unit (runs in the writer thread)."""
    enc = plan.cfg.encoder
    table = encode_table(
        enc.mode,
        unit.seq_ids,
        unit.input_ids,
        unit.next_tokens,
        unit.loss_masks,
        view.token_logprobs,
        view.supports,
        doc_starts=unit.doc_starts,
        weighted=enc.weighted,
        texts=unit.texts,
    )
    meta = {**plan.meta, "teacher_weights_sha256": plan.weights_sha256()}
    entry = write_shard(ledger.store, unit.domain, unit.part, table, meta)
    rec = {"kind": "shard", **entry, "tokens_sha256": unit.tokens_sha256()}
    ledger.write_unit(rec)
    units[unit.part] = rec
    stats.shards_written += 1
    stats.tokens_written += table.num_rows * plan.seq_len
    if bar is not None:
        bar.update(table.num_rows * plan.seq_len)


def _write_domain(plan: BuildPlan, ledger: Ledger, end: DomainEnd) -> None:
    """The domain's record, after its units' (runs in the writer thread, after them)."""
    units = [end.units[j] for j in range(-(-end.sequences // plan.shard_sequences))]
    rec = domain_record(end.domain, end.sequences, end.learnt, end.reader, units)
    if end.old is not None and end.old["content_sha256"] != rec["content_sha256"]:
        raise CorpusError(
            f"{end.domain.where} changed since its shards were written (its content hash "
            "differs); restore it or use another --out"
        )
    ledger.write_domain(rec)


def run(cfg: BuildConfig, engine=None) -> dict:
    """Build (or resume) this worker's part of the cache; return a summary dict.

    `engine`: an already started engine of `cfg.teacher.engine` to reuse (its K must be
    >= the build's); it is left open.
    """
    stats = BuildStats()
    plan = plan_build(cfg)
    store = open_store(cfg.writer.out)
    ledger = Ledger(store, plan)
    try:
        ledger.claim()
        ledger.check_corpus()
        writer_s = _build(plan, ledger, stats, engine)
        if stats.shards_written == 0 and store.size(MANIFEST) is not None:
            manifest = store.read_json(MANIFEST, "manifest")  # complete, and intact
        else:
            manifest = try_finalize(store, plan)
    except BaseException:
        ledger.release()
        raise
    finally:
        store.close()
    return _summary(plan, stats, manifest, writer_s)


def _build(plan: BuildPlan, ledger: Ledger, stats: BuildStats, engine) -> float:
    """Compute and write this worker's units; return the writer thread's busy seconds."""
    teacher = Teacher(plan, ledger, stats, engine)
    writer = ShardWriter(plan.cfg.writer.queue_depth)
    bar = _progress(plan.cfg)
    try:
        with writer:
            for item in own_work(plan, ledger, stats, teacher):
                if isinstance(item, DomainEnd):
                    stats.bad_lines += item.reader.stats.bad_lines
                    writer.put(partial(_write_domain, plan, ledger, item))
                else:
                    unit, units = item
                    if plan.cfg.generate.enabled:  # in this thread: one user of the tokenizer
                        unit.texts = row_texts(plan, unit)
                    view = teacher.view(unit)
                    writer.put(partial(_write_unit, plan, ledger, stats, bar, unit, units, view))
    finally:
        if teacher.generator is not None:
            stats.teacher_s += teacher.generator.seconds
        teacher.close()
        if bar is not None:
            bar.close()
    return writer.busy_s


def _summary(plan: BuildPlan, stats: BuildStats, manifest: dict | None, writer_s: float) -> dict:
    wall = time.perf_counter() - stats.started
    s = {
        "out": plan.cfg.writer.out,
        "worker": f"{plan.worker.index}/{plan.worker.count}",
        "worker_from": plan.worker.source,
        "shards_written": stats.shards_written,
        "tokens_written": stats.tokens_written,
        "units_skipped": stats.units_skipped,
        "units_redone": stats.units_redone,
        "domains_read": stats.domains_read,
        "seconds": round(wall, 2),
        "teacher_s": round(stats.teacher_s, 2),
        "writer_s": round(writer_s, 2),
        "first_teacher_call_s": stats.first_teacher_call_s,
        "teacher_tokens_per_s": (
            round(stats.tokens_written / stats.teacher_s, 1) if stats.teacher_s else None
        ),
        "complete": manifest is not None,
        "bad_lines": stats.bad_lines,
    }
    if manifest is not None:
        s.update(
            sequences=manifest["num_sequences"],
            tokens=manifest["num_tokens"],
            shards=manifest["num_shards"],
            bytes_per_token=round(manifest["bytes"] / max(manifest["num_tokens"], 1), 2),
            bad_lines=manifest.get("bad_lines", 0),
        )
    return s


def _progress(cfg: BuildConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    total = cfg.corpus.max_sequences * cfg.corpus.seq_len if cfg.corpus.max_sequences else None
    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="build-cache",
        mininterval=1.0,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def format_summary(s: dict) -> str:
    rate = f"{s['teacher_tokens_per_s']} tok/s teacher" if s["teacher_tokens_per_s"] else "no work"
    line = (
        f"build-cache worker {s['worker']}: wrote {s['shards_written']} shards "
        f"({s['tokens_written']} tokens) in {s['seconds']} s, {rate}"
    )
    if s["units_redone"]:
        line += f"; rewrote {s['units_redone']} damaged or missing shards"
    if s["complete"]:
        line += (
            f"; cache complete: {s['sequences']} sequences, {s['tokens']} tokens, "
            f"{s['shards']} shards, {s['bytes_per_token']} bytes/token"
        )
    else:
        line += "; cache not complete yet (other workers' units missing)"
    if s["bad_lines"]:
        line += f"; skipped {s['bad_lines']} bad lines"
    return f"{line} -> {s['out']}"
