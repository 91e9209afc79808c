"""train-student on a real cache built by the real vLLM engine (SmolLM2 teacher): learning,
backend agreement, kill-and-resume equality, DDP with gloo, and the refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparsekd import open_cache
from sparsekd.student_train.evaluate import evaluate
from sparsekd.student_train.model import load_student
from sparsekd.student_train.trainer import TrainConfig, run
from tests.conftest import error_line, run_cli

pytestmark = pytest.mark.slow


def _cfg(cache, student, out, **kw):
    base = dict(
        cache=str(cache),
        student=str(student),
        out=str(out),
        steps=6,
        batch_size=2,
        lr=3e-3,
        warmup=2,
        progress=False,
        tensorboard=False,
    )
    return TrainConfig(**{**base, **kw})


def _records(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_lm_loss_falls_clearly(tmp_path, vllm_topk_cache, tiny_student):
    cache = open_cache(vllm_topk_cache)
    before = evaluate(load_student(tiny_student)[0], cache)
    run(
        _cfg(
            vllm_topk_cache,
            tiny_student,
            tmp_path / "run",
            steps=40,
            batch_size=4,
            loss="fkl",
            kd_weight=0.5,
        )
    )
    after = evaluate(load_student(tmp_path / "run" / "final")[0], cache)
    assert after["lm_loss"] < before["lm_loss"] - 3.0, (before, after)
    assert after["kl"] < before["kl"] and after["tokens"] == before["tokens"] == 48 * 64
    recs = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert len(recs) == 40 and {
        "step",
        "loss",
        "ce",
        "kd",
        "lr",
        "grad_norm",
        "tokens_per_s",
    } <= set(recs[0])
    assert recs[-1]["loss"] == pytest.approx(recs[-1]["ce"] + recs[-1]["kd"], rel=1e-5)


def test_same_loss_curve_with_triton_and_torch(tmp_path, vllm_topk_cache, tiny_student):
    curves = {}
    for backend in ("torch", "triton"):
        run(
            _cfg(
                vllm_topk_cache,
                tiny_student,
                tmp_path / backend,
                steps=4,
                batch_size=1,
                loss="ghost",
                backend=backend,
            )
        )
        curves[backend] = [r["loss"] for r in _records(tmp_path / backend)]
    assert len(curves["torch"]) == 4
    torch.testing.assert_close(
        torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=1e-4, atol=1e-5
    )


def test_killed_and_resumed_run_is_bitwise_identical(tmp_path, vllm_topk_cache, tiny_student):
    args = [
        "train-student",
        "--cache",
        vllm_topk_cache,
        "--student",
        tiny_student,
        "--steps",
        "16",
        "--batch-size",
        "2",
        "--save-every",
        "4",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--quiet",
    ]
    run_cli(*args, "--out", tmp_path / "full", check=True)

    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsekd", *map(str, args), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-4" / "DONE").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the kill must land before the run ends"
    run_cli(*args, "--out", out, "--resume", check=True)

    a = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    b = (out / "final" / "model.safetensors").read_bytes()
    assert a == b, "final weights differ"
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa
    assert strip(_records(out)) == strip(_records(tmp_path / "full"))
    assert (out / "data" / "rank-0.txt").read_text() == (
        tmp_path / "full" / "data" / "rank-0.txt"
    ).read_text()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_gloo_ranks_see_disjoint_data(tmp_path, vllm_topk_cache, tiny_student, fsdp):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + int(fsdp)),
        "-m",
        "sparsekd",
        "train-student",
        "--cache",
        str(vllm_topk_cache),
        "--student",
        str(tiny_student),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--quiet",
    ] + (["--fsdp"] if fsdp else [])
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    # a failing rank's one-line error first: the tail is the launcher's traceback
    errors = [ln for ln in proc.stderr.splitlines() if "sparsekd: error" in ln]
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-2000:]
    ids = []
    for rank in (0, 1):
        lines = (out / "data" / f"rank-{rank}.txt").read_text().splitlines()
        assert len(lines) == 3
        ids.append({int(x) for ln in lines for x in ln.split()[1:]})
    assert ids[0] and ids[1] and not (ids[0] & ids[1])
    model, _ = load_student(out / "final")
    assert torch.isfinite(next(model.parameters())).all()


def test_vocabulary_and_tokenizer_mismatch_are_refused(
    tmp_path, vllm_topk_cache, tiny_student, smollm2_dir
):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=32,
        )
    ).save_pretrained(small)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(small)
    proc = run_cli(
        "train-student",
        "--cache",
        vllm_topk_cache,
        "--student",
        small,
        "--out",
        tmp_path / "o1",
        "--steps",
        "1",
    )
    assert proc.returncode == 2
    assert "vocabulary mismatch: student has 1000 ids, the cache's teacher 49152" in error_line(
        proc
    )

    other = tmp_path / "other-tok"
    shutil.copytree(tiny_student, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<a-new-token>"])  # changes the vocabulary, not the model
    tok.save_pretrained(other)
    proc = run_cli(
        "train-student",
        "--cache",
        vllm_topk_cache,
        "--student",
        other,
        "--out",
        tmp_path / "o2",
        "--steps",
        "1",
    )
    assert proc.returncode == 2 and "tokenizer mismatch: student tokenizer" in error_line(proc)
    assert not (tmp_path / "o2" / "metrics.jsonl").exists()
