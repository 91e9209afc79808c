"""Identity hashes recorded in every cache and checked by every consumer.

- `tokenizer_hash`: the vocabulary (token -> id, added tokens included) and EOS id. Two
  tokenizers with the same hash map text to the same ids; a student must match its cache.
- `teacher_hash`: `config.json` plus, per weight file, its size and its first and last MiB:
  cheap on a 100 GB teacher, and it changes when the weights are swapped or re-saved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def teacher_hash(model_dir: str | Path) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    h.update((d / "config.json").read_bytes())
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()
