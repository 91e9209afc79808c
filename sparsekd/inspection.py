"""`sparsekd inspect`: what is in a cache, whether it is intact, and what it looks like.

- `cache_stats(cache)`: one pass over every shard; the JSON keys of `inspect --json`.
- `verify_cache(path)`: every problem found, as one-line messages: each shard's sha256
  against the index, its footer metadata against the manifest, every row group's page
  CRCs, content checksum and structure, sequence ids, shards missing from disk or from the
  index, and the totals.
- `plot_cache(cache, png)`: histograms of teacher NLL, tail mass and support size.
"""

from __future__ import annotations

import fnmatch
import os

import numpy as np

from sparsekd.errors import CacheError
from sparsekd.schemas import format as F
from sparsekd.schemas.cache import Cache, learnt_mask, open_cache
from sparsekd.schemas.manifest import read_domain_index
from sparsekd.schemas.modes import arrow_schema, get_mode


def _position_arrays(cache: Cache, max_positions: int | None = None):
    """Yield per sequence (seq, nll, mass, support, top1_hit), each [n] over its n learnt
    positions (the only ones with a target)."""
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
        m = seq.loss_mask
        yield seq, -seq.token_logprobs[m], mass[m], seq.support_size[m], (top1 == seq.labels)[m]
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
    """Statistics over the learnt positions (every position of a text cache)."""
    n = 0
    nll_sum = mass_sum = support_sum = top1_sum = ent_sum = 0.0
    mode = get_mode(cache.meta["mode"])
    entropy = mode.draws and not cache.meta.get("weighted")
    rows = documents = 0
    for seq, nll, mass, support, hit in _position_arrays(cache):
        rows += 1
        documents += len(seq.doc_starts)
        n += len(nll)
        nll_sum += float(nll.sum())
        mass_sum += float(mass.sum())
        support_sum += float(support.sum())
        top1_sum += float(hit.sum())
        if entropy:
            ent_sum += float(_entropy_estimate(seq)[seq.loss_mask].sum())
    m = cache.manifest
    meta = cache.meta
    if m.get("num_learnt", m["num_tokens"]) != n:
        raise CacheError(
            f"{cache.store.url('manifest.json')}: its num_learnt is {m.get('num_learnt')}, the "
            f"shards hold {n} learnt positions (an edited or damaged manifest)"
        )
    learnt, n = n, max(n, 1)
    return {
        "mode": meta["mode"],
        "k": meta.get("k"),
        "sequences": m["num_sequences"],
        "tokens": m["num_tokens"],
        "shards": m["num_shards"],
        "shard_glob": F.SHARD_GLOB,
        "fingerprint": cache.fingerprint,
        "bytes": m["bytes"],
        "bytes_per_token": m["bytes"] / max(m["num_tokens"], 1),
        "learnt_positions": learnt,
        "learnt_fraction": learnt / max(m["num_tokens"], 1),
        "bytes_per_learnt_token": m["bytes"] / n,
        "schema_version": cache.version,
        "attention": F.attention_of(meta),
        "documents_per_row": documents / max(rows, 1),
        "chat": chat_summary(m.get("chat"), int(meta["seq_len"])),
        "generate": generate_summary(m.get("generate"), meta.get("generate")),
        "samples": meta.get("samples"),
        "mean_support": support_sum / n,
        "teacher_nll": nll_sum / n,
        "tail_mass": 1.0 - mass_sum / n if mode.truncated else None,
        "top1_agreement": top1_sum / n if mode.has_support else None,
        "teacher_entropy": ent_sum / n if entropy else None,
        "teacher": meta["teacher"],
        "tokenizer_hash": meta["tokenizer_hash"],
        "vocab_size": meta["vocab_size"],
        "seq_len": meta["seq_len"],
        "engine": meta["engine"],
        "bad_lines": m.get("bad_lines"),
        "teacher_weights_sha256": meta.get("teacher_weights_sha256"),
        "refined": meta.get("refined"),
    }


def chat_summary(chat: dict | None, L: int) -> dict | None:
    """The manifest's conversation totals, with the rows' padding fraction."""
    if not chat:
        return None
    slots = chat["rows"] * (L + 1)
    return {**chat, "padding_fraction": 1.0 - chat["tokens"] / slots if slots else 0.0}


def generate_summary(totals: dict | None, settings: dict | None) -> dict | None:
    """A generated cache (--generate): answers per prompt, their mean length, the fraction
    cut at max_new_tokens, the teacher's mean log-prob of its own answer tokens."""
    if not totals:
        return None
    answers, tokens = totals["answers"], totals["answer_tokens"]
    answered = totals["prompts"] - totals["too_long"]
    return {
        **totals,
        "settings": settings,
        "answers_per_prompt": answers / answered if answered else 0.0,
        "mean_answer_tokens": tokens / answers if answers else 0.0,
        "cut_fraction": totals["cut"] / answers if answers else 0.0,
        "cut_rows": totals.get("cut_rows"),  # rows flagged (Cache.cut_seq_ids() lists them)
        "mean_answer_logprob": totals["logprob_sum"] / tokens if tokens else 0.0,
    }


def _attention_text(s: dict) -> str:
    if s["attention"] == "row":
        return "each row read as one sequence" + (
            f" (schema version {s['schema_version']}: built before documents were kept apart)"
            if s["schema_version"] < 4
            else ""
        )
    return (
        f"{s['documents_per_row']:.2f} documents per row, each read alone by the teacher and "
        "the student"
    )


def format_stats(s: dict, path: str) -> str:
    what = get_mode(s["mode"]).describe(s)
    lines = [
        f"sparsekd cache {path}",
        f"  mode {s['mode']}, {what}, teacher {s['teacher']} (engine {s['engine']}), "
        f"vocab {s['vocab_size']}, seq_len {s['seq_len']}",
        f"  {s['sequences']} sequences, {s['tokens']} tokens in {s['shards']} shards, "
        f"{s['bytes'] / 1e6:.2f} MB = {s['bytes_per_token']:.2f} bytes/token",
        f"  attention {s['attention']}: {_attention_text(s)}",
        f"  learnt positions {s['learnt_positions']} ({100 * s['learnt_fraction']:.1f} % of the "
        f"tokens) = {s['bytes_per_learnt_token']:.2f} bytes per learnt token",
        f"  stored ids per learnt position {s['mean_support']:.2f}"
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
    if s.get("chat"):
        c = s["chat"]
        pad = 100 * c["padding_fraction"]
        lines.append(
            f"  conversations {c['conversations']} in {c['rows']} rows ({pad:.1f} % padding); "
            f"{c['split']} split between turns, {c['dropped']} dropped (longer than a row)"
        )
    if s.get("generate"):
        g = s["generate"]
        lines.append(
            f"  generated by the teacher: {g['answers']} answers to {g['prompts']} prompts "
            f"({g['answers_per_prompt']:.2f} per prompt answered; {g['too_long']} prompts too "
            f"long for a row), mean answer {g['mean_answer_tokens']:.1f} tokens, "
            f"{100 * g['cut_fraction']:.1f} % cut at max_new_tokens (in {g['cut_rows']} rows: "
            f"Cache.cut_seq_ids()), the teacher's mean "
            f"log-prob of its answer tokens {g['mean_answer_logprob']:.4f}"
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
    if get_mode(s["mode"]).has_support:
        lines.append(
            "  what it teaches, against the teacher in full: sparsekd fidelity --cache "
            f"{path} --teacher TEACHER (docs/fidelity.md)"
        )
    return "\n".join(lines)


PLACE_KEYS = ("domain", "part", "first_seq", "rows", "checksums")


def _verify_shard(cache: Cache, i: int, full: bool) -> tuple[list[str], int | None, int]:
    """Shard i's problems, its last seq_id (None when it cannot be read) and its learnt
    positions."""
    name = cache.index.relpath(i)
    if full and (problem := cache.verify_full(i)):
        return [problem], None, 0
    try:
        sf = cache.shard(i)
        own = {k: v for k, v in sf.footer.items() if k not in PLACE_KEYS}
        if own != cache.meta:
            keys = sorted(k for k in set(own) | set(cache.meta) if own.get(k) != cache.meta.get(k))
            return (
                [f"{name}: its metadata differs from the manifest's in {', '.join(keys)}"],
                None,
                0,
            )
        meta = cache.meta
        expected = arrow_schema(
            meta["mode"],
            cache.weighted,
            refined="refined" in meta,
            version=cache.version,
            generated="generate" in meta,
        )
        if not sf.schema.remove_metadata().equals(expected):
            return [f"{name}: schema differs from the {meta['mode']} shard schema"], None, 0
        groups = [cache.read_group_table(i, g) for g in range(sf.num_row_groups)]
        seq = np.concatenate([cols[F.COL_SEQ_ID][1] for _, cols in groups])
        L = int(meta["seq_len"])
        learnt = sum(int(learnt_mask(cols, t.num_rows, L).sum()) for t, cols in groups)
    except CacheError as e:
        return [str(e)], None, 0
    first = int(cache.index.first_seq[i])
    if "refined" in cache.meta:  # a refined set keeps a subset, in corpus order
        if len(seq) and (seq[0] != first or np.any(np.diff(seq) <= 0)):
            return [f"{name}: seq_id not increasing from {first}"], None, 0
    elif not np.array_equal(seq, np.arange(first, first + len(seq))) or (
        F.seq_domain(first) != int(cache.index.domain[i])
    ):
        return (
            [f"{name}: seq_id not consecutive from {first} in domain {cache.index.domain[i]}"],
            None,
            0,
        )
    return [], int(seq[-1]) if len(seq) else None, learnt


def verify_cache(path: str | os.PathLike, full: bool = True) -> list[str]:
    """Every problem found in the cache at `path` (a local path or a URI; empty when it is
    intact). `full`: also the sha256 of every shard."""
    try:
        cache = open_cache(path)
    except CacheError as e:
        return [str(e)]
    problems, last, learnt = [], None, 0
    for i in range(len(cache.index)):
        found, seq_end, n = _verify_shard(cache, i, full)
        problems += found
        learnt += n
        first = int(cache.index.first_seq[i])
        if last is not None and first <= last:
            problems.append(f"{cache.index.relpath(i)}: its sequences overlap the shard before it")
        last = seq_end if seq_end is not None else last
    listed = {cache.index.relpath(i) for i in range(len(cache.index))}
    for rel in cache.store.list(f"{F.SHARDS_DIR}/"):
        if fnmatch.fnmatchcase(rel, F.SHARD_GLOB) and rel not in listed:
            problems.append(f"{rel}: present but not in the manifest")
    problems += _verify_domains(cache)
    claimed = cache.manifest.get("num_learnt", cache.num_tokens)  # v2: every position
    if not problems and claimed != learnt:
        problems.append(
            f"manifest.json: its num_learnt is {claimed}, the shards hold {learnt} learnt "
            "positions (an edited or damaged manifest)"
        )
    return problems


def _verify_domains(cache: Cache) -> list[str]:
    """Each domain's recorded sequence count equals the rows of its shards."""
    ref = cache.manifest["index"].get("domains")
    if ref is None:
        return []
    try:
        domains = read_domain_index(cache.store, ref)
    except CacheError as e:
        return [str(e)]
    rows = np.bincount(cache.index.domain, weights=cache.index.rows, minlength=domains.num_rows)
    want = domains.column("sequences").to_numpy()
    bad = np.flatnonzero(rows[: len(want)] != want)
    return [
        f"domain {int(d)}: {int(rows[d])} sequences in its shards, {int(want[d])} recorded"
        for d in bad[:5]
    ]


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
