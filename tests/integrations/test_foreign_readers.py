"""Any Parquet engine reads a cache through the documented glob, `shards/*/*.parquet`:
DuckDB, Polars, `datasets` and pyarrow.dataset, with the right row and token counts; a
refined set's extra Parquet files (scores.parquet, the index) stay outside the glob."""

import json

import pyarrow.dataset as pads
import pytest

from sparsekd import open_cache
from sparsekd.schemas import format as F
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def refined(tmp_path_factory, smollm2_dir, tiny_llama_dir):
    root = tmp_path_factory.mktemp("foreign")
    for name, model in (("teacher", smollm2_dir), ("reference", tiny_llama_dir)):
        run_cli(
            "build-cache",
            "--teacher",
            model,
            "--out",
            root / name,
            "--engine",
            "hf",
            "--mode",
            "logprob",
            "--seq-len",
            "32",
            "--max-sequences",
            "20",
            "--shard-sequences",
            "6",
            "--quiet",
            check=True,
        )
    run_cli(
        "refine",
        "--teacher-cache",
        root / "teacher",
        "--reference-cache",
        root / "reference",
        "--out",
        root / "refined",
        "--ratio",
        "0.5",
        check=True,
    )
    return root / "refined"


def _counts(cache):
    c = open_cache(cache)
    return len(c), c.num_tokens


@pytest.mark.parametrize("which", ["hf_topk_cache", "refined"])
def test_duckdb_polars_datasets_and_pyarrow_read_the_glob(request, which):
    cache = request.getfixturevalue(which)
    rows, tokens = _counts(cache)
    glob = str(cache / F.SHARD_GLOB)
    stats = json.loads(run_cli("inspect", cache, "--json", check=True).stdout)
    assert stats["shard_glob"] == F.SHARD_GLOB == "shards/*/*.parquet"

    import duckdb

    got = duckdb.sql(
        f"SELECT count(*), sum(len(input_ids)) FROM read_parquet('{glob}')"
    ).fetchall()[0]
    assert got == (rows, tokens)

    import polars as pl

    df = pl.scan_parquet(glob).select(pl.len(), pl.col("input_ids").list.len().sum()).collect()
    assert df.row(0) == (rows, tokens)

    from datasets import load_dataset

    ds = load_dataset(
        "parquet", data_files=glob, split="train", cache_dir=str(cache.parent / "hf-datasets")
    )
    assert len(ds) == rows and sum(len(x) for x in ds["input_ids"]) == tokens

    table = pads.dataset(cache / "shards", format="parquet").to_table(columns=["seq_id"])
    assert table.num_rows == rows
    if which == "refined":  # scores.parquet and the index are outside the glob
        assert (cache / "scores.parquet").exists() and list(cache.glob("index/*.parquet"))
        assert set(ds.column_names) >= {"score", "text", "seq_id"}
