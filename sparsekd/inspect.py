"""`sparsekd inspect`: what is in a cache, whether it is intact, and what it looks like.

- `cache_stats(cache)`: one pass over every shard; the JSON keys of `inspect --json`.
- `verify_cache(path)`: every problem found (schema, checksums, row and token counts,
  metadata, shards missing from disk or from the manifest), as a list of one-line messages.
- `plot_cache(cache, png)`: histograms of teacher NLL, tail mass and support size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sparsekd.schemas import format as F
from sparsekd.schemas.cache import Cache, open_cache
from sparsekd.schemas.manifest import CacheError, sha256_file


def _position_arrays(cache: Cache, max_positions: int | None = None):
    """Yield per sequence (seq, nll [L], mass [L], support [L], top1_hit [L])."""
    seen = 0
    for seq in cache:
        offsets, ids, probs = seq.targets()
        L = len(seq.input_ids)
        pos = np.repeat(np.arange(L), seq.support_size)
        mass = np.bincount(pos, weights=probs, minlength=L)
        # The most likely stored id of each position: sort by (position, -prob).
        order = np.lexsort((-probs, pos))
        first = offsets[:-1][seq.support_size > 0]
        top1 = np.full(L, -1, dtype=np.int64)
        top1[seq.support_size > 0] = ids[order[first]]
        yield seq, -seq.token_logprobs, mass, seq.support_size, top1 == seq.labels
        seen += L
        if max_positions is not None and seen >= max_positions:
            return


def _entropy_estimate(seq) -> np.ndarray:
    """Per position, Miller-Madow estimate of the teacher's entropy from the N draws:
    -sum p_hat log p_hat + (distinct - 1) / (2N) (unweighted sample caches)."""
    offsets, _, p = seq.targets()
    pos = np.repeat(np.arange(len(seq.support_size)), seq.support_size)
    plug = np.bincount(
        pos, weights=-p * np.log(np.maximum(p, 1e-30)), minlength=len(seq.support_size)
    )
    return plug + (seq.support_size - 1).clip(min=0) / (2.0 * seq.samples)


def cache_stats(cache: Cache) -> dict:
    n = 0
    nll_sum = mass_sum = support_sum = top1_sum = ent_sum = 0.0
    mode = cache.meta["mode"]
    entropy = mode == "sample" and not cache.meta.get("weighted")
    for seq, nll, mass, support, hit in _position_arrays(cache):
        n += len(nll)
        nll_sum += float(nll.sum())
        mass_sum += float(mass.sum())
        support_sum += float(support.sum())
        top1_sum += float(hit.sum())
        if entropy:
            ent_sum += float(_entropy_estimate(seq).sum())
    m = cache.manifest
    meta = cache.meta
    n = max(n, 1)
    return {
        "mode": meta["mode"],
        "k": meta.get("k"),
        "sequences": m["num_sequences"],
        "tokens": m["num_tokens"],
        "shards": len(cache.shards),
        "bytes": m["bytes"],
        "bytes_per_token": m["bytes"] / max(m["num_tokens"], 1),
        "samples": meta.get("samples"),
        "mean_support": support_sum / n,
        "teacher_nll": nll_sum / n,
        "tail_mass": 1.0 - mass_sum / n if mode == "topk" else None,
        "top1_agreement": top1_sum / n if mode != "logprob" else None,
        "teacher_entropy": ent_sum / n if entropy else None,
        "teacher": meta["teacher"],
        "tokenizer_hash": meta["tokenizer_hash"],
        "vocab_size": meta["vocab_size"],
        "seq_len": meta["seq_len"],
        "engine": meta["engine"],
        "bad_lines": m.get("bad_lines"),
        "refined": meta.get("refined"),
    }


def format_stats(s: dict, path: str) -> str:
    what = {
        "topk": f"K = {s['k']}",
        "sample": f"N = {s['samples']} draws",
        "logprob": "token log-probs only",
    }[s["mode"]]
    lines = [
        f"sparsekd cache {path}",
        f"  mode {s['mode']}, {what}, teacher {s['teacher']} (engine {s['engine']}), "
        f"vocab {s['vocab_size']}, seq_len {s['seq_len']}",
        f"  {s['sequences']} sequences, {s['tokens']} tokens in {s['shards']} shards, "
        f"{s['bytes'] / 1e6:.2f} MB = {s['bytes_per_token']:.2f} bytes/token",
        f"  stored ids per position {s['mean_support']:.2f}"
        + (f", tail mass outside them {s['tail_mass']:.4f}" if s["tail_mass"] is not None else ""),
        f"  teacher NLL of the data {s['teacher_nll']:.4f} nats/token"
        + (
            f", top-1 = next token {100 * s['top1_agreement']:.2f} %"
            if s["top1_agreement"] is not None
            else ""
        ),
    ]
    if s.get("teacher_entropy") is not None:
        lines.append(
            f"  teacher entropy (Miller-Madow estimate from the draws) "
            f"{s['teacher_entropy']:.4f} nats"
        )
    if s.get("refined"):
        r = s["refined"]
        lines.append(
            f"  refined set (MiniPLM): kept {r['kept']} of {r['of']} sequences (ratio "
            f"{r['ratio']}, score cut {r['cut']:.4f}), reference {r['reference']}"
        )
    lines.append(f"  tokenizer {s['tokenizer_hash'][:16]}")
    if s.get("bad_lines"):
        lines.append(f"  corpus lines skipped as malformed: {s['bad_lines']}")
    return "\n".join(lines)


def _verify_shard(path: Path, entry: dict, manifest: dict) -> tuple[list[str], int | None]:
    """The shard's problems, and its last seq_id (None when it cannot be read)."""
    problems = []
    name = entry["file"]
    meta = manifest["meta"]
    L = int(meta["seq_len"])
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: size {size} bytes, manifest says {entry['bytes']} (truncated?)")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: checksum mismatch (file changed or corrupted)")
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        expected = F.arrow_schema(meta["mode"], meta.get("weighted", False), "refined" in meta)
        if not schema.remove_metadata().equals(expected):
            problems.append(f"{name}: schema differs from the {meta['mode']} shard schema")
        md = (schema.metadata or {}).get(F.META_KEY)
        if md is None:
            problems.append(f"{name}: no sparsekd metadata")
        else:
            import json

            sm = json.loads(md)
            if sm.get("fingerprint") != manifest["fingerprint"]:
                problems.append(f"{name}: metadata fingerprint differs from the manifest's")
            if sm.get("unit") != entry["unit"]:
                problems.append(f"{name}: metadata unit {sm.get('unit')} != {entry['unit']}")
        if pf.metadata.num_rows != entry["rows"]:
            problems.append(f"{name}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
        table = pf.read()
    except Exception as e:  # any decode failure is a finding, not a crash
        problems.append(f"{name}: unreadable Parquet ({type(e).__name__}: {str(e)[:120]})")
        return problems, None

    def lens(col):
        return np.diff(table.column(col).combine_chunks().offsets.to_numpy())

    seq = table.column(F.COL_SEQ_ID).to_numpy()
    if "refined" in meta:  # a refined set keeps a subset, in corpus order
        if len(seq) and (seq[0] != entry["first_seq"] or np.any(np.diff(seq) <= 0)):
            problems.append(f"{name}: seq_id not increasing from {entry['first_seq']}")
    elif not np.array_equal(seq, np.arange(entry["first_seq"], entry["first_seq"] + len(seq))):
        problems.append(f"{name}: seq_id not consecutive from {entry['first_seq']}")
    for col in (F.COL_INPUT_IDS, F.COL_TOKEN_LOGPROB, F.COL_SUPPORT_SIZE):
        if np.any(lens(col) != L):
            problems.append(f"{name}: {col} rows are not {L} long")
    support = table.column(F.COL_SUPPORT_SIZE).combine_chunks().values.to_numpy()
    per_row = (
        np.add.reduceat(support.astype(np.int64), np.arange(0, len(support), L))
        if len(support)
        else np.zeros(0, np.int64)
    )
    for col in (F.COL_IDS, *F.value_columns(meta["mode"], meta.get("weighted", False))):
        if not np.array_equal(lens(col), per_row):
            problems.append(f"{name}: {col} lengths do not match support_size")
    ids = table.column(F.COL_IDS).combine_chunks().values.to_numpy()
    if len(ids) and (ids.min() < 0 or ids.max() >= int(meta["vocab_size"])):
        problems.append(f"{name}: ids outside the vocabulary [0, {meta['vocab_size']})")
    if len(seq) * L != entry["tokens"]:
        problems.append(f"{name}: {len(seq) * L} tokens, manifest says {entry['tokens']}")
    return problems, int(seq[-1]) if len(seq) else None


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Every problem found in the cache at `path` (empty when it is intact)."""
    p = Path(path)
    try:
        manifest = open_cache(p).manifest
    except CacheError as e:
        return [str(e)]
    problems = []
    listed = {e["file"] for e in manifest["shards"]}
    last_seq = {}
    for entry in manifest["shards"]:
        sp = p / entry["file"]
        if not sp.exists():
            problems.append(f"{entry['file']}: listed in the manifest but missing on disk")
            continue
        found, last_seq[entry["file"]] = _verify_shard(sp, entry, manifest)
        problems.extend(found)
    for f in sorted(p.glob("shard-*.parquet")):
        if f.name not in listed:
            problems.append(f"{f.name}: on disk but not in the manifest")
    rows = sum(e["rows"] for e in manifest["shards"])
    if rows != manifest["num_sequences"]:
        problems.append(
            f"manifest: shards hold {rows} rows, num_sequences says {manifest['num_sequences']}"
        )
    expect = 0
    for e in sorted(manifest["shards"], key=lambda e: e["first_seq"]):
        if "refined" in manifest["meta"]:  # a subset: shards follow each other, gaps allowed
            if e["first_seq"] < expect:
                problems.append(f"manifest: {e['file']} overlaps the shard before it")
            last = last_seq.get(e["file"])
            expect = e["first_seq"] + 1 if last is None else last + 1
            continue
        if e["first_seq"] != expect:
            problems.append(f"manifest: sequences {expect}..{e['first_seq'] - 1} are in no shard")
        expect = e["first_seq"] + e["rows"]
    tokens = sum(e["tokens"] for e in manifest["shards"])
    if tokens != manifest["num_tokens"]:
        problems.append(
            f"manifest: shards hold {tokens} tokens, num_tokens says {manifest['num_tokens']}"
        )
    return problems


def plot_cache(cache: Cache, png: str | os.PathLike, max_positions: int = 2_000_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll, mass, support, counts = [], [], [], [np.zeros(0)]
    for seq, a, b, c, _ in _position_arrays(cache, max_positions):
        nll.append(a)
        mass.append(b)
        support.append(c)
        if F.COL_COUNTS in seq.values:
            counts.append(seq.values[F.COL_COUNTS])
    nll, mass, support, counts = map(np.concatenate, (nll, mass, support, counts))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].hist(nll, bins=60, color="#3b6ea8")
    axes[0].set(
        title=f"teacher NLL of the next token (mean {nll.mean():.3f})",
        xlabel="-log p (nats)",
        ylabel="positions",
    )
    if len(counts):
        axes[1].hist(counts, bins=np.arange(1, counts.max() + 2) - 0.5, color="#c05a3c")
        axes[1].set(
            title=f"draws per stored id (N = {cache.meta['samples']})",
            xlabel="count",
            ylabel="ids",
            yscale="log",
        )
    else:
        axes[1].hist(1.0 - mass, bins=60, color="#c05a3c")
        axes[1].set(
            title=f"tail mass outside the stored ids (mean {1 - mass.mean():.3f})",
            xlabel="1 - sum p",
            ylabel="positions",
        )
    axes[2].hist(support, bins=np.arange(support.min(), support.max() + 2) - 0.5, color="#5a9a5a")
    axes[2].set(
        title=f"stored ids per position (mean {support.mean():.2f})",
        xlabel="ids",
        ylabel="positions",
    )
    fig.suptitle(
        f"{cache.path} ({cache.meta['mode']}, teacher {cache.meta['teacher']}, "
        f"{len(nll)} positions)"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
