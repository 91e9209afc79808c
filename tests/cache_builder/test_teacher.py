"""The teacher folder's checks, before any engine starts: each a one-line error."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from tests.conftest import make_tiny_llama
from tests.helpers import error_line, run_cli


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("teachers")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    small = make_tiny_llama(root / "small-vocab", tok, vocab=1000)  # below the tokenizer's
    no_weights = root / "no-weights"
    shutil.copytree(small, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    bad_cfg = root / "bad-config"
    shutil.copytree(small, bad_cfg)
    (bad_cfg / "config.json").write_text("{not json")
    return {"small": small, "no_weights": no_weights, "bad_cfg": bad_cfg}


@pytest.mark.parametrize(
    "which, args, match",
    [
        ("small", [], "config vocab_size 1000 is below its tokenizer's 49152 ids"),
        ("no_weights", [], "has no weights"),
        ("bad_cfg", [], "config.json is not valid JSON"),
        (
            "tiny",
            ["--seq-len", "2048"],
            "--seq-len 2048 needs 2048 positions on this path, the teacher has 1024",
        ),
        ("tiny", ["--engine", "vllm", "--seq-len", "1023"], "--seq-len 1023 needs 1025 positions"),
    ],
)
def test_teacher_problems_are_one_line_before_any_engine_starts(
    tmp_path, teachers, tiny_llama_dir, which, args, match
):
    teacher = tiny_llama_dir if which == "tiny" else teachers[which]
    base = ["build-cache", "--teacher", teacher, "--out", tmp_path / "c", "--quiet"]
    proc = run_cli(*base, *(args if "--engine" in args else ["--engine", "hf", *args]))
    assert proc.returncode == 2 and match in error_line(proc), proc.stderr[-600:]
    assert not (tmp_path / "c").exists()


def test_a_teacher_config_without_vocab_size_is_refused(tmp_path, tiny_llama_dir):
    d = tmp_path / "t"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vocab_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("build-cache", "--teacher", d, "--out", tmp_path / "c", "--engine", "hf")
    assert proc.returncode == 2 and "has no vocab_size" in error_line(proc)
