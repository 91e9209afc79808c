"""`build-cache`: own units -> pack -> teacher view -> encode -> write -> record -> finalize.

    plan = plan_build(cfg)                 plan.py: teacher, tokenizer, domains, identity
    recs = check_out_dir(...)              ledger.py: what is done, refuse a foreign --out
    for item in own_work(plan, recs):      this file: the domains this worker owns, packed
        view = teacher.view(unit)          encoder.py through an engine (engines.py)
        writer.put(write unit)             writer.py: encode + zstd + write + record, in a
                                           background thread beside the teacher
    try_finalize(...)                      ledger.py: index + manifest.json when all is done

Resume: re-running the same command skips finished units (after checking their sha256)
and redoes the rest; a killed job completes byte-identical to an uninterrupted one,
because a unit's bytes depend only on its sequences, the teacher, the settings and the
seed. Any split into workers gives the same bytes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import partial

from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.corpus import Domain, DomainReader
from sparsekd.cache_builder.encoder import teacher_view
from sparsekd.cache_builder.engines import make_engine
from sparsekd.cache_builder.ledger import (
    RecordLog,
    Records,
    check_out_dir,
    domain_parts,
    shard_ok,
    try_finalize,
    write_build_config,
)
from sparsekd.cache_builder.packing import Unit, pack, units
from sparsekd.cache_builder.plan import BuildPlan, plan_build
from sparsekd.cache_builder.writer import ShardFiles, ShardWriter, encode_table, write_shard
from sparsekd.errors import CorpusError
from sparsekd.schemas.manifest import MANIFEST, read_json


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

    def __init__(self, plan: BuildPlan, recs: Records, stats: BuildStats, engine=None):
        self.plan, self.recs, self.stats = plan, recs, stats
        self.engine, self.own = engine, engine is None
        if engine is not None and engine.name != plan.cfg.teacher.engine:
            raise ValueError(
                f"engine {engine.name!r} given for a {plan.cfg.teacher.engine!r} build"
            )

    def view(self, unit: Unit):
        cfg = self.plan.cfg
        if self.engine is None:
            self.engine = make_engine(
                cfg.teacher,
                k=cfg.encoder.top_k,
                seq_len=cfg.corpus.seq_len,
                seed=cfg.seed,
                path=cfg.encoder.resolved_path,
            )
        if self.stats.first_teacher_call_s is None:
            self.plan.check_weights(self.recs.headers)  # joins the background hash
            self.stats.first_teacher_call_s = time.perf_counter() - self.stats.started
        t0 = time.perf_counter()
        v = teacher_view(
            self.engine, cfg.encoder, cfg.seed, unit.seq_ids, unit.input_ids, unit.next_tokens
        )
        self.stats.teacher_s += time.perf_counter() - t0
        return v

    def close(self) -> None:
        if self.engine is not None and self.own:
            self.engine.close()


def own_work(plan: BuildPlan, recs: Records, stats: BuildStats):
    """Units this worker must compute, each domain's record after its units, in corpus
    order. A domain owned by another worker is read only under --max-sequences (to find
    where the cut falls); a finished one is never read again."""
    cap = plan.cfg.corpus.max_sequences
    before = 0  # sequences of the corpus before this domain (tracked under a cap only)
    for d in plan.domains:
        limit = None if cap is None else max(0, cap - before)
        rec, owned = recs.domains.get(d.index), plan.worker.owns(d.index)
        if rec is not None and (not owned or _domain_intact(plan, recs, rec)):
            before += rec["sequences"]
            continue
        if not owned:
            if cap is not None:
                before += sum(1 for _ in _sequences(plan, d, limit, stats)[1])
            continue
        reader, seqs = _sequences(plan, d, limit, stats)
        n = 0
        for unit in units(d.index, seqs, plan.shard_sequences):
            n += len(unit.seq_ids)
            if _unit_done(plan, recs, unit, stats):
                continue
            yield unit
        yield _domain_record(d, n, reader, rec)
        before += n


def _sequences(plan: BuildPlan, d: Domain, limit: int | None, stats: BuildStats):
    corpus = plan.cfg.corpus
    reader = DomainReader(d, corpus.text_field, corpus.skip_bad_lines)
    stats.domains_read += limit != 0
    tok = plan.tokenizer
    return reader, pack(reader, tok, tok.eos_token_id, corpus.seq_len, limit)


def _domain_intact(plan: BuildPlan, recs: Records, rec: dict) -> bool:
    """Every shard of a finished domain is on disk with its recorded sha256."""
    for j in range(domain_parts(rec, plan.shard_sequences)):
        shard = recs.shards.get((rec["domain"], j))
        if shard is None or not shard_ok(plan.out, shard, deep=True):
            return False
    return True


def _unit_done(plan: BuildPlan, recs: Records, unit: Unit, stats: BuildStats) -> bool:
    shard = recs.shards.get((unit.domain, unit.part))
    if shard is None:
        return False
    if shard["tokens_sha256"] != unit.tokens_sha256():
        raise CorpusError(
            f"the corpus changed since {shard['file']} was written: domain {unit.domain} now "
            "packs to other tokens; restore the corpus or use another --out"
        )
    if shard_ok(plan.out, shard, deep=True):
        stats.units_skipped += 1
        return True
    stats.units_redone += 1  # damaged or missing: written again, byte-identical
    return False


def _domain_record(d: Domain, n: int, reader: DomainReader, old: dict | None) -> dict:
    rec = {
        "kind": "domain",
        "domain": d.index,
        "source": d.source.name,
        "part": d.part,
        "sequences": n,
        "content_sha256": reader.content_sha256,
        "documents": reader.stats.documents,
        "bad_lines": reader.stats.bad_lines,
        "bad_examples": reader.stats.bad_examples,
    }
    if old is not None and old["content_sha256"] != rec["content_sha256"]:
        raise CorpusError(
            f"{d.where} changed since its shards were written (its content hash differs); "
            "restore it or use another --out"
        )
    return rec


def _write_unit(plan: BuildPlan, files: ShardFiles, log: RecordLog, stats, bar, unit: Unit, view):
    """Encode, compress, write and record one unit (runs in the writer thread)."""
    enc = plan.cfg.encoder
    table = encode_table(
        enc.mode,
        unit.seq_ids,
        unit.input_ids,
        unit.next_tokens,
        view.token_logprobs,
        view.supports,
        weighted=enc.weighted,
    )
    meta = {**plan.meta, "teacher_weights_sha256": plan.weights_sha256()}
    entry = write_shard(files, unit.domain, unit.part, table, meta)
    log.append({"kind": "shard", **entry, "tokens_sha256": unit.tokens_sha256()})
    stats.shards_written += 1
    stats.tokens_written += table.num_rows * plan.seq_len
    if bar is not None:
        bar.update(table.num_rows * plan.seq_len)


def run(cfg: BuildConfig, engine=None) -> dict:
    """Build (or resume) this worker's part of the cache; return a summary dict.

    `engine`: an already started engine of `cfg.teacher.engine` to reuse (its K must be
    >= the build's); it is left open.
    """
    stats = BuildStats()
    plan = plan_build(cfg)
    recs = check_out_dir(plan.out, plan.identity, plan.fingerprint)
    log = RecordLog(plan.out, partial(_first_record, plan))
    teacher = Teacher(plan, recs, stats, engine)
    files = ShardFiles(plan.out)
    writer = ShardWriter(cfg.writer.queue_depth)
    bar = _progress(cfg)
    try:
        with writer:
            for item in own_work(plan, recs, stats):
                if isinstance(item, Unit):
                    view = teacher.view(item)
                    writer.put(partial(_write_unit, plan, files, log, stats, bar, item, view))
                else:
                    stats.bad_lines += item["bad_lines"]
                    writer.put(partial(log.append, item))
    finally:
        teacher.close()
        files.close()
        log.close()
        if bar is not None:
            bar.close()
    if stats.shards_written == 0 and (plan.out / MANIFEST).exists():
        manifest = read_json(plan.out / MANIFEST, "manifest")  # complete, and intact
    else:
        manifest = try_finalize(plan.out, plan)
    return _summary(plan, stats, manifest, writer.busy_s)


def _first_record(plan: BuildPlan) -> dict:
    """The header of this process's log; the build config goes beside the cache with it."""
    write_build_config(plan.out, plan)
    return plan.header()


def _summary(plan: BuildPlan, stats: BuildStats, manifest: dict | None, writer_s: float) -> dict:
    wall = time.perf_counter() - stats.started
    s = {
        "out": str(plan.out),
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
