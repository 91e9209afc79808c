"""Chat data on the real SmolLM2-Instruct teacher and its own chat template: conversations,
ShareGPT and prompt/completion rows rendered, masked and packed; the learnt positions are
exactly the assistant's content and its end-of-turn token, checked against an independent
rendering (ChatML written out by hand here); targets stored only there, through vLLM;
templates whose spans cannot be derived are refused; long conversations split or dropped
as documented; rows never start inside a conversation; W in {1, 3} and kill -9 exact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.cache_builder.chat import ChatRenderer, parse_row
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.config import build
from sparsekd.errors import CorpusError
from sparsekd.inspection import cache_stats, verify_cache
from tests.helpers import digests, error_line, kill_build_after, run_cli, shard_files

L = 96
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    {"messages": [
        {"role": "user", "content": "What is a tuple?"},
        {"role": "assistant", "content": "An immutable sequence of values."},
    ]},
    {"messages": [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Name a sorting algorithm."},
        {"role": "assistant", "content": "Merge sort."},
        {"role": "user", "content": "Is it stable?"},
        {"role": "assistant", "content": "Yes, merge sort is stable."},
    ]},
    {"conversations": [  # ShareGPT
        {"from": "human", "value": "Say hi."},
        {"from": "gpt", "value": "Hi there!"},
    ]},
    {"prompt": "The capital of France is", "completion": " Paris."},  # plain text
    {"prompt": [{"role": "user", "content": "Two plus two?"}],
     "completion": [{"role": "assistant", "content": "Four."}]},
    {"messages": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."},
    ]},
]  # fmt: skip


def chatml(row: dict, tok) -> tuple[list[int], list[bool]]:
    """SmolLM2's template written out by hand: the tokens of a row and which are learnt
    (an assistant's content and its <|im_end|>; for a plain prompt/completion the
    completion and EOS)."""
    if isinstance(row.get("prompt"), str):
        p = tok(row["prompt"], add_special_tokens=False).input_ids
        c = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        return p + c, [False] * len(p) + [True] * len(c)
    if "conversations" in row:
        names = {"human": "user", "gpt": "assistant"}
        msgs = [{"role": names[m["from"]], "content": m["value"]} for m in row["conversations"]]
        prompt_len = 0
    elif "prompt" in row:
        msgs, prompt_len = row["prompt"] + row["completion"], len(row["prompt"])
    else:
        msgs, prompt_len = row["messages"], 0
    segments = []
    if msgs[0]["role"] != "system":
        segments.append((f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False))
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            learn = i >= prompt_len
            segments += [("<|im_start|>assistant\n", False), (m["content"], learn)]
            segments += [("<|im_end|>", learn), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    ids, learnt = [], []
    for text, learn in segments:
        t = tok(text, add_special_tokens=False).input_ids
        ids += t
        learnt += [learn] * len(t)
    return ids, learnt


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    return d / "chat.jsonl"


def _cfg(teacher, corpus, out, writer=None, **corpus_settings):
    return build(
        BuildConfig,
        {
            "teacher": {"path": str(teacher), "engine": "hf"},
            "corpus": {"paths": [str(corpus)], "seq_len": L, **corpus_settings},
            "encoder": {"mode": "topk", "k": 4},
            "writer": {"out": str(out), "shard_sequences": 4, **(writer or {})},
            "progress": False,
        },
    )


def _args(teacher, corpus, out, *extra):
    return ["--teacher", teacher, "--corpus", corpus, "--out", out, "--engine", "hf",
            "--k", "4", "--seq-len", L, "--shard-sequences", 4, "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def vllm_chat_cache(tmp_path_factory, smollm2_dir, chat_corpus):
    """One conversation per row, through the real vLLM engine."""
    out = tmp_path_factory.mktemp("vchat") / "cache"
    run_cli(
        "build-cache", "--teacher", smollm2_dir, "--corpus", chat_corpus, "--out", out,
        "--seq-len", L, "--k", 4, "--set", "corpus.chat_packing=one_per_row", "--quiet",
        check=True,
    )  # fmt: skip
    return out


def test_learnt_positions_are_the_assistants_content_and_end_of_turn(vllm_chat_cache, tok):
    cache = open_cache(vllm_chat_cache)
    seqs = list(cache)
    assert len(seqs) == len(CONVERSATIONS) and verify_cache(vllm_chat_cache) == []
    for seq, row in zip(seqs, CONVERSATIONS):
        ids, learnt = chatml(row, tok)
        n = len(ids)
        tokens = np.append(seq.input_ids, seq.next_token)
        assert tokens[:n].tolist() == ids, row  # the rendering, token for token
        assert set(tokens[n:].tolist()) <= {tok.pad_token_id}  # then padding
        # position p is learnt when token p + 1 is; padding never is
        want = np.zeros(L, bool)
        want[: n - 1] = learnt[1:]
        np.testing.assert_array_equal(seq.loss_mask, want)
        # targets and token log-probs only where the student learns
        assert np.all(seq.support_size[want] == 4) and np.all(seq.support_size[~want] == 0)
        assert np.all(np.isfinite(seq.token_logprobs[want]))
        assert np.all(np.isnan(seq.token_logprobs[~want]))
    # the prompt/completion rows learn their completion only
    plain, messages = seqs[3], seqs[4]
    assert tok.decode(plain.labels[plain.loss_mask]) == " Paris.<|im_end|>"
    assert tok.decode(messages.labels[messages.loss_mask]) == "Four.<|im_end|>"
    stats = cache_stats(cache)
    assert stats["learnt_positions"] == int(sum(s.loss_mask.sum() for s in seqs))
    assert stats["chat"]["conversations"] == len(CONVERSATIONS)
    assert 0 < stats["bytes_per_learnt_token"] and stats["learnt_fraction"] < 0.5


def test_vllm_targets_equal_the_hf_engines_at_the_learnt_positions(
    vllm_chat_cache, smollm2_dir, chat_corpus, tmp_path
):
    out = tmp_path / "hf"
    run(_cfg(smollm2_dir, chat_corpus, out, chat_packing="one_per_row"))
    for a, b in zip(open_cache(vllm_chat_cache), open_cache(out)):
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        m = a.loss_mask
        np.testing.assert_allclose(a.token_logprobs[m], b.token_logprobs[m], atol=2e-3)


def test_best_fit_rows_hold_whole_conversations(tmp_path, tiny_llama_dir, chat_corpus, tok):
    out = tmp_path / "c"
    run(_cfg(tiny_llama_dir, chat_corpus, out))
    rendered = [chatml(r, tok)[0] for r in CONVERSATIONS]
    seen = []
    for seq in open_cache(out):
        tokens = np.append(seq.input_ids, seq.next_token).tolist()
        at = 0
        while at < len(tokens) and tokens[at] != tok.pad_token_id:
            match = [i for i, r in enumerate(rendered) if tokens[at : at + len(r)] == r]
            assert match, f"a row continues inside a conversation at {at}"
            seen.append(match[0])
            at += len(rendered[match[0]])
        assert set(tokens[at:]) <= {tok.pad_token_id}
    assert sorted(seen) == list(range(len(CONVERSATIONS)))
    one = tmp_path / "one"
    run(_cfg(tiny_llama_dir, chat_corpus, one, chat_packing="one_per_row"))
    a, b = cache_stats(open_cache(out)), cache_stats(open_cache(one))
    assert a["sequences"] < b["sequences"] == len(CONVERSATIONS)
    assert a["chat"]["padding_fraction"] < b["chat"]["padding_fraction"]


def test_a_conversation_longer_than_a_row_is_split_between_turns_or_dropped(
    tmp_path, tiny_llama_dir, tok
):
    turns = []
    for i in range(6):
        answer = f"Item {i} is " + "fine and " * 6 + "done."
        turns += [
            {"role": "user", "content": f"Question {i}: tell me about item {i}."},
            {"role": "assistant", "content": answer},
        ]
    corpus = tmp_path / "long.jsonl"
    corpus.write_text(json.dumps({"messages": turns}) + "\n")
    out = tmp_path / "split"
    run(_cfg(tiny_llama_dir, corpus, out))
    seqs = list(open_cache(out))
    assert len(seqs) >= 2
    im_start, user = tok.convert_tokens_to_ids("<|im_start|>"), tok("user").input_ids
    for s in seqs:  # every row starts a conversation or a user turn: never inside a turn
        assert s.input_ids[0] == im_start
        assert s.input_ids[1 : 1 + len(user)].tolist() in (user, tok("system").input_ids)
    stats = cache_stats(open_cache(out))["chat"]
    assert stats["split"] == 1 and stats["dropped"] == 0
    learnt = "".join(tok.decode(s.labels[s.loss_mask]) for s in seqs)
    for i in range(6):  # every answer kept, whole
        assert f"Item {i} is " + "fine and " * 6 + "done.<|im_end|>" in learnt
    with pytest.raises(CorpusError, match="yields no sequence"):  # nothing left to pack
        run(_cfg(tiny_llama_dir, corpus, tmp_path / "drop", long_conversations="drop"))
    # dropped and counted: with one short conversation beside it, the cache holds that one
    with corpus.open("a") as fh:
        fh.write(json.dumps(CONVERSATIONS[0]) + "\n")
    out = tmp_path / "drop2"
    run(_cfg(tiny_llama_dir, corpus, out, long_conversations="drop"))
    stats = cache_stats(open_cache(out))["chat"]
    assert stats["dropped"] == 1 and stats["conversations"] == 2 and stats["rows"] == 1


@pytest.mark.parametrize(
    "template, why",
    [
        (  # no generation prompt: the assistant's header cannot be told from its content
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}",
            "no generation prompt",
        ),
        (  # the content is changed on the way
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}",
            "alters the content",
        ),
        (  # earlier turns rendered differently once the conversation goes on
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if loop.last %}<|im_end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "renders differently once the conversation goes on",
        ),
    ],
)
def test_a_template_whose_spans_cannot_be_derived_is_refused(tok, template, why):
    r = ChatRenderer(tok, template, "template.jinja")
    conv = parse_row(CONVERSATIONS[1], "messages")
    with pytest.raises(CorpusError, match=f"chat template of template.jinja: .*{why}"):
        r.render(conv, lambda: "chat.jsonl:2")


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('content') %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }})</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "3 degrees"},
        {"role": "assistant", "content": "It is 3 degrees."},
    ]
}  # fmt: skip


def test_tool_calls_are_learnt_where_the_template_renders_them(tok, tmp_path):
    conv = parse_row(TOOL_ROW, "messages")
    smollm2 = ChatRenderer(tok, tok.chat_template, "teacher")
    with pytest.raises(CorpusError, match=r"cannot render this conversation \(TypeError"):
        smollm2.render(conv, lambda: "x:1")  # its template cannot take content None
    calls = parse_row(
        {"messages": [{**m, "content": m["content"] or ""} for m in TOOL_ROW["messages"]]},
        "messages",
    )
    with pytest.raises(CorpusError, match=r"does not render the tool calls of message 1 \(x:1\)"):
        smollm2.render(calls, lambda: "x:1")
    r = ChatRenderer(tok, TOOL_TEMPLATE, "tools.jinja").render(conv, lambda: "x:1")
    learnt = tok.decode(r.ids[r.learnt])
    assert learnt == '<tool_call>get_weather({"city": "Oslo"})</tool_call><|im_end|>' + (
        "It is 3 degrees.<|im_end|>"
    )
    assert "3 degrees<|im_end|>" not in tok.decode(r.ids[r.learnt][:12])  # the tool's reply


GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_marking_its_assistant_spans_is_taken_at_its_word(tok):
    marked = ChatRenderer(tok, GENERATION_TEMPLATE, "generation.jinja")
    assert marked.marked
    for row in (CONVERSATIONS[1], CONVERSATIONS[4]):
        conv = parse_row(row, "messages")
        a = marked.render(conv, lambda: "x:1")
        plain = GENERATION_TEMPLATE.replace("{% generation %}", "").replace(
            "{% endgeneration %}", ""
        )
        b = ChatRenderer(tok, plain, "plain.jinja").render(conv, lambda: "x:1")
        assert a.ids.tolist() == b.ids.tolist() and a.learnt.tolist() == b.learnt.tolist()
        assert tok.decode(a.ids[a.learnt]).endswith("<|im_end|>")


def test_conversation_formats_and_bad_rows(tmp_path, tiny_llama_dir, chat_corpus, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    ref = tmp_path / "ref"
    run(_cfg(tiny_llama_dir, chat_corpus, ref, chat_packing="one_per_row"))
    want = [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in open_cache(ref)]
    rows = [r for r in CONVERSATIONS if "messages" in r]
    d = tmp_path / "formats"
    d.mkdir()
    (d / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    )
    pq.write_table(pa.Table.from_pylist(rows), d / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    idx = [i for i, r in enumerate(CONVERSATIONS) if "messages" in r]
    for src in (d / "c.jsonl.zst", d / "c.parquet", tmp_path / "saved"):
        out = tmp_path / f"from-{src.name}"
        run(_cfg(tiny_llama_dir, src, out, chat_packing="one_per_row"))
        got = [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in open_cache(out)]
        assert got == [want[i] for i in idx], src
    bad = tmp_path / "bad.jsonl"
    lines = [
        CONVERSATIONS[0],
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        CONVERSATIONS[2],
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = run_cli("build-cache", *_args(tiny_llama_dir, bad, tmp_path / "bad"))
    assert proc.returncode == 2
    assert error_line(proc) == (
        f"sparsekd: error: {bad}:2: not a conversation: message 0: role 'wizard' is not one "
        "of system, user, assistant, tool (use --skip-bad-lines to skip such lines)"
    )
    proc = run_cli(
        "build-cache", *_args(tiny_llama_dir, bad, tmp_path / "bad2", "--skip-bad-lines")
    )
    assert proc.returncode == 0 and "skipped 2 bad lines" in proc.stdout, proc.stderr[-2000:]


def test_a_teacher_without_a_template_takes_string_prompt_completion_rows_only(
    tmp_path, tiny_llama_dir, tok
):
    """docs/chat.md: string prompt/completion rows are plain text and use no template; rows
    of messages need one, and are refused by name (with the row) when there is none."""
    teacher = tmp_path / "plain-teacher"
    shutil.copytree(tiny_llama_dir, teacher)
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((teacher / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(teacher).chat_template is None
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" It is {2 * i}."}
            for i in range(12)]  # fmt: skip
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plain-cache"
    run_cli("build-cache", *_args(teacher, plain, out), check=True)
    seqs = list(open_cache(out))
    assert seqs and all(s.loss_mask.any() for s in seqs)
    text = tok.decode(np.append(seqs[0].input_ids, seqs[0].next_token))
    assert text.startswith("Question 0: what is 0 + 0? It is 0.")  # no template around it
    mixed = tmp_path / "mixed.jsonl"
    lines = [rows[0], {"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]}]  # fmt: skip
    mixed.write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = run_cli("build-cache", *_args(teacher, mixed, tmp_path / "mixed-cache"))
    line = error_line(proc)
    assert proc.returncode == 2 and f"{mixed}:2" in line, proc.stderr[-1500:]
    assert "has no chat template: pass --set corpus.chat_template=FILE.jinja" in line


@pytest.mark.parametrize("policy", ["split", "drop"])
def test_a_corpus_whose_every_conversation_or_prompt_is_too_long_names_the_cause(
    tmp_path, tiny_llama_dir, policy
):
    """Thousands of tokens, no row: the message says what was dropped and which setting or
    flag changes it, not that the domain is short."""
    long = " ".join(f"word{i}" for i in range(400))
    convs = tmp_path / "long.jsonl"
    convs.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": long}, {"role": "assistant", "content": long},
    ]}) + "\n" for _ in range(3)))  # fmt: skip
    proc = run_cli("build-cache", *_args(tiny_llama_dir, convs, tmp_path / policy, "--set",
                                         f"corpus.long_conversations={policy}"))  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2 and "every conversation, " in line and "dropped in all" in line
    assert "raise --seq-len" in line and "fewer than" not in line
    assert ("set corpus.long_conversations=split" in line) == (policy == "drop"), line
    if policy == "drop":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": long}) + "\n")
        args = [a for a in _args(tiny_llama_dir, prompts, tmp_path / "gen") if a != "hf"]
        args[args.index("--engine")] = "--generate"  # vLLM's, never started: nothing to answer
        proc = run_cli("build-cache", *args)
        line = error_line(proc)
        assert proc.returncode == 2 and "every prompt of --generate, 1 in all" in line, line
        assert "too_long" in line and "raise --seq-len" in line


@pytest.mark.parametrize("fmt", ["datasets", "jsonl"])
def test_a_conversation_column_of_another_name_is_named_with_the_setting_that_takes_it(
    tmp_path, tiny_llama_dir, fmt
):
    """A `dialog` column: the refusal lists the columns found and the setting for each kind;
    following the wrong one (--text-field dialog) says the column holds conversations and
    names corpus.messages_field; that setting builds the cache."""
    import datasets

    rows = [{"dialog": r["messages"], "id": i} for i, r in enumerate(CONVERSATIONS)
            if "messages" in r]  # fmt: skip
    src = tmp_path / "src"
    if fmt == "datasets":
        datasets.Dataset.from_list(rows).save_to_disk(str(src))
    else:
        src = tmp_path / "dialogs.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("build-cache", *_args(tiny_llama_dir, src, tmp_path / "a"))
    line = error_line(proc)
    assert proc.returncode == 2 and "'dialog'" in line and "'id'" in line, line
    assert "--text-field NAME" in line and "--set corpus.messages_field=NAME" in line
    proc = run_cli("build-cache", *_args(tiny_llama_dir, src, tmp_path / "b"), "--text-field",
                   "dialog")  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "field 'dialog' holds conversations, not text" in line
    assert "--set corpus.messages_field=dialog" in line
    out = tmp_path / "c"
    run_cli("build-cache", *_args(tiny_llama_dir, src, out), "--set",
            "corpus.messages_field=dialog", check=True)  # fmt: skip
    assert len(open_cache(out)) > 0 and all(s.loss_mask.any() for s in open_cache(out))


def test_workers_and_kill_9_give_the_same_chat_cache(tmp_path, tiny_llama_dir):
    from sparsekd.cache_builder.corpus import builtin_conversations

    d = tmp_path / "corpus"
    d.mkdir()
    rows = [r for _, r in builtin_conversations()][:240]
    for i in range(6):  # six files: six domains
        part = rows[i * 40 : (i + 1) * 40]
        (d / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    ref = tmp_path / "ref"
    run(_cfg(tiny_llama_dir, d, ref))
    assert verify_cache(ref) == [] and len(shard_files(ref)) >= 6
    out = tmp_path / "w3"
    for i in range(3):
        run(_cfg(tiny_llama_dir, d, out, writer={"num_workers": 3, "worker_index": i}))
    assert digests(out) == digests(ref)
    out = tmp_path / "killed"
    args = _args(tiny_llama_dir, d, out)
    assert kill_build_after(out, 3, *args) >= 2
    assert not (out / "manifest.json").exists()
    run_cli("build-cache", *args, check=True)
    assert digests(out) == digests(ref)
