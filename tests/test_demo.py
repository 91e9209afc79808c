"""The README's main job, reduced: `sparsekd demo --quick` through the real CLI and vLLM:
three caches, three students, the comparison table, results.json and demo.png. The teacher
stage finds the teacher already converted (the suite's own conversion of the same GGUF,
tests/conftest.py; the conversion is tested in tests/cache_builder/test_gguf.py)."""

import json
import math
import shutil

import pytest

from sparsekd.inspection import verify_cache
from tests.helpers import run_cli


@pytest.mark.slow
def test_demo_quick_trains_and_compares_three_students(tmp_path, smollm2_dir):
    out = tmp_path / "demo"
    shutil.copytree(smollm2_dir, out / "teacher")
    proc = run_cli("demo", "--quick", "--out", out, check=True)
    assert "preparing the SmolLM2" not in proc.stdout + proc.stderr  # reused
    for name in ("topk", "sample", "heldout"):
        assert verify_cache(out / f"cache-{name}") == []
    res = json.loads((out / "results.json").read_text())

    caches = res["caches"]
    assert caches["topk"]["mode"] == "topk" and caches["topk"]["k"] == 12
    assert caches["sample"]["mode"] == "sample" and caches["sample"]["samples"] == 50
    assert caches["topk"]["tokens"] == caches["sample"]["tokens"] == 24 * 128
    # SmolLM2 on English documentation predicts far better than chance (log V = 10.8).
    assert caches["heldout"]["teacher_nll"] < 4.0
    for key in ("ce", "topk", "rs"):
        m = res[key]
        for metric in ("lm_loss", "kl", "ece", "top1_agreement"):
            assert math.isfinite(m[metric]), (key, metric)
        assert m["tokens"] == 8 * 128
        # every student learnt something in 8 steps: below the uniform guess
        assert m["lm_loss"] < math.log(49152)
        assert len(res["curves"][key]["train_ce"]) == 8
        assert len(res["curves"][key]["heldout_lm_loss"]) == 2
    # Distilled students sit closer to the teacher than the CE student after the same steps
    # from the same initialisation (deterministic on this CPU).
    assert res["topk"]["kl"] < res["ce"]["kl"] and res["rs"]["kl"] < res["ce"]["kl"]
    stages = ("prepare_teacher_s", "engine_start_s", "build_topk_s", "build_sample_s", "train_rs_s")
    assert all(res["timings"][s] > 0 for s in stages[1:]) and res["timings"][stages[0]] >= 0
    assert res["timings"]["this_run_s"] >= sum(res["timings"][s] for s in stages[1:]) * 0.9
    assert "| student | lm_loss | kl | ece | top1_agreement |" in proc.stdout
    assert "| sampled N=50 |" in proc.stdout
    assert (out / "demo.png").stat().st_size > 30_000

    # Running it again reuses every finished stage and reports the same numbers.
    again = run_cli("demo", "--quick", "--out", out, check=True)
    assert "building" not in again.stdout and "training the" not in again.stdout
    res2 = json.loads((out / "results.json").read_text())
    for key in ("ce", "topk", "rs"):
        assert res2[key]["lm_loss"] == res[key]["lm_loss"]
