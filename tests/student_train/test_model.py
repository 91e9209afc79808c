"""Students: a head the fused loss cannot reproduce is refused, so is a tokenizer that maps
text differently (even with the same vocabulary); init-student's refusals; AdamW leaves
norms and biases undecayed."""

import json
import shutil

import pytest
import torch
from tokenizers import normalizers
from transformers import AutoTokenizer

from sparsekd.errors import StudentError
from sparsekd.student_train.config import OptimConfig
from sparsekd.student_train.model import check_head, load_student
from sparsekd.student_train.optim import build_optimizer
from tests.conftest import make_tiny_llama
from tests.helpers import error_line, run_cli


def test_a_head_that_scales_its_logits_is_refused(tmp_path, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    plain = make_tiny_llama(tmp_path / "plain", tok, tied=True)
    model, _ = load_student(plain)  # hidden @ W.T: accepted
    check_head(model)
    scaled = tmp_path / "scaled"
    shutil.copytree(plain, scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "granite", ["GraniteForCausalLM"]
    cfg["logits_scaling"] = 8.0  # Granite divides its logits by this
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudentError, match="transforms its logits .*logits_scaling=8.0"):
        load_student(scaled)


def test_another_tokenizer_with_the_same_vocabulary_is_refused(
    tmp_path, hf_topk_cache, tiny_student
):
    other = tmp_path / "lowercase"
    shutil.copytree(tiny_student, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(other)
    for cmd in (
        [
            "train-student",
            "--cache",
            hf_topk_cache,
            "--student",
            other,
            "--out",
            tmp_path / "o",
            "--steps",
            "1",
        ],
        ["evaluate", "--model", other, "--cache", hf_topk_cache],
    ):
        proc = run_cli(*cmd)
        assert proc.returncode == 2 and "tokenizer mismatch" in error_line(proc), proc.stderr[-400:]
    assert not (tmp_path / "o").exists()


def test_vocabulary_mismatch_is_refused(tmp_path, hf_topk_cache, smollm2_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

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
        hf_topk_cache,
        "--student",
        small,
        "--out",
        tmp_path / "o",
        "--steps",
        "1",
    )
    assert proc.returncode == 2
    assert "vocabulary mismatch: student has 1000 ids, the cache's teacher 49152" in error_line(
        proc
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--layers", "1", "--hidden", "65", "--heads", "2"], "not divisible by --heads 2"),
        (["--layers", "1", "--hidden", "64", "--heads", "0"], "--heads must be >= 1, got 0"),
        (["--layers", "-1", "--hidden", "64", "--heads", "2"], "--layers must be >= 1, got -1"),
        (
            ["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "3"],
            "--kv-heads 3 must divide",
        ),
    ],
)
def test_init_student_refusals(tmp_path, smollm2_dir, args, match):
    proc = run_cli("init-student", "--like", smollm2_dir, *args, "--out", tmp_path / "s")
    assert proc.returncode == 2 and match in error_line(proc)
    assert not (tmp_path / "s").exists()
    proc = run_cli(
        "init-student",
        "--like",
        tmp_path / "nope",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--heads",
        "2",
        "--out",
        tmp_path / "s",
    )
    assert proc.returncode == 2 and "no config.json" in error_line(proc)


def test_adamw_decays_matrices_only(tiny_student):
    model, _ = load_student(tiny_student)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms and norms <= {id(p) for p in no_decay["params"]}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert opt.defaults["fused"] and torch.is_tensor(torch.zeros(1))
