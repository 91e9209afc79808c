"""`sparsekd refine`: MiniPLM Difference Sampling over two caches of the same packed corpus.

    s(x) = mean_t log p_teacher(x_t | x_<t) - mean_t log p_reference(x_t | x_<t)

over the learnt positions of each packed sequence (all L for text; the assistant's tokens
of conversations) from the token log-probs both caches store, in any mode (`--mode
logprob` is the cheap one). The top `ratio` fraction by score is kept,
in corpus order; ties break towards the earlier sequence, so the selection is a pure
function of the two caches and the ratio.

Output DIR is itself a sparsekd cache (`train-student --cache DIR` reads it): the teacher
cache's rows for the kept sequences, with the columns `score` and `text` (decoded
input_ids) added, and a manifest whose meta carries a `refined` record (ratio, cut, both
caches' identities). Beside it, `scores.parquet` holds every sequence's score and both
mean log-probs, so another ratio can be chosen without reading the caches again, and
`--plot` writes `scores.png`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.cache_builder.ledger import BUILD_CONFIG
from sparsekd.cache_builder.teacher import load_tokenizer
from sparsekd.cache_builder.writer import write_shard
from sparsekd.config import check, setting, to_dict
from sparsekd.errors import CacheError, ConfigError
from sparsekd.schemas import format as F
from sparsekd.schemas.cache import Cache, check_same_sequences, in_sorted, open_cache
from sparsekd.schemas.identity import fingerprint, tokenizer_hash
from sparsekd.schemas.manifest import KEPT_SCHEMA, MANIFEST, ShardIndex, write_manifest
from sparsekd.schemas.modes import arrow_schema
from sparsekd.storage import Store, absolute, open_store

REFINE_RECORD = "refine.json"
SCORES_FILE = "scores.parquet"
PLOT_FILE = "scores.png"


@dataclass(frozen=True, kw_only=True)
class RefineConfig:
    teacher_cache: str = setting(doc="The teacher's cache (any mode).", flag=True)
    reference_cache: str = setting(
        doc="The small reference model's cache of the same packed corpus (any mode).", flag=True
    )
    out: str = setting(doc="Refined set folder (a path or a URI).", flag=True)
    ratio: float = setting(0.5, "Fraction of the sequences to keep.", flag=True)
    tokenizer: str | None = setting(
        None, "Tokenizer folder (default: the teacher folder recorded by build-cache).", flag=True
    )
    plot: bool = setting(False, "Also write DIR/scores.png (histogram with the cut).", flag=True)
    shard_sequences: int = setting(256, "Sequences per shard of the refined set.")
    examples: int = setting(3, "Examples shown at each end of the score range.", flag=True)

    def __post_init__(self):
        check(0.0 < self.ratio <= 1.0, f"--ratio must be in (0, 1], got {self.ratio}")
        check(self.shard_sequences >= 1, "--shard-sequences must be >= 1")
        check(self.examples >= 0, "--examples must be >= 0")


def _score_pass(teacher: Cache, reference: Cache):
    """Per sequence, in corpus order: seq_id, mean teacher and reference token log-prob
    over its learnt positions, and how many it has."""
    seq_ids, t_lp, r_lp, learnt = [], [], [], []
    it_r = iter(reference)
    for st in teacher:
        sr = next(it_r, None)
        if sr is None or sr.seq_id != st.seq_id:
            raise CacheError(
                f"sequence {st.seq_id} of {teacher.path} has no counterpart in {reference.path}"
            )
        if sr.next_token != st.next_token or not np.array_equal(sr.input_ids, st.input_ids):
            raise CacheError(
                f"sequence {st.seq_id} holds different tokens in {teacher.path} and "
                f"{reference.path}: the caches were not packed from the same corpus"
            )
        if not np.array_equal(sr.loss_mask, st.loss_mask):
            raise CacheError(
                f"sequence {st.seq_id} has other learnt positions in {teacher.path} and "
                f"{reference.path}: the caches were not packed the same way"
            )
        seq_ids.append(st.seq_id)
        t_lp.append(_mean_learnt(st))
        r_lp.append(_mean_learnt(sr))
        learnt.append(int(st.loss_mask.sum()))
    if next(it_r, None) is not None:
        raise CacheError(f"{reference.path} holds more sequences than {teacher.path}")
    return np.array(seq_ids, np.int64), np.array(t_lp), np.array(r_lp), np.array(learnt)


def _mean_learnt(seq) -> float:
    """Mean token log-prob over the positions the student learns (NaN: none)."""
    lp = seq.token_logprobs[seq.loss_mask]
    return float(np.mean(lp, dtype=np.float64)) if len(lp) else float("nan")


def select(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Boolean mask of the kept sequences: the top `ratio` fraction (at least one) by score,
    ties broken towards the earlier sequence; a sequence with nothing learnt (score NaN)
    is never kept."""
    valid = ~np.isnan(scores)
    n_keep = max(1, int(round(ratio * int(valid.sum()))))
    key = np.where(valid, -scores, np.inf)
    order = np.lexsort((np.arange(len(scores)), key))  # score desc, then corpus order
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[: min(n_keep, int(valid.sum()))]] = True
    return keep


def _load_tokenizer(cfg: RefineConfig, teacher: Cache):
    path = cfg.tokenizer
    if path is None and teacher.store.size(BUILD_CONFIG) is not None:
        build = teacher.store.read_json(BUILD_CONFIG, "build config")
        path = build.get("config", {}).get("teacher", {}).get("path")
    if path is None or not Path(path).is_dir():
        raise ConfigError(
            f"cannot find the tokenizer of {teacher.path} (teacher folder {path!r} is gone); "
            "pass --tokenizer FOLDER"
        )
    tok = load_tokenizer(path, "--tokenizer")
    if tokenizer_hash(tok) != teacher.meta["tokenizer_hash"]:
        raise ConfigError(f"the tokenizer in {path} is not the one {teacher.path} was built with")
    return tok


def _fingerprint(cfg: RefineConfig, teacher: Cache, reference: Cache) -> str:
    return fingerprint(
        {
            "teacher": teacher.fingerprint,
            "reference": reference.fingerprint,
            "ratio": cfg.ratio,
            "shard_sequences": cfg.shard_sequences,
        }
    )


def _prepare_out(store: Store, fingerprint: str, cfg: RefineConfig) -> bool:
    """True when the folder already holds this exact refined set. Refuses any other
    content."""
    if store.size(REFINE_RECORD) is not None:
        if store.read_json(REFINE_RECORD, "refine record").get("fingerprint") != fingerprint:
            raise CacheError(
                f"--out {store.uri} holds a refined set of other caches or another ratio; "
                "use another --out"
            )
        if store.size(MANIFEST) is not None:
            return True
        for name in store.list(""):  # an interrupted run: its partial shards are redone
            if name != REFINE_RECORD:
                store.delete(name)
        return False
    if store.local and store.size("") is not None:
        raise CacheError(f"--out {store.uri} is a file, not a folder")
    if store.top():
        raise CacheError(f"--out {store.uri} is not empty and holds no refined set")
    store.put_json(REFINE_RECORD, {"fingerprint": fingerprint, "config": to_dict(cfg)})
    return False


def run(cfg: RefineConfig) -> dict:
    """Score, select and write the refined set; return the summary (see `format_summary`)."""
    teacher, reference = open_cache(cfg.teacher_cache), open_cache(cfg.reference_cache)
    for c in (teacher, reference):
        if "refined" in c.meta:
            raise CacheError(f"{c.path} is a refined set; score the caches it was made from")
    check_same_sequences(teacher, reference, "the teacher and reference caches")
    if teacher.meta["teacher_weights_sha256"] == reference.meta["teacher_weights_sha256"]:
        raise CacheError(
            "the teacher and reference caches come from the same model: every score would "
            "be 0; build the reference cache with the small reference model"
        )
    store = open_store(cfg.out)
    fp = _fingerprint(cfg, teacher, reference)
    done = _prepare_out(store, fp, cfg)
    tok = _load_tokenizer(cfg, teacher)
    seq_ids, t_lp, r_lp, learnt = _score_pass(teacher, reference)
    scores = t_lp - r_lp
    keep = select(scores, cfg.ratio)
    summary = _summary(cfg, seq_ids, t_lp, r_lp, scores, keep, teacher, tok)
    if not done:
        _write_scores(store, seq_ids, scores, t_lp, r_lp, keep)
        meta = _refined_meta(cfg, fp, teacher, reference, keep, summary["cut"])
        kept = seq_ids[keep]
        index = _write_refined(store, teacher, kept, scores[keep], tok, meta, cfg.shard_sequences)
        write_manifest(
            store,
            meta=meta,
            fingerprint=fp,
            shards=index,
            version=teacher.version,
            tables={"kept": pa.table({"seq_id": kept}, schema=KEPT_SCHEMA)},
            extra={
                "corpus_content_sha256": teacher.manifest.get("corpus_content_sha256"),
                "bad_lines": teacher.manifest.get("bad_lines"),
                "num_learnt": int(learnt[keep].sum()),
                "chat": teacher.manifest.get("chat"),  # the conversations it was cut from
            },
        )
    if cfg.plot:
        store.put(PLOT_FILE, plot_scores(summary, t_lp, r_lp, scores, keep))
        summary["plot"] = store.url(PLOT_FILE)
    store.close()
    summary["reused"] = done
    return summary


def _write_scores(store: Store, seq_ids, scores, t_lp, r_lp, keep) -> None:
    table = pa.table(
        {
            F.COL_SEQ_ID: pa.array(seq_ids),
            F.COL_SCORE: pa.array(scores),
            "teacher_logprob": pa.array(t_lp),
            "reference_logprob": pa.array(r_lp),
            "kept": pa.array(keep),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(SCORES_FILE, buf.getvalue())


def _refined_meta(cfg, fp, teacher: Cache, reference: Cache, keep, cut: float) -> dict:
    return {
        **teacher.meta,
        "fingerprint": fp,
        "shard_sequences": cfg.shard_sequences,
        "refined": {
            "method": "miniplm-difference-sampling",
            "ratio": cfg.ratio,
            "cut": cut,
            "kept": int(keep.sum()),
            "of": len(keep),
            "teacher_cache": absolute(teacher.path),
            "teacher_fingerprint": teacher.fingerprint,
            "reference": reference.meta["teacher"],
            "reference_weights_sha256": reference.meta["teacher_weights_sha256"],
            "reference_cache": absolute(reference.path),
            "reference_fingerprint": reference.fingerprint,
        },
    }


def _write_refined(store: Store, teacher: Cache, kept, kept_scores, tok, meta, S: int):
    """The kept rows of the teacher cache, with `score` and `text`, in shards of S rows
    (shard u is numbered as domain u, part 0; its rows keep their seq_ids)."""
    # the refined set keeps its teacher cache's layout (schema version 2 or 3)
    schema = arrow_schema(
        teacher.meta["mode"], teacher.weighted, refined=True, version=teacher.version
    )
    entries, pending = [], []
    shard, group, _ = teacher.row_groups()
    for i, g in zip(shard.tolist(), group.tolist()):
        table, _ = teacher.read_group_table(i, g)
        rows = np.flatnonzero(in_sorted(table.column(F.COL_SEQ_ID).to_numpy(), kept))
        if not len(rows):
            continue
        table = table.take(pa.array(rows)).replace_schema_metadata(None)
        if F.COL_TEXT in table.column_names:  # a generated cache's: the refined set's own next
            table = table.drop_columns([F.COL_TEXT])
        score = kept_scores[np.searchsorted(kept, table.column(F.COL_SEQ_ID).to_numpy())]
        text = tok.batch_decode(table.column(F.COL_INPUT_IDS).to_pylist())
        table = table.append_column(
            F.COL_SCORE, pa.array(score.astype(np.float32), pa.float32())
        ).append_column(F.COL_TEXT, pa.array(text, pa.string()))
        pending.append(table.cast(schema))
        while sum(t.num_rows for t in pending) >= S:
            merged = pa.concat_tables(pending).combine_chunks()
            entries.append(write_shard(store, len(entries), 0, merged.slice(0, S), meta))
            pending = [merged.slice(S)]
    if sum(t.num_rows for t in pending):
        merged = pa.concat_tables(pending).combine_chunks()
        entries.append(write_shard(store, len(entries), 0, merged, meta))
    return ShardIndex.from_entries(entries)


def _summary(cfg, seq_ids, t_lp, r_lp, scores, keep, teacher: Cache, tok) -> dict:
    valid = np.flatnonzero(~np.isnan(scores))  # sequences with learnt positions
    q = np.quantile(scores[valid], [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    counts, edges = np.histogram(scores[valid], bins=12)
    order = valid[np.lexsort((valid, -scores[valid]))]
    picks = {"top": order[: cfg.examples], "bottom": order[::-1][: cfg.examples]}
    wanted = {int(seq_ids[i]) for idx in picks.values() for i in idx}
    text = {}
    starts = teacher.index.first_seq
    for i in sorted({int(np.searchsorted(starts, w, side="right")) - 1 for w in wanted}):
        for seq in teacher.iter_shard(i):  # only the shards that hold an example
            if seq.seq_id in wanted:
                text[seq.seq_id] = tok.decode(seq.input_ids)
    examples = {
        side: [
            {"seq_id": int(seq_ids[i]), "score": float(scores[i]), "text": text[int(seq_ids[i])]}
            for i in idx
        ]
        for side, idx in picks.items()
    }
    return {
        "out": cfg.out,
        "sequences": len(scores),
        "kept": int(keep.sum()),
        "ratio": cfg.ratio,
        "cut": float(scores[keep].min()),
        "score_mean": float(scores[valid].mean()),
        "score_std": float(scores[valid].std()),
        "quantiles": dict(zip(("min", "p10", "p25", "p50", "p75", "p90", "max"), map(float, q))),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "teacher_logprob_kept": float(t_lp[keep].mean()),
        "teacher_logprob_dropped": float(np.nanmean(t_lp[~keep])) if (~keep).any() else None,
        "reference_logprob_kept": float(r_lp[keep].mean()),
        "reference_logprob_dropped": float(np.nanmean(r_lp[~keep])) if (~keep).any() else None,
        "examples": examples,
    }


def format_summary(s: dict, width: int = 40) -> str:
    def one_line(t: str, n: int = 100) -> str:
        t = " ".join(t.split())
        return t if len(t) <= n else t[: n - 3] + "..."

    qs = s["quantiles"]
    lines = [
        f"refine: kept {s['kept']} of {s['sequences']} sequences (ratio {s['ratio']}), "
        f"cut at score {s['cut']:.4f} -> {s['out']}"
        + (" (already there)" if s.get("reused") else ""),
        f"score = mean teacher log-prob - mean reference log-prob: mean {s['score_mean']:.4f}, "
        f"std {s['score_std']:.4f}",
        "  " + "  ".join(f"{k} {v:.3f}" for k, v in qs.items()),
        f"  mean log-prob kept / dropped: teacher {s['teacher_logprob_kept']:.3f} / "
        f"{_fmt(s['teacher_logprob_dropped'])}, reference {s['reference_logprob_kept']:.3f} / "
        f"{_fmt(s['reference_logprob_dropped'])}",
        "score distribution (| marks the bin holding the cut):",
    ]
    counts, edges = s["histogram"]["counts"], s["histogram"]["edges"]
    top = max(counts) or 1
    for i, c in enumerate(counts):
        mark = "|" if edges[i] <= s["cut"] <= edges[i + 1] else " "
        bar = "#" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {mark} [{edges[i]:8.3f}, {edges[i + 1]:8.3f}) {c:6d} {bar}")
    for side, title in (("top", "highest scores (kept)"), ("bottom", "lowest scores")):
        lines.append(f"{title}:")
        for ex in s["examples"][side]:
            lines.append(f"  #{ex['seq_id']:<6d} {ex['score']:8.3f}  {one_line(ex['text'])!r}")
    if s.get("plot"):
        lines.append(f"plot written to {s['plot']}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_scores(s: dict, t_lp, r_lp, scores, keep) -> bytes:
    """The score histogram and scatter, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ok = ~np.isnan(scores)  # sequences with learnt positions
    scores, t_lp, r_lp, keep = scores[ok], t_lp[ok], r_lp[ok], keep[ok]
    bins = np.histogram_bin_edges(scores, bins=40)
    axes[0].hist(scores[keep], bins=bins, color="#3b6ea8", label=f"kept ({keep.sum()})")
    axes[0].hist(scores[~keep], bins=bins, color="#bbbbbb", label=f"dropped ({(~keep).sum()})")
    axes[0].axvline(s["cut"], color="#c05a3c", ls="--", label=f"cut {s['cut']:.3f}")
    axes[0].set(
        title=f"difference score, ratio {s['ratio']}",
        xlabel="mean teacher log-prob - mean reference log-prob",
        ylabel="sequences",
    )
    axes[0].legend(fontsize=8)
    axes[1].scatter(r_lp[~keep], t_lp[~keep], s=6, color="#bbbbbb", label="dropped")
    axes[1].scatter(r_lp[keep], t_lp[keep], s=6, color="#3b6ea8", label="kept")
    axes[1].set(
        title="per sequence", xlabel="reference mean log-prob", ylabel="teacher mean log-prob"
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
