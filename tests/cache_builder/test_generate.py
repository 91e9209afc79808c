"""`build-cache --generate` on the real SmolLM2-Instruct teacher through vLLM: prompts in,
the teacher's answers out, learnt on the answers only (checked against the chat template's
own rendering, written out here as ChatML); the targets captured while generating equal a
transformers forward over the generated ids; n answers per prompt are n rows; W in {1, 2}
and kill -9 + re-run give the same bytes; settings that make no sense are refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.config import build
from sparsekd.errors import ConfigError
from sparsekd.inspection import cache_stats
from tests.helpers import digests, error_line, kill_build_after, run_cli, shard_files

pytestmark = pytest.mark.xdist_group("vllm")  # the shared SmolLM2 engine (conftest.py)

L, K, N, NEW = 96, 8, 2, 20  # row length, top-K, answers per prompt, most new tokens
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What does a Python list hold?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Say hello in Spanish.",
    "What colour is the sky?",
]
SYSTEM = "Be brief."


def _rows(questions):
    """Prompts in each accepted form: a bare prompt, a conversation ending with the user,
    one whose old answer the teacher replaces."""
    for i, q in enumerate(questions):
        if i % 3 == 0:
            yield {"prompt": q}
        elif i % 3 == 1:
            yield {"messages": [_m("system", SYSTEM), _m("user", q)]}
        else:
            yield {"messages": [_m("user", q), _m("assistant", "old")]}


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _messages(row) -> list[dict]:
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}]
    return [m for m in row["messages"] if m["role"] != "assistant"]


def chatml(messages) -> str:
    """SmolLM2's template written out by hand (its default system message included)."""
    if messages[0]["role"] != "system":
        default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        messages = [{"role": "system", "content": default}, *messages]
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files: two packing domains, four prompts each."""
    d = tmp_path_factory.mktemp("prompts")
    rows = list(_rows(QUESTIONS))
    for name, part in (("a.jsonl", rows[:4]), ("b.jsonl", rows[4:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    assert smollm2_engine.k >= K and smollm2_engine.generating
    return smollm2_engine


def _cfg(teacher, corpus, out, workers=None, **gen):
    return build(
        BuildConfig,
        {
            "teacher": {"path": str(teacher)},
            "corpus": {"paths": [str(corpus)], "seq_len": L, "chat_packing": "one_per_row"},
            "encoder": {"mode": "topk", "k": K},
            "writer": {"out": str(out), "shard_sequences": 2, **(workers or {})},
            "generate": {"enabled": True, "n": N, "max_new_tokens": NEW, "temperature": 0.8,
                         "top_p": 0.95, **gen},
            "seed": 3,
            "progress": False,
        },
    )  # fmt: skip


def _args(teacher, corpus, out):
    return ["build-cache", "--teacher", teacher, "--corpus", corpus, "--out", out, "--k", K,
            "--seq-len", L, "--shard-sequences", 2, "--generate", "--answers", N,
            "--max-new-tokens", NEW, "--seed", 3, "--set", "generate.temperature=0.8",
            "--set", "generate.top_p=0.95", "--set", "corpus.chat_packing=one_per_row",
            "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def generated(tmp_path_factory, smollm2_dir, corpus, engine):
    out = tmp_path_factory.mktemp("gen") / "cache"
    run(_cfg(smollm2_dir, corpus, out), engine=engine)
    return out


def _answers(seq, pad_id):
    """(prompt ids, answer ids) of the one conversation in a one-per-row row."""
    tokens = np.append(seq.input_ids, seq.next_token)
    learnt = np.append(False, seq.loss_mask)  # token t is learnt when position t - 1 is
    first = int(np.argmax(learnt))
    last = len(learnt) - int(np.argmax(learnt[::-1]))
    assert learnt[first:last].all(), "one answer: one run of learnt tokens"
    assert (tokens[last:] == pad_id).all()
    return tokens[:first], tokens[first:last]


def test_each_prompt_gets_n_answers_learnt_on_the_answer_only(generated, tok):
    rows = list(_rows(QUESTIONS))
    seqs = list(open_cache(generated))
    assert len(seqs) == N * len(rows) and len({s.seq_id for s in seqs}) == len(seqs)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    cut = []
    for i, seq in enumerate(seqs):  # rows in prompt order, its N answers one after another
        prompt, answer = _answers(seq, pad)
        messages = _messages(rows[i // N])
        assert tok.decode(prompt) == chatml(messages)  # the prompt, never learnt
        assert 1 <= len(answer) <= NEW
        if answer[-1] == eot:  # a finished answer: the template renders it the same way
            content = tok.decode(answer[:-1])
            whole = tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": content}], tokenize=False
            )
            assert whole.startswith(tok.decode(np.concatenate([prompt, answer])))
        else:
            cut.append(seq.seq_id)
            assert len(answer) == NEW
    # each row's text column is its prompt and answer, decoded (a user reads what was
    # distilled without a tokenizer)
    texts = pq.read_table(sorted(shard_files(generated)), columns=["seq_id", "text"]).to_pydict()
    by_id = dict(zip(texts["seq_id"], texts["text"]))
    for seq in seqs:
        prompt, answer = _answers(seq, pad)
        assert by_id[seq.seq_id] == tok.decode(np.concatenate([prompt, answer]))
    stats = cache_stats(open_cache(generated))
    g = stats["generate"]
    assert g["prompts"] == len(rows) and g["answers"] == N * len(rows) and g["cut"] == len(cut)
    assert open_cache(generated).cut_seq_ids().tolist() == cut == sorted(cut)  # flagged rows
    assert g["cut_rows"] == len(cut)
    assert g["answers_per_prompt"] == N and g["settings"]["temperature"] == 0.8
    # the teacher's mean log-prob of its answers is the cache's own token log-probs'
    assert g["mean_answer_logprob"] == pytest.approx(-stats["teacher_nll"], abs=1e-3)
    # the N answers of a prompt are sampled with their own seeds
    assert any(
        not np.array_equal(seqs[i].input_ids, seqs[i + 1].input_ids) for i in range(0, len(seqs), N)
    )


def test_targets_captured_while_generating_equal_a_forward_over_the_answers(generated, smollm2_dir):
    """The stored top-K are the raw distribution (before temperature and top-p) of each
    answer token's step: a transformers forward over the stored ids gives the same."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for seq in open_cache(generated):
        with torch.no_grad():
            logp = torch.log_softmax(
                model(torch.from_numpy(seq.input_ids[None]).long()).logits[0], -1
            )
        off, ids, probs = seq.targets()
        learnt = np.flatnonzero(seq.loss_mask)
        assert (np.diff(off)[learnt] == K).all() and (np.diff(off)[~seq.loss_mask] == 0).all()
        for p in learnt:
            sel = ids[off[p] : off[p + 1]]
            ref = logp[p, torch.from_numpy(sel).long()].numpy()
            np.testing.assert_allclose(np.log(probs[off[p] : off[p + 1]]), ref, atol=3e-3)
            # the K ids are the teacher's K most likely there
            assert set(sel.tolist()) == set(logp[p].topk(K).indices.tolist()) or np.isclose(
                np.sort(ref)[0], logp[p].topk(K + 1).values[-1].item(), atol=1e-4
            )
        np.testing.assert_allclose(
            seq.token_logprobs[seq.loss_mask],
            logp[learnt, torch.from_numpy(seq.labels[learnt]).long()].numpy(),
            atol=3e-3,
        )


def test_two_workers_and_a_kill_9_give_the_same_bytes(
    generated, smollm2_dir, corpus, engine, tmp_path
):
    two = tmp_path / "two"
    for w in range(2):  # W = 2, each generating only its own prompts
        run(_cfg(smollm2_dir, corpus, two, {"num_workers": 2, "worker_index": w}), engine=engine)
    assert digests(two) == digests(generated)
    killed = tmp_path / "killed"
    args = _args(smollm2_dir, corpus, killed)
    done = kill_build_after(killed, 1, *args[1:])
    assert 1 <= done < len(shard_files(generated))
    run(_cfg(smollm2_dir, corpus, killed), engine=engine)  # the same settings as `args`
    assert digests(killed) == digests(generated)


def test_train_and_inspect_work_unchanged_on_a_generated_cache(generated, tiny_student, tmp_path):
    out = tmp_path / "student"
    proc = run_cli("train-student", "--student", tiny_student, "--cache", generated, "--out", out,
                   "--steps", 2, "--batch-size", 2, "--quiet", check=True)  # fmt: skip
    assert proc.returncode == 0 and (out / "final" / "config.json").exists()
    text = run_cli("inspect", generated, check=True).stdout
    assert "generated by the teacher: 16 answers to 8 prompts" in text


@pytest.mark.parametrize(
    "change, why",
    [
        ({"teacher": {"engine": "hf"}}, "--generate needs --engine vllm"),
        ({"encoder": {"mode": "sample"}, "generate": {"capture": "during"}}, "cannot be captured"),
        ({"encoder": {"path": "hidden"}, "generate": {"capture": "during"}}, "--path hidden"),
        ({"corpus": {"max_sequences": 4}}, "--generate with --max-sequences"),
        ({"corpus": {"kind": "text"}}, "--generate reads prompts"),
        ({"corpus": {"learn": "all"}, "generate": {"capture": "during"}}, "corpus.learn=all"),
        ({"generate": {"temperature": float("inf")}}, "generate.temperature must be a finite"),
        ({"generate": {"top_p": 0.0}}, "generate.top_p must be in (0, 1]"),
        ({"generate": {"n": 0}}, "generate.n (--answers) must be >= 1"),
        ({"generate": {"enabled": False, "n": 3}}, "generate.n applies with --generate only"),
    ],
)
def test_settings_that_make_no_sense_are_refused(change, why, tmp_path):
    base = {
        "teacher": {"path": "t"},
        "corpus": {},
        "encoder": {},
        "writer": {"out": str(tmp_path)},
        "generate": {"enabled": True},
    }
    for k, v in change.items():
        base[k] = {**base[k], **v}
    with pytest.raises(ConfigError, match=re.escape(why)):
        build(BuildConfig, base)


def test_sample_mode_takes_the_second_pass_and_text_rows_are_not_prompts(
    smollm2_dir, corpus, tmp_path
):
    cfg = build(
        BuildConfig,
        {"teacher": {"path": str(smollm2_dir)}, "encoder": {"mode": "sample"},
         "writer": {"out": str(tmp_path / "s")}, "generate": {"enabled": True}},
    )  # fmt: skip
    assert cfg.generate.resolved_capture(cfg.encoder.mode, cfg.corpus.learn) == "second_pass"
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "a plain document"}) + "\n")
    proc = run_cli("build-cache", "--teacher", smollm2_dir, "--corpus", text, "--out",
                   tmp_path / "t", "--generate", "--quiet")  # fmt: skip
    assert proc.returncode != 0
    assert "no prompt" in error_line(proc) and error_line(proc).startswith("sparsekd: error:")


def test_an_answer_does_not_depend_on_the_batch_it_was_generated_in(engine):
    """64 prompts of 80 tokens: more than the engine's 4,096-token step budget, so on CPU
    they need whole (unchunked) prefills (a seeded request's chunked prefill fails there);
    an answer generated in that batch equals the same prompt's answer generated alone."""
    from sparsekd.cache_builder.generate import GenerateConfig, answer_seed

    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40_000, size=80).astype(np.int32) for _ in range(64)]
    seeds = [answer_seed(0, 0, i, 0) for i in range(64)]
    gen = GenerateConfig(enabled=True, max_new_tokens=4)
    many = engine.generate(prompts, seeds, [4] * 64, gen, k=K, targets=True)
    alone = engine.generate(prompts[5:6], seeds[5:6], [4], gen, k=K, targets=True)
    assert many[5].token_ids.tolist() == alone[0].token_ids.tolist()
    np.testing.assert_allclose(many[5].targets[1], alone[0].targets[1], atol=1e-4)
    assert len({tuple(o.token_ids.tolist()) for o in many}) > 1
