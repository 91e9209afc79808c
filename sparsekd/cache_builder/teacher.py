"""The teacher folder: its settings, checks, tokenizer and LM head.

A teacher is any Hugging Face causal-LM folder (config.json, weights, tokenizer). Before any
engine starts, `inspect_teacher` refuses what cannot work: no weights, a vocabulary below
the tokenizer's size, a sequence length above the model's context; `load_lm_head` refuses
heads the hidden-state path cannot reproduce (soft-capping, logit scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsekd.config import check, setting
from sparsekd.errors import TeacherError, unknown_model_type
from sparsekd.schemas.identity import weight_files

ENGINES = ("vllm", "hf")
# Config keys of heads whose logits are not hidden @ W.T + b.
HEAD_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    path: str = setting(doc="Teacher model folder (Hugging Face layout).", flag="--teacher")
    engine: str = setting("vllm", "Teacher engine.", flag=True, choices=ENGINES)
    tensor_parallel_size: int = setting(1, "vLLM tensor parallelism.", flag=True)
    dtype: str = setting(
        "auto",
        "Engine dtype: auto is float32 on CPU, the model's own on GPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    gpu_memory_utilization: float | None = setting(
        None,
        "vLLM's share of GPU memory. Default: 0.9 on the log-prob path; on the hidden-state "
        "path, what the teacher head leaves (docs/gpu.md).",
    )
    max_num_batched_tokens: int | None = setting(None, "vLLM's scheduler token budget.")
    batch_size: int = setting(4, "hf engine: sequences per forward.")

    def __post_init__(self):
        check(self.tensor_parallel_size >= 1, "teacher.tensor_parallel_size must be >= 1")
        check(
            self.engine == "vllm" or self.tensor_parallel_size == 1,
            "teacher.tensor_parallel_size > 1 needs --engine vllm",
        )
        check(self.batch_size >= 1, "teacher.batch_size must be >= 1")
        check(
            self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
            "teacher.gpu_memory_utilization must be in (0, 1]",
        )


@dataclass(frozen=True)
class TeacherInfo:
    vocab_size: int
    hidden_size: int | None
    max_positions: int | None
    config: dict


def read_config(path: str | Path) -> dict:
    """The text model's config.json (the `text_config` of a multimodal one)."""
    p = Path(path)
    if p.is_file():
        raise TeacherError(f"teacher {path} is a file: give the model's folder")
    if not p.is_dir():
        raise TeacherError(f"teacher folder not found: {path}")
    if not (p / "config.json").is_file():
        raise TeacherError(f"teacher folder {path} has no config.json")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherError(f"teacher config {p / 'config.json'} is not valid JSON") from e
    unknown = unknown_model_type(p)
    if unknown:
        raise TeacherError(f"teacher {unknown}")
    return cfg.get("text_config", cfg)


def check_weights(path: str | Path) -> None:
    """Refuse weights that would not load, or would load into another model than the config
    describes: an unreadable safetensors file (truncated, random, empty), a shard index
    naming a missing file, an unknown model_type, tensors missing, unexpected or of another
    shape than the model built from config.json (on the meta device: no memory) has. An
    engine would otherwise start, and fill what is missing at random."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TeacherError(f"teacher shard index {index} is damaged") from e
        for name in sorted(wanted):
            if not (p / name).is_file():
                raise TeacherError(f"teacher shard index {index} names {name}, which is missing")
    shapes = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
        except Exception as e:  # SafetensorError: truncated, random or empty
            raise TeacherError(f"teacher weights {f} cannot be read ({str(e)[:80]})") from e
    if not shapes:  # .bin weights only: checked by the engine that loads them
        return
    try:
        config = AutoConfig.from_pretrained(str(p))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an unknown model_type, a config transformers refuses
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        where = p / "config.json"
        raise TeacherError(f"teacher config {where} cannot describe a model: {why}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)  # the embedding, shared
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise TeacherError(
                f"teacher {p}: its weights do not cover its config.json: {len(keys)} tensors "
                f"{what} ({', '.join(keys[:2])})"
            )
    if wrong:
        k = wrong[0]
        raise TeacherError(
            f"teacher {p}: {k} has shape {shapes[k]}, its config.json says {expected[k]} "
            "(hidden_size, vocab_size or layer sizes do not match the weights)"
        )


def inspect_teacher(path: str, tokenizer, seq_len: int, extra_positions: int) -> TeacherInfo:
    """Refuse a teacher that cannot produce a cache of `seq_len`-token sequences;
    `extra_positions`: tokens the engine adds after a sequence (vLLM's log-prob path: 2)."""
    cfg = read_config(path)
    if "vocab_size" not in cfg:
        raise TeacherError(f"teacher config {Path(path) / 'config.json'} has no vocab_size")
    if not weight_files(path):
        raise TeacherError(f"teacher folder {path} has no weights (*.safetensors or *.bin)")
    check_weights(path)
    vocab = int(cfg["vocab_size"])
    if vocab < len(tokenizer):
        raise TeacherError(
            f"teacher {path}: config vocab_size {vocab} is below its tokenizer's "
            f"{len(tokenizer)} ids"
        )
    positions = cfg.get("max_position_embeddings")
    if positions is not None and seq_len + extra_positions > positions:
        raise TeacherError(
            f"--seq-len {seq_len} needs {seq_len + extra_positions} positions on this path, "
            f"the teacher has {positions} (max_position_embeddings)"
        )
    return TeacherInfo(vocab, cfg.get("hidden_size"), positions, cfg)


def load_tokenizer(path: str | Path, what: str = "teacher"):
    from transformers import AutoTokenizer

    if what == "teacher":
        read_config(path)  # a missing folder or a broken config.json names itself
    elif not Path(path).is_dir():  # never a model hub's name: nothing is downloaded
        raise TeacherError(f"{what} folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise TeacherError(f"cannot load the tokenizer of {what} {path}: {e}") from e
    if tok.eos_token_id is None:
        raise TeacherError(f"the tokenizer of {what} {path} has no EOS token")
    return tok


def check_plain_head(cfg: dict, path) -> None:
    for key in HEAD_TRANSFORMS:
        if cfg.get(key) not in (None, 1, 1.0):
            raise TeacherError(
                f"teacher {path} uses {key}={cfg[key]}: the hidden-state path does "
                "not reproduce that head; use --path logprob"
            )


def load_lm_head(path: str | Path, dtype=None):
    """The teacher's LM head [V, D] (and bias) from its safetensors, tied or untied, in
    `dtype` (default: as stored)."""
    from safetensors import safe_open

    cfg = read_config(path)
    check_plain_head(cfg, path)
    names = ["lm_head.weight"] if not cfg.get("tie_word_embeddings") else []
    names += ["model.embed_tokens.weight", "embed_tokens.weight"]
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys = set(fh.keys())
            for name in names:
                if name in keys:
                    w = fh.get_tensor(name)
                    b = fh.get_tensor("lm_head.bias") if "lm_head.bias" in keys else None
                    if dtype is not None:
                        w, b = w.to(dtype), None if b is None else b.to(dtype)
                    return w, b
    raise TeacherError(f"teacher {path}: no LM head ({' or '.join(names)}) in its safetensors")
