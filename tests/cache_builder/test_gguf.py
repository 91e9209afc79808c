"""prepare-teacher: the HF folder written from the GGUF reproduces transformers' own GGUF
loading, and bad inputs fail in one line."""

from pathlib import Path

import torch

from tests.helpers import error_line, run_cli


def test_logits_equal_transformers_gguf_loading(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsekd.cache_builder.gguf import default_gguf_path

    gguf = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Knowledge distillation trains a small student from a large teacher's outputs."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ref_tok(text).input_ids
    with torch.no_grad():
        a = ref(ids).logits
        b = ours(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    assert ours.config.tie_word_embeddings and ours.config.vocab_size == 49152


def test_prepare_teacher_refuses_missing_gguf_and_nonempty_out(tmp_path):
    proc = run_cli("prepare-teacher", "--out", tmp_path / "t", "--gguf", tmp_path / "nope.gguf")
    assert proc.returncode == 2
    assert "GGUF file not found" in error_line(proc)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    proc = run_cli("prepare-teacher", "--out", tmp_path / "full")
    assert proc.returncode == 2 and "not empty" in error_line(proc)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_prepare_teacher_rejects_junk_gguf(tmp_path):
    junk = Path(tmp_path / "junk.gguf")
    junk.write_bytes(b"not a gguf file at all" * 10)
    proc = run_cli("prepare-teacher", "--out", tmp_path / "t", "--gguf", junk)
    assert proc.returncode == 2 and "cannot read GGUF" in error_line(proc)
    assert not (tmp_path / "t").exists()
