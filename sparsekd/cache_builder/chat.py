"""Chat and instruction data: corpus rows -> conversations -> tokens and the loss mask.

Rows (`corpus.kind` auto detects, per domain, from its first row):
- a conversation: `messages` (the field `corpus.messages_field`), a list of
  `{role, content}` with roles system, user, assistant and tool (an assistant message may
  carry `tool_calls`), as TRL's conversational data; or ShareGPT's `conversations`, a list
  of `{from, value}` (human/user -> user, gpt/assistant/model -> assistant, system,
  tool/function/observation -> tool);
- a prompt and a completion (`prompt`, `completion`), each a string or a message list:
  the completion is learnt. Two strings are plain text (prompt, completion, EOS: TRL's
  "standard" format, no template); message lists are rendered with the template.

Rendering. A conversation is rendered with the teacher tokenizer's chat template (or
`corpus.chat_template`, a Jinja file) and tokenised once, with character offsets. Every
token gets a flag: is it learnt? With `corpus.learn = assistant` (the default) the learnt
tokens are each learnable assistant message's own output: what the template writes for it
after its generation prompt, through the end-of-turn token that closes it (the last
special token it writes: `<|im_end|>`, `<|eot_id|>`, `</s>`, ...); the system, user and tool
turns, the template's headers and what follows the end-of-turn token (a newline) are not.
A template that marks assistant spans with `{% generation %}` is taken at its word
(transformers' assistant mask). For one that does not, the spans are derived by rendering
prefixes: for assistant message i, P = render(messages[:i], add_generation_prompt=True)
and Q = render(messages[:i+1]) must satisfy whole.startswith(Q) and Q.startswith(P); its
output is Q[len(P):] up to its last special token, and must contain the message's content
(and each tool call's name). Where any of this fails the mask cannot be derived reliably,
and the conversation is refused with one line naming the template; no mask is guessed.

Turn boundaries (token indices where a user message begins) are kept, so that packing can
cut a conversation longer than a row between turns (packing.pack_chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsekd.errors import CorpusError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
    "function_call": "assistant",
}
KINDS = ("auto", "text", "chat")
LEARN = ("assistant", "all")


@dataclass
class Conversation:
    """One chat row, checked: messages, the first that may be learnt, or a plain string
    prompt and completion."""

    messages: list[dict] = field(default_factory=list)
    learn_from: int = 0  # a prompt/completion row: messages of the prompt are never learnt
    plain: tuple[str, str] | None = None  # a string prompt and completion: no template


@dataclass
class Rendered:
    ids: np.ndarray  # int32 [T]
    learnt: np.ndarray  # bool [T]: the student learns this token
    turns: list[int]  # token indices where a user turn begins (0 always): where to cut
    targets: tuple | None = None  # a generated answer's targets at its learnt tokens
    cut: bool = False  # a generated answer cut at max_new_tokens


def _content(msg, where: str) -> str | None:
    c = msg.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        return "".join(str(p.get("text", "")) for p in c)  # text parts only
    raise ValueError(f"{where}: content is not a string")


def _message(m, i: int) -> dict:
    """A {role, content} message, from either layout."""
    where = f"message {i}"
    if not isinstance(m, dict):
        raise ValueError(f"{where} is not an object")
    if "from" in m and "role" not in m:  # ShareGPT
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise ValueError(f"{where}: unknown ShareGPT sender {m['from']!r}")
        value = m.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}: 'value' is not a string")
        return {"role": role, "content": value}
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    out = {"role": role, "content": _content(m, where)}
    if m.get("tool_calls"):
        if role != "assistant" or not isinstance(m["tool_calls"], list):
            raise ValueError(f"{where}: tool_calls belong to an assistant message, as a list")
        out["tool_calls"] = m["tool_calls"]
    elif out["content"] is None:
        raise ValueError(f"{where}: no content")
    for key in ("name", "tool_call_id"):
        if key in m:
            out[key] = m[key]
    return out


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} is not a non-empty list of messages")
    return [_message(m, i) for i, m in enumerate(value)]


def parse_row(obj, messages_field: str) -> Conversation | None:
    """A row as a conversation, None when it holds none of the chat fields (a text row).
    Raises ValueError (the reason) for a row that has them but does not fit."""
    if not isinstance(obj, dict):
        return None
    for name in (messages_field, "conversations"):
        if name in obj:
            msgs = _messages(obj[name], f"field {name!r}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"field {name!r} has no assistant message")
            return Conversation(msgs)
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if isinstance(p, str) and isinstance(c, str):
            return Conversation(plain=(p, c))
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if isinstance(c, str):
            c = [{"role": "assistant", "content": c}]
        prompt, completion = _messages(p, "prompt"), _messages(c, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise ValueError("the completion has no assistant message")
        return Conversation(prompt + completion, learn_from=len(prompt))
    return None


class ChatRenderer:
    """Conversations -> Rendered, with one tokenizer and one template (module docstring)."""

    def __init__(self, tokenizer, template: str | None, name: str, learn: str = "assistant"):
        """`template` None: the tokenizer has none, which only string prompt/completion rows
        (plain text) can do without; the first conversation of messages is refused."""
        if not getattr(tokenizer, "is_fast", False):
            raise CorpusError(f"conversations need a fast tokenizer (character offsets); {name}")
        self.tok, self.template, self.name, self.learn = tokenizer, template, name, learn
        marks = ("{% generation %}", "{%- generation %}")
        self.marked = template is not None and any(m in template for m in marks)
        added = tokenizer.added_tokens_decoder.values()
        self.specials = sorted({t.content for t in added if t.special}, key=len, reverse=True)
        self.eos = int(tokenizer.eos_token_id)

    def _text(self, messages, generation_prompt: bool = False, where=None) -> str:
        if self.template is None:
            at = f" ({where()})" if where else ""
            raise CorpusError(
                f"the corpus holds conversations of messages{at}, and "
                f"{self.name} has no chat template: pass --set corpus.chat_template=FILE.jinja "
                "(rows whose prompt and completion are strings need none)"
            )
        try:
            return self.tok.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as e:  # the template's own failure on this conversation
            why = f"it cannot render this conversation ({type(e).__name__}: {str(e)[:80]})"
            self._refuse(why, where or (lambda: "a conversation"))

    def _refuse(self, why: str, where):
        raise CorpusError(
            f"chat template of {self.name}: {why} ({where()}); the loss mask cannot be "
            "derived reliably, so the conversation is refused"
        )

    def render(self, conv: Conversation, where) -> Rendered:
        """`where()`: the row's place, for a refusal."""
        if conv.plain is not None:
            p, c = (self.tok(x, add_special_tokens=False)["input_ids"] for x in conv.plain)
            ids = np.asarray([*p, *c, self.eos], dtype=np.int32)
            learnt = np.arange(len(ids)) >= len(p)
            return Rendered(ids, learnt if self.learn == "assistant" else np.ones_like(learnt), [0])
        msgs = conv.messages
        whole = self._text(msgs, where=where)
        enc = self.tok(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts = self._starts(msgs, whole)  # char offset where each message begins (or None)
        if self.learn == "all":
            learnt = np.ones(len(ids), dtype=bool)
        elif self.marked:
            learnt = self._marked(msgs, ids, offsets, starts, conv.learn_from, where)
        else:
            learnable = [
                i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= conv.learn_from
            ]
            spans = [self._span(msgs, i, whole, where) for i in learnable]
            learnt = np.zeros(len(ids), dtype=bool)
            for a, b in spans:  # a token is learnt when it overlaps a learnt character range
                learnt |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        turns = [0]
        if starts is not None:
            for i, m in enumerate(msgs):
                if m["role"] == "user" and i > 0 and starts[i] is not None:
                    turns.append(int(np.searchsorted(offsets[:, 0], starts[i], side="left")))
        return Rendered(ids, learnt, sorted(set(turns)))

    def _starts(self, msgs, whole: str) -> list[int] | None:
        """Where each message begins in the rendering, when every prefix of the
        conversation renders as a prefix of the whole (else None: no turn boundaries)."""
        out = []
        for i in range(len(msgs)):
            head = self._text(msgs[:i]) if i else ""
            if not whole.startswith(head):
                return None
            out.append(len(head))
        return out

    def _span(self, msgs, i: int, whole: str, where: str) -> tuple[int, int]:
        """The characters of assistant message i's own output (module docstring)."""
        before = self._text(msgs[:i]) if i else ""
        prompt = self._text(msgs[:i], generation_prompt=True)
        upto = self._text(msgs[: i + 1])
        if prompt == before:
            why = "it has no generation prompt (the assistant's header cannot be told apart)"
            self._refuse(why, where)
        if not (whole.startswith(upto) and upto.startswith(prompt)):
            self._refuse(f"message {i} renders differently once the conversation goes on", where)
        out = upto[len(prompt) :]
        end = max((out.rfind(s) + len(s) for s in self.specials if s in out), default=-1)
        if end < 0:
            self._refuse(f"no end-of-turn token closes assistant message {i}", where)
        content = (msgs[i].get("content") or "").strip()
        if content and content not in out:
            self._refuse(f"it alters the content of assistant message {i}", where)
        for call in msgs[i].get("tool_calls") or []:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if not name or name not in out:
                self._refuse(f"it does not render the tool calls of message {i}", where)
        return len(prompt), len(prompt) + end

    def _marked(self, msgs, ids, offsets, starts, learn_from: int, where: str) -> np.ndarray:
        """A template with {% generation %}: transformers' assistant mask, from the first
        learnable message on."""
        out = self.tok.apply_chat_template(
            msgs,
            chat_template=self.template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        if list(out["input_ids"]) != ids.tolist():
            self._refuse("its tokens differ from the rendered text's", where)
        learnt = np.asarray(out["assistant_masks"], dtype=bool)
        if learn_from:
            if starts is None:
                self._refuse("the prompt's end cannot be found in the rendering", where)
            learnt &= offsets[:, 0] >= starts[learn_from]
        return learnt


def load_template(path: str | None, tokenizer) -> str | None:
    """The chat template: a file's content, else the tokenizer's own (None: none)."""
    if path is None:
        return getattr(tokenizer, "chat_template", None)
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as e:
        raise CorpusError(f"chat template file {path}: cannot read ({e.strerror})") from e
