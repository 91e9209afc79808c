"""Identity hashes: what a cache's bytes depend on, recorded in every shard and checked by
every consumer.

- `tokenizer_hash`: the whole tokenizer as it maps text to ids: for a fast tokenizer its
  `tokenizer.json` content (normaliser, pre-tokeniser, model with vocabulary and merges,
  post-processor, added tokens; padding and truncation settings left out), plus the
  special-token ids. Two tokenizers with the same hash turn the same text into
  the same ids; a student must match its cache.
- `teacher_files`: `config.json`'s bytes and every weight file's name and size: cheap, and
  part of the build fingerprint.
- `teacher_weights_sha256`: sha256 over the full content of every weight file (about
  2 GB/s; an 8B bf16 teacher takes ~8 s). Computed beside the engine's start-up and
  recorded by every worker; workers that saw different weights refuse to share a cache.
- `template_sha256`: a chat template's text (a cache of conversations, and its students).
- `fingerprint`: sha256 of a JSON identity document (sorted keys).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of everything that decides how `tokenizer` maps text to ids."""
    doc: dict = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("padding", "truncation"):
            spec.pop(key, None)
        doc["tokenizer"] = spec
    else:  # a slow tokenizer: its vocabulary and its settings
        doc["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        doc["init"] = {k: str(v) for k, v in sorted(tokenizer.init_kwargs.items())}
    doc["special"] = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")
    }
    doc["added"] = sorted((str(t), i) for t, i in tokenizer.get_added_vocab().items())
    payload = json.dumps(doc, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def template_sha256(template: str | None) -> str | None:
    """sha256 of a chat template's text (None: no template). A cache of conversations
    records the one it was rendered with; a student must render them the same way."""
    return None if template is None else hashlib.sha256(template.encode()).hexdigest()


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    return sorted({f for pattern in WEIGHT_PATTERNS for f in d.glob(pattern) if f.is_file()})


def teacher_files(model_dir: str | Path) -> dict:
    """config.json's sha256 and each weight file's name and size (no weight bytes read)."""
    d = Path(model_dir)
    return {
        "config_sha256": hashlib.sha256((d / "config.json").read_bytes()).hexdigest(),
        "weights": [[f.name, f.stat().st_size] for f in weight_files(d)],
    }


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over every weight file's full content, in name order."""
    h = hashlib.sha256()
    for f in weight_files(model_dir):
        h.update(f"{f.name}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


class WeightsDigest:
    """`weights_sha256` in a background thread (hashlib releases the GIL), so that hashing
    a large teacher overlaps the engine's start-up; `result()` joins it."""

    def __init__(self, model_dir: str | Path):
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(model_dir,), daemon=True)
        self._thread.start()

    def _run(self, model_dir):
        try:
            self._value = weights_sha256(model_dir)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
