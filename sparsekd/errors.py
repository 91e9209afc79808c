"""The errors a user can cause. The CLI prints each as one line and exits 2; any other
exception is a bug and shows its traceback (`SPARSEKD_TRACEBACK=1` shows it for these too).

They derive from ValueError as well, so code that caught ValueError keeps working.
"""

from __future__ import annotations


class SparsekdError(ValueError):
    """Base of every error a user can cause: bad input, a bad setting, a damaged file."""


class ConfigError(SparsekdError):
    """A setting with a wrong type or value, or a combination of settings that makes no sense."""


class CorpusError(SparsekdError):
    """A corpus input that cannot be read (missing, unsupported, malformed, truncated)."""


class TeacherError(SparsekdError):
    """A teacher folder or GGUF file that sparsekd cannot use."""


class CacheError(SparsekdError):
    """A cache directory that is missing, incomplete, corrupt or of another configuration."""


class StudentError(SparsekdError):
    """A student model that cannot be trained or evaluated on a given cache."""


class RunError(SparsekdError):
    """A training run directory that cannot be started or resumed as asked."""


class StorageError(SparsekdError):
    """A store that cannot be used: no such bucket, access refused, an endpoint that does not
    answer (sparsekd.storage)."""


class Preempted(Exception):
    """The run stopped on a scheduler's signal after writing a checkpoint: not an error,
    and not a bug. The CLI prints its one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def unknown_model_type(folder) -> str | None:
    """One line naming the `model_type` of `folder`/config.json when the installed
    transformers has no such architecture (its own message runs over lines and is preceded
    by a warning); None when the type is known or the config has none."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # a missing or damaged config.json: its own check names it
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not isinstance(kind, str):
        return None
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if kind in CONFIG_MAPPING:
        return None
    return (
        f"model_type {kind!r} in {Path(folder) / 'config.json'} is not an architecture "
        f"transformers {transformers.__version__} knows (a newer transformers may, or the "
        "folder is not a Hugging Face model)"
    )
