"""Vocabularies above 2^17 (Megatron-LM's offline format stops at 131,071): a tiny random
model with 201,088 ids through build-cache (vLLM and hf), train-student and evaluate, with
ids above 131,071 stored, trained on and evaluated."""

import json
import random

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.inspection import verify_cache
from tests.conftest import make_tiny_llama
from tests.helpers import run_cli

V = 201_088
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("vocab201k")
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, V)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    teacher = make_tiny_llama(root / "teacher", tok, vocab=V)
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(2, V)}" for _ in range(300)) for _ in range(6)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root, teacher


def _build(root, teacher, engine, *mode):
    out = root / f"cache-{engine}{'-'.join(mode)}"
    run_cli(
        "build-cache",
        "--teacher",
        teacher,
        "--corpus",
        root / "corpus.jsonl",
        "--out",
        out,
        "--engine",
        engine,
        "--seq-len",
        "64",
        "--shard-sequences",
        "8",
        "--quiet",
        *(mode or ("--k", "8")),
        check=True,
    )
    assert verify_cache(out) == []
    return open_cache(out)


def test_build_train_and_evaluate_with_201088_ids(big_vocab, tmp_path):
    root, teacher = big_vocab
    caches = {engine: _build(root, teacher, engine) for engine in ("hf", "vllm")}
    for c in caches.values():
        assert c.meta["vocab_size"] == V
        seqs = list(c)
        inputs = np.concatenate([s.input_ids for s in seqs])
        ids = np.concatenate([s.ids for s in seqs])
        assert inputs.max() > 131_071 and ids.max() > 131_071 and ids.max() < V
    # the two engines store the same top-8 (up to ties within float noise)
    agree = total = 0
    for a, b in zip(caches["hf"], caches["vllm"]):
        ra, rb = a.ids.reshape(-1, 8), b.ids.reshape(-1, 8)
        agree += sum(set(x) == set(y) for x, y in zip(ra.tolist(), rb.tolist()))
        total += len(ra)
    assert agree >= 0.95 * total
    sample = _build(root, teacher, "hf", "--mode", "sample", "--samples", "16")
    assert max(int(s.ids.max()) for s in sample) > 131_071

    student = tmp_path / "student"
    run_cli(
        "init-student",
        "--like",
        teacher,
        "--layers",
        "1",
        "--hidden",
        "64",
        "--heads",
        "2",
        "--out",
        student,
        check=True,
    )
    run_cli(
        "train-student",
        "--cache",
        caches["vllm"].path,
        "--student",
        student,
        "--out",
        tmp_path / "run",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--quiet",
        check=True,
    )
    res = json.loads(
        run_cli(
            "evaluate",
            "--model",
            tmp_path / "run" / "final",
            "--cache",
            caches["vllm"].path,
            "--json",
            check=True,
        ).stdout
    )
    assert (
        res["tokens"] == len(caches["vllm"]) * 64 and np.isfinite(res["lm_loss"]) and res["kl"] > 0
    )
