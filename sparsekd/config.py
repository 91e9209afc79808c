"""Nested frozen dataclass configs from defaults, a YAML file, CLI flags and `--set a.b=v`.

Precedence, lowest first: the dataclass defaults, `--config FILE`, the command's own flags,
then each `--set` in order. Unknown keys are errors naming the key and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(sets: tuple[str, ...] | list[str]) -> dict:
    out: dict = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return out


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping")
    return data


def build(cls, values: dict, where: str = ""):
    """Instantiate dataclass `cls` (recursively) from a nested dict."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(
            f"unknown config key {where}{sorted(unknown)[0]!r}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            kwargs[name] = build(typ, value, f"{where}{name}.")
        elif typing.get_origin(typ) is tuple and isinstance(value, list | str):
            kwargs[name] = tuple([value] if isinstance(value, str) else value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def resolve(cls, flags: dict, config_file: str | None, sets) -> object:
    """defaults < YAML < flags (None means 'not given') < --set."""

    def drop_none(d):
        return {
            k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None
        }

    values = _merge(_merge(load_yaml(config_file), drop_none(flags)), parse_sets(sets))
    return build(cls, values)


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
