"""Students: create one shaped like a teacher, load one, check it against a cache, and the
training module that turns a batch into the distillation loss.

`DistillModule.forward` runs the student's decoder to its final hidden states and hands
them, with the LM head, to `sparse_kl_loss`: the [tokens, V] logits are never formed. The
whole loss is computed inside `forward` so that DDP/FSDP see every parameter use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sparsekd.kernels import sparse_kl_loss_parts
from sparsekd.schemas.identity import tokenizer_hash

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Heads whose logits are not hidden @ W.T + b: the fused loss would silently be wrong.
_UNSUPPORTED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class StudentError(ValueError):
    """A student that cannot be trained on a given cache."""


def init_student(
    like: str | Path,
    out: str | Path,
    *,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int | None = None,
    kv_heads: int | None = None,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama-style student with the teacher's tokenizer and vocabulary."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    like, out = Path(like), Path(out)
    if not (like / "config.json").is_file():
        raise StudentError(f"--like {like}: no config.json (not a model folder)")
    if out.exists() and any(out.iterdir()):
        raise StudentError(f"--out {out} exists and is not empty")
    if hidden % heads:
        raise StudentError(f"--hidden {hidden} is not divisible by --heads {heads}")
    t = AutoConfig.from_pretrained(like)
    cfg = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=getattr(t, "max_position_embeddings", 2048),
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-5),
        rope_theta=getattr(t, "rope_theta", 1e4),
        tie_word_embeddings=True,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=getattr(t, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (like / name).exists():
            shutil.copy(like / name, out / name)
    return out


def load_student(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise StudentError(f"student folder {p} has no config.json")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    for attr in _UNSUPPORTED_HEAD:
        val = getattr(model.config, attr, None)
        if val not in (None, 1, 1.0):
            raise StudentError(
                f"student head uses {attr}={val}; the fused loss does not reproduce it yet"
            )
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise StudentError(f"student folder {p} has no usable tokenizer ({e})") from e
    return model, tok


def check_compatible(model, tok, meta: dict) -> None:
    """Refuse a student whose vocabulary or tokenizer differs from the cache's."""
    v_student = model.get_output_embeddings().weight.shape[0]
    if v_student != meta["vocab_size"]:
        raise StudentError(
            f"vocabulary mismatch: student has {v_student} ids, the cache's "
            f"teacher {meta['vocab_size']}"
        )
    h = tokenizer_hash(tok)
    if h != meta["tokenizer_hash"]:
        raise StudentError(
            f"tokenizer mismatch: student tokenizer {h[:16]}, cache {meta['tokenizer_hash'][:16]}"
        )


class DistillModule(torch.nn.Module):
    """Wraps a causal LM: forward(batch tensors) -> (loss, kd_part, ce_part)."""

    def __init__(self, model, *, divergence: str, kd_weight: float, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.divergence = divergence
        self.kd_weight = kd_weight
        self.backend = backend

    def forward(self, input_ids, labels, ids, probs):
        decoder = self.model.get_decoder()
        hidden_BLD = decoder(input_ids=input_ids).last_hidden_state
        head = self.model.get_output_embeddings()
        hidden_ND = hidden_BLD.reshape(-1, hidden_BLD.shape[-1])
        if self.kd_weight == 0.0:  # plain CE: no support to visit
            ids = torch.full((hidden_ND.shape[0], 1), -1, dtype=ids.dtype, device=ids.device)
            probs = torch.zeros(ids.shape, dtype=probs.dtype, device=probs.device)
        return sparse_kl_loss_parts(
            hidden_ND,
            head.weight,
            ids,
            probs,
            labels,
            divergence=self.divergence,
            kd_weight=self.kd_weight,
            ce_weight=1.0 - self.kd_weight,
            backend=self.backend,
            bias=head.bias,
        )


def save_final(model, tok, out: str | Path) -> Path:
    """`save_pretrained` folder with the tokenizer: loads in transformers and vLLM."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.setdefault("torch_dtype", "float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
