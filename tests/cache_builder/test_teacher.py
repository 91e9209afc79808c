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


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _broken_teachers(root, tiny):
    """Teacher folders broken the ways users break them (each: what the error must say)."""
    w = "model.safetensors"
    out = {}
    d = _copy(tiny, root / "truncated")
    (d / w).write_bytes((d / w).read_bytes()[:1000])
    out[d] = f"teacher weights {d / w} cannot be read"
    d = _copy(tiny, root / "random")
    (d / w).write_bytes(bytes(range(256)) * 64)
    out[d] = f"teacher weights {d / w} cannot be read"
    d = _copy(tiny, root / "empty")
    (d / w).write_bytes(b"")
    out[d] = f"teacher weights {d / w} cannot be read"
    d = _copy(tiny, root / "sharded")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    ))  # fmt: skip
    out[d] = "names model-00002-of-00002.safetensors, which is missing"
    for key, value, named in (
        ("hidden_size", 96, "has shape"),
        ("vocab_size", 50000, "has shape"),
        ("num_hidden_layers", 3, "tensors missing (model.layers.2."),
        ("num_hidden_layers", 1, "tensors unexpected (model.layers.1."),
        ("model_type", "no-such-model", "model_type 'no-such-model' in "),
    ):
        d = _copy(tiny, root / f"{key}-{value}")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        out[d] = named
    return out


def test_an_unknown_model_type_is_one_line_naming_it_for_teacher_and_student(
    tmp_path, tiny_llama_dir, hf_topk_cache
):
    """transformers' own message runs over lines after a warning of its own: sparsekd
    names the type and the folder before transformers reads the config."""
    d = _copy(tiny_llama_dir, tmp_path / "odd")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    for args in (
        ("build-cache", "--teacher", d, "--out", tmp_path / "c", "--engine", "hf", "--quiet"),
        ("evaluate", "--model", d, "--cache", hf_topk_cache),
    ):
        proc = run_cli(*args, fresh_process=True)
        line = error_line(proc)
        assert proc.returncode == 2 and f"model_type 'no-such-model' in {d}/config.json" in line
        assert [ln for ln in proc.stderr.splitlines() if "no-such-model" in ln] == [line]


def test_broken_teacher_folders_are_one_line(tmp_path, tiny_llama_dir):
    for teacher, named in _broken_teachers(tmp_path, tiny_llama_dir).items():
        proc = run_cli("build-cache", "--teacher", teacher, "--out", tmp_path / "c", "--engine",
                       "hf", "--quiet")  # fmt: skip
        assert proc.returncode == 2 and named in error_line(proc), (teacher, proc.stderr[-800:])
        assert "Traceback" not in proc.stderr
    cases = [
        (tmp_path / "nonexistent", "teacher folder not found"),
        (tiny_llama_dir / "config.json", "is a file: give the model's folder"),
    ]
    for path, named in cases:
        proc = run_cli("build-cache", "--teacher", path, "--out", tmp_path / "c", "--quiet")
        assert proc.returncode == 2 and named in error_line(proc), proc.stderr[-500:]
