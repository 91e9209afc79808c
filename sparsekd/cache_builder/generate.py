"""`build-cache --generate`: the teacher writes the answers (sequence-level KD), and the
sparse target of every answer token is captured while it generates.

Each corpus row is a prompt (`prompt_of`): a conversation (its trailing assistant messages
are dropped: the teacher answers the last user turn again), or a `prompt` field (a string
or a message list; a `completion` beside it is ignored). The prompt is rendered with the
chat template and its generation prompt; vLLM samples `generate.n` answers per prompt
with the user's settings (temperature, top-p, max new tokens, stop strings), each answer
with its own seed drawn from (--seed, domain, row, answer), so an answer does not depend on
which worker generates it or what else is in the engine's batch.

The stored row is prompt + answer as token ids: the answer exactly as generated, through
the end-of-turn token that ended it (or through the token that completed a stop string, or
cut at `max_new_tokens`: counted and flagged). The answer is learnt, the prompt is not,
which is the chat mask (`chat.py`) of that conversation: `tests/cache_builder/
test_generate.py` checks it against the template's rendering of the prompt plus the
decoded answer.

Targets. With `generate.capture = during` (the default for `--mode topk` and `logprob`),
the targets come from the generation itself: for answer token j, vLLM's top-K log-probs
and the sampled token's log-prob at the step that drew it, in `raw_logprobs` mode, i.e. the
teacher's own log-softmax *before* the sampling temperature and top-p are applied (the
distribution the student is taught, whatever the answers were sampled with). With
`second_pass`, the unit's rows go through the teacher again, as in any build (the only
route for `--mode sample`: vLLM returns no draws from the full distribution of a generated
token).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from sparsekd.cache_builder.chat import Conversation, Rendered, _messages
from sparsekd.config import check, setting
from sparsekd.schemas import format as F
from sparsekd.schemas.modes import get_mode

CAPTURES = ("auto", "during", "second_pass")
GENERATE_CHUNK = 64  # prompts per engine call: a fixed count, so batches match on any split


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    enabled: bool = setting(
        False,
        "The teacher writes the answers: each corpus row is a prompt, the stored row is the "
        "prompt and the teacher's answer, learnt on the answer only (docs/generate.md).",
        flag="--generate",
    )
    n: int = setting(1, "Answers per prompt (each its own row, its own seq_id).", flag="--answers")
    temperature: float = setting(
        1.0, "Sampling temperature of the answers (0: greedy); the stored targets are not."
    )
    top_p: float = setting(1.0, "Nucleus sampling of the answers (1: off).")
    max_new_tokens: int = setting(
        256,
        "Longest answer, in tokens (and what is left of --seq-len after the prompt).",
        flag=True,
    )
    stop: tuple[str, ...] = setting((), "Strings that end an answer (beside end-of-turn).")
    capture: str = setting(
        "auto",
        "during: targets from the generation's own log-probs (top-K and logprob modes); "
        "second_pass: the teacher reads the generated rows again (any mode); auto: during "
        "where it can.",
        choices=CAPTURES,
    )

    def __post_init__(self):
        check(self.n >= 1, f"generate.n (--answers) must be >= 1, got {self.n}")
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"generate.temperature must be finite and >= 0, got {self.temperature}",
        )
        check(0 < self.top_p <= 1, f"generate.top_p must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "generate.max_new_tokens must be >= 1")
        check(all(isinstance(s, str) and s for s in self.stop), "generate.stop: empty string")

    def resolved_capture(self, mode: str, learn: str) -> str:
        if self.capture != "auto":
            return self.capture
        during = get_mode(mode).from_logprobs is not None and learn == "assistant"
        return "during" if during else "second_pass"

    def identity(self) -> dict:
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
        }


def prompt_of(obj, messages_field: str) -> Conversation | None:
    """A row as a prompt (module docstring); None for a row with no chat field (text).
    Raises ValueError (the reason) for a row that has one but holds no prompt."""
    if not isinstance(obj, dict):
        return None
    for name in (messages_field, "conversations"):
        if name in obj:
            msgs = _messages(obj[name], f"field {name!r}")
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if not msgs or msgs[-1]["role"] != "user":
                raise ValueError(f"field {name!r} does not end with a user turn to answer")
            return Conversation(msgs)
    if "prompt" in obj:
        p = obj["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        return Conversation(_messages(msgs, "prompt"))
    return None


@dataclass
class GenerateStats:
    """What generation did in a domain (recorded with the domain; summed in the manifest)."""

    prompts: int = 0
    answers: int = 0
    answer_tokens: int = 0
    cut: int = 0  # answers that reached max_new_tokens (or the row's end)
    cut_rows: list[int] = field(default_factory=list)  # rows of the domain holding one
    too_long: int = 0  # prompts with no room left for an answer in a row: skipped
    logprob_sum: float = 0.0  # the teacher's log-prob of its own answer tokens, summed


def answer_seed(seed: int, domain: int, row: int, j: int) -> int:
    """The sampling seed of answer j of row `row` of `domain` (63 bits)."""
    h = hashlib.sha256(f"{seed}/{domain}/{row}/{j}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class Generator:
    """Prompts -> answers through a started vLLM engine (engines.VllmEngine.generate)."""

    def __init__(self, plan, engine_fn):
        self.plan = plan
        self.cfg: GenerateConfig = plan.cfg.generate
        self.engine_fn = engine_fn  # the generating engine, started on first use
        self.seconds = 0.0  # in the engine's generate calls
        enc = plan.cfg.encoder
        self.capture = self.cfg.resolved_capture(enc.mode, plan.cfg.corpus.learn)
        self.k = enc.top_k

    def prompt_ids(self, conv: Conversation, where) -> np.ndarray:
        r = self.plan.renderer
        text = r._text(conv.messages, generation_prompt=True, where=where)
        return np.asarray(r.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def answers(self, domain: int, items, stats: GenerateStats):
        """ChatItems (prompts, in domain order) -> chat.Rendered prompt + answer (with the
        answer's targets when captured during generation), n per prompt, in order."""
        chunk, row = [], 0
        for item in items:
            chunk.append((row, item))
            row += 1
            if len(chunk) == GENERATE_CHUNK:
                yield from self._chunk(domain, chunk, stats)
                chunk = []
        if chunk:
            yield from self._chunk(domain, chunk, stats)

    def _chunk(self, domain: int, chunk, stats: GenerateStats):
        room = self.plan.seq_len + 1  # a row holds L + 1 tokens
        prompts, seeds, budgets, owners = [], [], [], []
        for row, item in chunk:
            stats.prompts += 1
            ids = self.prompt_ids(item.conv, item.where)
            budget = min(self.cfg.max_new_tokens, room - len(ids))
            if budget < 1:
                stats.too_long += 1
                continue
            for j in range(self.cfg.n):
                prompts.append(ids)
                seeds.append(answer_seed(self.plan.cfg.seed, domain, row, j))
                budgets.append(budget)
                owners.append(ids)
        if not prompts:
            return
        engine = self.engine_fn()
        t0 = time.perf_counter()
        outs = engine.generate(
            prompts, seeds, budgets, self.cfg, k=self.k, targets=self.capture == "during"
        )
        self.seconds += time.perf_counter() - t0
        for ids, out in zip(owners, outs):
            answer = np.asarray(out.token_ids, dtype=np.int32)
            stats.answers += 1
            stats.answer_tokens += len(answer)
            stats.cut += bool(out.cut)
            # summed as stored (fixed point): the record depends only on what the shards hold,
            # not on the last float bits of a step, which vLLM on a loaded CPU can vary
            q = F.quantize_logprobs(out.token_logprobs).astype(np.int64)
            stats.logprob_sum -= int(q.sum()) / F.LOGPROB_SCALE
            yield Rendered(
                np.concatenate([ids, answer]),
                np.arange(len(ids) + len(answer)) >= len(ids),
                [0],  # never split: it fits a row by construction
                out.targets,
                bool(out.cut),
            )
