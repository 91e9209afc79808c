"""Identity hashes: they change when what decides a cache's bytes changes, and only then;
the same in another process."""

import json
import shutil
import subprocess
import sys

from tokenizers import normalizers
from transformers import AutoTokenizer

from sparsekd.schemas.identity import (
    WeightsDigest,
    fingerprint,
    teacher_files,
    tokenizer_hash,
    weights_sha256,
)
from tests.helpers import flip_bit


def test_fingerprint_is_the_same_in_another_process_and_changes_with_any_field():
    ident = {"mode": "topk", "k": 8, "corpus": {"sources": [["a.jsonl", "jsonl", 10]]}}
    code = f"from sparsekd.schemas.identity import fingerprint; print(fingerprint({ident!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == fingerprint(ident)
    assert fingerprint({**ident, "k": 9}) != fingerprint(ident)
    assert fingerprint(dict(reversed(list(ident.items())))) == fingerprint(ident)


def test_tokenizer_hash_covers_the_normaliser_and_added_tokens(tmp_path, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "copy")) == tokenizer_hash(tok)
    lower = AutoTokenizer.from_pretrained(tmp_path / "copy")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary
    assert len(lower) == len(tok) and tokenizer_hash(lower) != tokenizer_hash(tok)
    added = AutoTokenizer.from_pretrained(tmp_path / "copy")
    added.add_tokens(["<a-new-token>"])
    assert tokenizer_hash(added) != tokenizer_hash(tok)


def test_weights_hash_sees_a_byte_changed_in_the_middle(tmp_path, tiny_llama_dir):
    d = tmp_path / "teacher"
    shutil.copytree(tiny_llama_dir, d)
    before_files, before = teacher_files(d), weights_sha256(d)
    w = d / "model.safetensors"
    flip_bit(w, w.stat().st_size // 2)  # same size, first and last MiB untouched
    assert teacher_files(d) == before_files  # the cheap identity cannot see it...
    assert weights_sha256(d) != before  # ...the full hash does
    assert WeightsDigest(d).result() == weights_sha256(d)


def test_teacher_files_names_config_and_sizes(tmp_path, tiny_llama_dir):
    d = tmp_path / "teacher"
    shutil.copytree(tiny_llama_dir, d)
    ident = teacher_files(d)
    assert [name for name, _ in ident["weights"]] == ["model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    assert teacher_files(d)["config_sha256"] != ident["config_sha256"]
