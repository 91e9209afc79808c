"""Bytes/token of candidate shard encodings on real SmolLM2 top-K output (K = 8 and 64).

The teacher (hf engine, exact logits) runs once over a slice of the built-in corpus; the
same arrays are then written as Parquet under each candidate encoding, and the file sizes
compared. The winner is what `sparsekd.schemas.format` uses; the table goes to
`benchmarks/results/encodings.md` and `docs/format.md`.

    python benchmarks/bench_encodings.py --teacher teacher/ [--sequences 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
import io
import platform
from pathlib import Path

import _results
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.cache_builder.engines import HfEngine
from sparsekd.cache_builder.teacher import TeacherConfig
from sparsekd.schemas import format as F


def _lists(values: np.ndarray, n_rows: int, typ) -> pa.ListArray:
    per = len(values) // n_rows
    offsets = np.arange(0, n_rows + 1, dtype=np.int32) * per
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def encode(name: str, ids_NLK, lp_NLK, tok_lp_NL, input_ids_NL) -> int:
    n, L, K = ids_NLK.shape
    ids = ids_NLK.reshape(-1).astype(np.int32)
    lp = lp_NLK.reshape(-1)
    cols = {"input_ids": _lists(input_ids_NL.reshape(-1), n, pa.int32())}
    opts = {k: v for k, v in F.PARQUET_OPTIONS.items() if k != "column_encoding"}
    if "delta-ids" in name:
        d = ids_NLK.astype(np.int32).copy()
        d[..., 1:] = np.diff(d, axis=-1)
        ids = d.reshape(-1)
    if "uint16-ids" in name:
        cols["ids"] = _lists(ids.astype(np.uint16), n, pa.uint16())
    else:
        cols["ids"] = _lists(ids, n, pa.int32())
    if "f16-lp" in name:
        cols["logprobs"] = _lists(lp.astype(np.float16), n, pa.float16())
        cols["token_logprob"] = _lists(tok_lp_NL.reshape(-1).astype(np.float16), n, pa.float16())
    elif "f32-lp" in name:
        cols["logprobs"] = _lists(lp.astype(np.float32), n, pa.float32())
        cols["token_logprob"] = _lists(tok_lp_NL.reshape(-1), n, pa.float32())
    else:
        cols["logprobs"] = _lists(F.quantize_logprobs(lp), n, pa.uint16())
        cols["token_logprob"] = _lists(F.quantize_logprobs(tok_lp_NL.reshape(-1)), n, pa.uint16())
    if "parquet-delta" in name:
        opts["column_encoding"] = {
            "ids.list.element": "DELTA_BINARY_PACKED",
            "input_ids.list.element": "DELTA_BINARY_PACKED",
        }
    if "bss" in name:
        opts["column_encoding"] = {
            "ids.list.element": "BYTE_STREAM_SPLIT",
            "logprobs.list.element": "BYTE_STREAM_SPLIT",
            "token_logprob.list.element": "BYTE_STREAM_SPLIT",
        }
    if "zstd3" in name:
        opts["compression_level"] = 3
    if "dict" in name:
        opts["use_dictionary"] = True
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=F.ROW_GROUP_SIZE, **opts)
    return buf.tell()


CANDIDATES = [
    "int32-ids + uint16-lp (zstd9)",
    "int32-ids + uint16-lp (zstd3)",
    "int32-ids + uint16-lp + dict (zstd9)",
    "delta-ids + uint16-lp (zstd9)",
    "parquet-delta-ids + uint16-lp (zstd9)",
    "int32-ids + uint16-lp + bss (zstd9)",
    "int32-ids + f16-lp (zstd9)",
    "int32-ids + f16-lp + bss (zstd9)",
    "int32-ids + f32-lp (zstd9)",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "encodings.md"))
    args = ap.parse_args()

    ids, nxt = _results.builtin_sequences(args.teacher, args.seq_len, args.sequences)
    engine = HfEngine(TeacherConfig(path=args.teacher, engine="hf"), k=64, seq_len=args.seq_len)
    tb = engine.run(ids, nxt)
    ids64 = np.stack(tb.topk_ids)
    lp64 = np.stack(tb.topk_logprobs)
    tok_lp = np.stack(tb.token_logprobs)
    input_ids = np.stack(ids)
    tokens = input_ids.size

    rows = []
    for K in (8, 64):
        # top-K of the top-64: pick the K largest log-probs, then re-sort by id
        keep = np.argsort(-lp64, axis=-1, kind="stable")[..., :K]
        ids_k = np.take_along_axis(ids64, keep, -1)
        lp_k = np.take_along_axis(lp64, keep, -1)
        order = np.argsort(ids_k, axis=-1, kind="stable")
        ids_k = np.take_along_axis(ids_k, order, -1)
        lp_k = np.take_along_axis(lp_k, order, -1)
        for name in CANDIDATES:
            b = encode(name, ids_k, lp_k, tok_lp, input_ids)
            rows.append((K, name, b / tokens))
    qerr = np.abs(F.dequantize_logprobs(F.quantize_logprobs(lp64)) - lp64).max()
    f16err = np.abs(lp64.astype(np.float16).astype(np.float32) - lp64).max()

    commit = _results.commit()
    lines = (
        [
            "# Shard encodings: bytes per token (SmolLM2-135M-Instruct, built-in corpus)",
            "",
            f"{args.sequences} sequences x {args.seq_len} tokens = {tokens} tokens; every variant "
            "stores input_ids, token log-prob, ids and log-probs; written with pyarrow "
            f"{pa.__version__} on {platform.machine()} ({platform.python_version()}), commit "
            f"{commit}. Command: `python benchmarks/bench_encodings.py --teacher teacher/`.",
            "",
            "| K | encoding | bytes/token |",
            "|---|---|---|",
        ]
        + [f"| {k} | {name} | {bpt:.2f} |" for k, name, bpt in rows]
        + [
            "",
            f"Max abs log-prob error: uint16 fixed point (1/{int(F.LOGPROB_SCALE)}) {qerr:.2e}; "
            f"float16 {f16err:.2e}.",
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
