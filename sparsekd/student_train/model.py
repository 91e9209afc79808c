"""Students: create one shaped like a teacher, load one, check it against a cache, and the
module that turns a batch into the distillation loss.

`DistillModule.forward` runs the student's decoder to its final hidden states and hands
them, with the LM head, to `sparse_kl_loss`: the [tokens, V] logits are never formed. The
whole loss is computed inside `forward`, so DDP and FSDP2 see every parameter use;
`forward(input_ids, logits_only=True)` is the evaluation path through the same root
module (an FSDP2 forward is a collective that must enter through the root).

`check_head` proves, on a few tokens, that the model's logits are `hidden @ W.T + b`:
a model whose head scales, caps or otherwise transforms its logits is refused, since the
fused loss would silently train a different model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekd.config import check, check_local, setting
from sparsekd.errors import StudentError, unknown_model_type
from sparsekd.schemas import format as F
from sparsekd.schemas.identity import template_sha256, tokenizer_hash
from sparsekd.storage import publish_folder

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True, kw_only=True)
class InitStudentConfig:
    like: str = setting(doc="Teacher folder (tokenizer, vocabulary).", flag=True)
    out: str = setting(doc="Folder to write.", flag=True)
    layers: int = setting(doc="Decoder layers.", flag=True)
    hidden: int = setting(doc="Hidden size.", flag=True)
    heads: int = setting(doc="Attention heads.", flag=True)
    kv_heads: int | None = setting(None, "Key/value heads (default: --heads).", flag=True)
    intermediate: int | None = setting(None, "MLP width (default 4 x hidden).", flag=True)
    seed: int = setting(0, "Initialisation seed.", flag=True)

    def __post_init__(self):
        check_local(self.like, "--like")
        check_local(self.out, "--out")
        for name in ("layers", "hidden", "heads"):
            check(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.hidden % self.heads == 0,
            f"--hidden {self.hidden} is not divisible by --heads {self.heads}",
        )
        kv = self.kv_heads or self.heads
        check(kv >= 1 and self.heads % kv == 0, f"--kv-heads {kv} must divide --heads {self.heads}")
        check(self.intermediate is None or self.intermediate >= 1, "--intermediate must be >= 1")
        check(0 <= self.seed < 2**63, f"--seed must be in 0..2^63-1, got {self.seed}")


def init_student(cfg: InitStudentConfig) -> Path:
    """A randomly initialised Llama-style student with the teacher's tokenizer and vocabulary."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    like, out = Path(cfg.like), Path(cfg.out)
    if not (like / "config.json").is_file():
        raise StudentError(f"--like {like}: no config.json (not a model folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudentError(f"--out {out} exists and is not an empty folder")
    t = AutoConfig.from_pretrained(like)
    t = getattr(t, "text_config", t)
    model_cfg = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        head_dim=cfg.hidden // cfg.heads,
        intermediate_size=cfg.intermediate or 4 * cfg.hidden,
        max_position_embeddings=getattr(t, "max_position_embeddings", 2048),
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-5),
        rope_theta=getattr(t, "rope_theta", 1e4),
        tie_word_embeddings=True,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=getattr(t, "pad_token_id", None),
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_cfg).to(torch.float32)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (like / name).exists():
                shutil.copy(like / name, tmp / name)

    if out.exists():
        out.rmdir()  # empty (checked above): publish_folder makes it
    return publish_folder(out, write)


@torch.no_grad()
def check_head(model) -> None:
    """Refuse a model whose logits are not `final hidden @ W.T (+ b)` (checked on 8 tokens)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise StudentError("the student has no output embedding (LM head) the loss can use")
    was = model.training
    model.eval()
    x = torch.arange(8, device=head.weight.device)[None] % head.weight.shape[0]
    logits = model(input_ids=x).logits.float()
    hidden = model.get_decoder()(input_ids=x).last_hidden_state.float()
    ours = hidden @ head.weight.float().T
    if getattr(head, "bias", None) is not None:
        ours = ours + head.bias.float()
    model.train(was)
    scale = ours.abs().max().clamp_min(1.0)
    if not torch.allclose(logits, ours, atol=1e-3 * float(scale), rtol=1e-3):
        transforms = [
            f"{k}={getattr(model.config, k)}"
            for k in (
                "final_logit_softcapping",
                "logit_scale",
                "logits_scaling",
                "output_multiplier_scale",
            )
            if getattr(model.config, k, None) not in (None, 1, 1.0)
        ]
        what = f" ({', '.join(transforms)})" if transforms else ""
        raise StudentError(
            f"the student's head transforms its logits{what}: the fused loss computes "
            "hidden @ W.T + b and would train another model"
        )


# Attention implementations given the block-diagonal causal mask as a 4-D tensor built on the
# device (the mask transformers itself builds from packed position ids, without the host
# synchronisation its detection of them costs); the others get the position ids alone
# (flash attention: variable-length attention over the documents).
MASKED_ATTENTION = ("sdpa", "eager")


def attention_kwargs(model, position_ids) -> dict:
    """The keywords of a model call that keep the documents of each row apart, from
    `position_ids` [B, L] (restarting at 0 at each document; None: one sequence per row).
    For sdpa and eager attention: the position ids and a [B, 1, L, L] mask (a position sees
    the earlier positions of its own document), made on the device without a host
    synchronisation; for other implementations the position ids alone, from which
    transformers finds the documents itself."""
    if position_ids is None:
        return {}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return {"position_ids": position_ids}
    L = position_ids.shape[1]
    doc_BL = torch.cumsum(position_ids == 0, dim=1)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril()
    mask = ((doc_BL[:, :, None] == doc_BL[:, None, :]) & causal_LL)[:, None]
    if impl == "eager":  # an additive mask
        dtype = model.get_output_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return {"position_ids": position_ids, "attention_mask": mask}


@torch.no_grad()
def check_documents(model) -> None:
    """Refuse a model that does not keep the documents of a row apart when called with
    `attention_kwargs`: checked on a row of two short documents against the second read
    alone. The models built on transformers' masking utilities do (a block-diagonal causal
    mask, or variable-length attention with flash attention); one with its own mask code
    may not."""
    head = model.get_output_embeddings()
    V, device = head.weight.shape[0], head.weight.device
    a = (torch.arange(5, device=device) * 7 + 3) % V
    b = (torch.arange(4, device=device) * 11 + 5) % V
    x = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(5, device=device), torch.arange(4, device=device)])[None]
    was = model.training
    model.eval()
    try:
        kw = attention_kwargs(model, pos)
        packed = model(input_ids=x, use_cache=False, **kw).logits[0, 5:].float()
        alone = model(input_ids=b[None], use_cache=False).logits[0].float()
    finally:
        model.train(was)
    scale = float(alone.abs().max().clamp_min(1.0))
    if not torch.allclose(packed, alone, atol=1e-4 * scale, rtol=1e-4):
        impl = getattr(model.config, "_attn_implementation", None)
        raise StudentError(
            f"the student ({model.config.model_type}, attention {impl}) does not keep the "
            "documents of a row apart through position_ids, and this cache's targets were "
            "computed per document (attention: document); load it with "
            "attn_implementation='sdpa' or 'eager'"
        )


def load_student(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise StudentError(f"student folder {p} has no config.json")
    unknown = unknown_model_type(p)
    if unknown:
        raise StudentError(f"student {p}: {unknown}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32, output_loading_info=True
        )
    except Exception as e:  # damaged or truncated weights, a config it cannot read
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise StudentError(f"cannot load the student in {p}: {why}") from e
    refuse_partial_weights(info, f"student {p}", StudentError)
    check_head(model)
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise StudentError(f"student folder {p} has no usable tokenizer ({e})") from e
    return model, tok


def refuse_partial_weights(info: dict, what: str, error) -> None:
    """transformers only warns when weights do not cover the model (it initialises what is
    missing at random): an error here."""
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing or unexpected:
        which = f"{len(missing)} missing ({', '.join(sorted(missing)[:2])})" if missing else ""
        extra = f"{len(unexpected)} unexpected ({', '.join(sorted(unexpected)[:2])})"
        shown = ", ".join(x for x in (which, extra if unexpected else "") if x)
        raise error(f"{what}: its weights do not match its config.json: {shown}")


def check_compatible(model, tok, meta: dict, manifest: dict | None = None) -> None:
    """Refuse a student whose vocabulary or tokenizer differs from the cache's, or, for a
    cache of conversations (its `manifest` counts them), whose chat template would render
    them differently from the template the cache was built with."""
    v_student = model.get_output_embeddings().weight.shape[0]
    if v_student != meta["vocab_size"]:
        raise StudentError(
            f"vocabulary mismatch: student has {v_student} ids, the cache's "
            f"teacher {meta['vocab_size']}"
        )
    h = tokenizer_hash(tok)
    if h != meta["tokenizer_hash"]:
        raise StudentError(
            f"tokenizer mismatch: student tokenizer {h[:16]}, cache {meta['tokenizer_hash'][:16]} "
            "(another vocabulary, normaliser or special tokens)"
        )
    if F.attention_of(meta) == "document":
        check_documents(model)
    chat = (meta.get("corpus") or {}).get("chat")
    if manifest is not None and manifest.get("chat") and chat:
        mine, theirs = template_sha256(getattr(tok, "chat_template", None)), chat["template_sha256"]
        if mine != theirs:
            raise StudentError(
                f"chat template mismatch: the student's ({str(mine)[:16]}) would render "
                f"conversations differently from the cache's ({str(theirs)[:16]}); save the "
                "cache's template with the student's tokenizer (chat_template.jinja)"
            )


class DistillModule(torch.nn.Module):
    """Wraps a causal LM and its loss (loss.KDLoss): forward(batch tensors) -> (loss,
    kd_part, ce_part)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def hidden(self, input_ids, position_ids=None):
        """[B, L, D]: the decoder's final hidden states, each document of a row apart."""
        kw = attention_kwargs(self.model, position_ids)
        return self.model.get_decoder()(
            input_ids=input_ids, use_cache=False, **kw
        ).last_hidden_state

    def forward(
        self,
        input_ids,
        labels=None,
        teacher_ids=None,
        teacher_probs=None,
        *,
        position_ids=None,
        logits_only=False,
    ):
        """A batch's tensors ([B, L] input and position ids, [B, L] labels, [B, L, S] teacher
        ids and probabilities: reader.Batch) -> the loss and its parts; or, with
        logits_only, the logits of input_ids. Position ids restart at each document of a
        row (None: one sequence per row), and attention stays inside each document
        (`attention_kwargs`): the student sees what the teacher saw (check_documents)."""
        if logits_only:
            kw = attention_kwargs(self.model, position_ids)
            return self.model(input_ids=input_ids, use_cache=False, **kw).logits
        hidden_BLD = self.hidden(input_ids, position_ids)
        hidden_ND = hidden_BLD.reshape(-1, hidden_BLD.shape[-1])
        N = hidden_ND.shape[0]
        return self.loss(
            hidden_ND,
            self.model.get_output_embeddings(),
            labels.reshape(N),
            teacher_ids.reshape(N, -1),
            teacher_probs.reshape(N, -1),
        )


def save_final(model, tok, out: str | Path) -> Path:
    """`save_pretrained` folder with the tokenizer: loads in transformers and vLLM. Written
    whole or not at all (storage.publish_folder)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.setdefault("torch_dtype", "float32")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    return publish_folder(out, write)
