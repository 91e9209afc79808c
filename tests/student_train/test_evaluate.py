"""evaluate's metrics on a hand-made case where every number is known."""

import math

import pytest
import torch

from sparsekd.student_train.evaluate import MetricSums


def test_metrics_on_a_hand_made_case():
    # 4 positions, V = 3. Student distributions q (rows), actual next tokens, teacher support.
    q = torch.tensor(
        [
            [0.70, 0.20, 0.10],  # top-1 0 (conf .70), label 0: correct
            [0.50, 0.25, 0.25],  # top-1 0 (conf .50), label 1: wrong
            [0.10, 0.85, 0.05],  # top-1 1 (conf .85), label 1: correct
            [0.30, 0.30, 0.40],
        ]
    )  # top-1 2 (conf .40), label 0: wrong
    labels = torch.tensor([0, 1, 1, 0])
    ids = torch.tensor([[0, 1], [1, -1], [2, 0], [-1, -1]])
    p = torch.tensor([[0.6, 0.3], [0.9, 0.0], [0.5, 0.2], [0.0, 0.0]])
    teacher_lp = torch.tensor([-0.5, -1.0, -0.2, -1.5])  # the teacher's log p of each label
    m = MetricSums()
    m.add(q.log(), labels, ids, p, teacher_lp)
    r = m.result()
    nll = -(math.log(0.7) + math.log(0.25) + math.log(0.85) + math.log(0.3)) / 4
    gap = (
        abs(math.log(0.7) + 0.5)
        + abs(math.log(0.25) + 1.0)
        + abs(math.log(0.85) + 0.2)
        + abs(math.log(0.3) + 1.5)
    ) / 4
    kl = (
        0.6 * math.log(0.6 / 0.7)
        + 0.3 * math.log(0.3 / 0.2)
        + 0.9 * math.log(0.9 / 0.25)
        + 0.5 * math.log(0.5 / 0.05)
        + 0.2 * math.log(0.2 / 0.1)
    ) / 3  # 3 rows with support
    # bins of width 1/15: .70 -> 10, .50 -> 7, .85 -> 12, .40 -> 6; one position each
    ece = (abs(1 - 0.70) + abs(0 - 0.50) + abs(1 - 0.85) + abs(0 - 0.40)) / 4
    # teacher top: row0 id 0 (student 0: agree), row1 id 1 (student 0: no), row2 id 2
    # (student 1: no); row 3 has no support
    assert r["tokens"] == 4
    assert r["lm_loss"] == pytest.approx(nll, abs=1e-6)
    assert r["kl"] == pytest.approx(kl, abs=1e-6)
    assert r["ece"] == pytest.approx(ece, abs=1e-6)
    assert r["top1_agreement"] == pytest.approx(1 / 3)
    assert r["logprob_gap"] == pytest.approx(gap, abs=1e-6)


def test_ece_is_zero_when_calibrated():
    # 10 positions at confidence 0.8 (same bin), 8 of them right
    q = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    m = MetricSums()
    m.add(q.log(), labels, torch.full((10, 1), -1), torch.zeros(10, 1), torch.zeros(10))
    assert m.result()["ece"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_evaluate_cli_json_has_exactly_the_keys(topk12_cache, tiny_student):
    import json

    from tests.helpers import run_cli

    proc = run_cli(
        "evaluate",
        "--model",
        tiny_student,
        "--cache",
        topk12_cache,
        "--max-sequences",
        "4",
        "--json",
        check=True,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(res) == ["lm_loss", "kl", "ece", "top1_agreement", "logprob_gap", "tokens"]
    assert res["tokens"] == 4 * 64 and res["lm_loss"] > 5  # an untrained student


def test_a_cache_without_targets_reports_kl_and_agreement_as_absent():
    m = MetricSums()
    q = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    m.add(q.log(), torch.tensor([0, 1]), torch.full((2, 1), -1), torch.zeros(2, 1), torch.zeros(2))
    r = m.result()
    assert r["kl"] is None and r["top1_agreement"] is None and r["tokens"] == 2


@pytest.mark.slow
def test_evaluate_on_a_logprob_cache_and_max_sequences_zero(tmp_path, smollm2_dir, tiny_student):
    import json

    from tests.helpers import error_line, run_cli

    lp = tmp_path / "lp"
    run_cli(
        "build-cache",
        "--teacher",
        smollm2_dir,
        "--out",
        lp,
        "--engine",
        "hf",
        "--mode",
        "logprob",
        "--seq-len",
        "32",
        "--max-sequences",
        "4",
        "--quiet",
        check=True,
    )
    proc = run_cli("evaluate", "--model", tiny_student, "--cache", lp, "--json", check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["kl"] is None and res["top1_agreement"] is None and res["lm_loss"] > 5
    proc = run_cli("evaluate", "--model", tiny_student, "--cache", lp)
    assert "kl -" in proc.stdout and "top1_agreement -" in proc.stdout
    proc = run_cli("evaluate", "--model", tiny_student, "--cache", lp, "--max-sequences", "0")
    assert proc.returncode == 2 and "--max-sequences must be >= 1, got 0" in error_line(proc)
