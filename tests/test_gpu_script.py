"""benchmarks/gpu/run_all.sh, the one command for a GPU machine, run here with --dry-run:
every step at toy sizes on CPU (the Triton interpreter), so that the script itself is
tested where GPUs are not."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_all.sh"

pytestmark = pytest.mark.slow


def test_dry_run_runs_every_step_and_reports_them(tmp_path, tiny_llama_dir):
    """The teacher is the tiny random Llama (SmolLM2's tokenizer): the script is the point."""
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--teacher", str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    assert summary.startswith("# sparsekd GPU run: ") and "(dry run)" in summary
    for name in ("kernels", "sparse_kl", "teacher_head", "train", "documents"):
        assert f"| {name} | ok |" in summary and (out / f"{name}.log").exists()
    train = json.loads((out / "train.json").read_text())
    assert train["resumed_weights_bitwise_equal"] is True and train["tokens_per_s_median"] > 0
    assert "exit status: 75" in (out / "train.log").read_text()
    assert "document_step_s" in (out / "documents.log").read_text()


def test_without_a_gpu_and_without_dry_run_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "run_all.sh: no CUDA device here (torch sees none); --dry-run runs the steps on CPU"
    )
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
