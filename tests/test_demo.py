"""The README's main job, reduced: `sparsekd demo --quick` through the real CLI and vLLM."""

import json

import pytest

from sparsekd.inspect import verify_cache
from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_quick_builds_verifies_and_describes_a_smollm2_cache(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", out, check=True)
    assert "cache complete" in proc.stdout and "bytes/token" in proc.stdout
    assert verify_cache(out / "cache-topk") == []
    res = json.loads((out / "results.json").read_text())
    stats = res["topk_cache"]
    assert stats["mode"] == "topk" and stats["k"] == 12 and stats["engine"] == "vllm"
    assert stats["sequences"] == 24 and stats["tokens"] == 24 * 128
    # SmolLM2 on English documentation: a real teacher predicts far better than chance
    assert stats["teacher_nll"] < 4.0 and stats["top1_agreement"] > 0.3
    assert (out / "cache-topk.png").stat().st_size > 10_000
