"""Settings, declared once: nested frozen dataclasses whose fields carry their own docs.

Every command's settings are one dataclass of sections (`CorpusConfig`, `EncoderConfig`,
...); each field is declared once with `setting(default, doc, flag=...)`. From that one
declaration come

- the command's click options (`command_options(cls)`): name, type, choices, help text
  and the default shown in `--help`;
- `--config FILE.yaml` (nested mappings named like the sections) and repeatable
  `--set a.b=value` (the value read as JSON when it parses, as text otherwise);
- type checks with one-line errors naming the setting (`resolve`, `build`).

Precedence, lowest first: dataclass defaults < `--config` < the command's flags < `--set`
(in order). Range checks live in each dataclass's `__post_init__` and raise ConfigError.

    @dataclass(frozen=True, kw_only=True)
    class WriterConfig:
        out: str = setting(doc="Cache directory.", flag="--out")
        shard_sequences: int | None = setting(None, "Sequences per shard.", flag=True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path

from sparsekd.errors import ConfigError

REQUIRED = dataclasses.MISSING


def setting(
    default=REQUIRED,
    doc: str = "",
    *,
    flag: str | bool | None = None,
    choices: tuple | None = None,
    flag_value=None,
):
    """One setting. `flag`: True for `--field-name`, a string for another flag name (a
    "--progress/--quiet" pair for booleans), None for `--set`/`--config` only. `choices`:
    the allowed values. `flag_value`: for a boolean flag, the value it sets."""
    meta = {"doc": doc, "flag": flag, "choices": choices, "flag_value": flag_value}
    return dataclasses.field(default=default, metadata=meta)


def section(cls, doc: str = "", *, required: bool = False):
    """A nested config. Required when it has required fields of its own."""
    meta = {"doc": doc, "section": True}
    if required:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default_factory=cls, metadata=meta)


def default_of(cls, name: str):
    """The declared default of setting `name` of config class `cls`."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok` (for `__post_init__` range checks)."""
    if not ok:
        raise ConfigError(message)


def check_local(value, flag: str) -> None:
    """Refuse a URI (s3://, gs://, ...) where the command reads or writes a local folder
    only: never taken for a local path (a folder named `s3:`)."""
    from sparsekd.storage import is_uri

    check(
        value is None or not is_uri(value),
        f"{flag} {value}: this must be a local (or shared file system) path; object-store "
        "URIs are served for corpora and caches only",
    )


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional(typ):
    """(inner type, True) for `X | None`, else (typ, False)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0], True
    return typ, False


def leaves(cls, prefix: tuple[str, ...] = ()):
    """Every leaf setting of `cls`: (path, field, type), sections expanded, in order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from leaves(typ, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, typ


def _type_name(typ) -> str:
    inner, opt = _optional(typ)
    name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        inner, "a list of strings" if typing.get_origin(inner) is tuple else str(inner)
    )
    return name + (" or null" if opt else "")


def _shown(value) -> str:
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _coerce(where: str, typ, value, choices=None):
    inner, optional = _optional(typ)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be {_type_name(typ)}, got null")
    ok = True
    if inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:  # a finite number: no setting means anything by inf or nan
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
    elif inner is str:
        ok = isinstance(value, str)
    elif typing.get_origin(inner) is tuple:
        if isinstance(value, str):
            value = (value,)
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(typ)}, got {_shown(value)}")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{where} must be one of {allowed}, got {_shown(value)}")
    return value


def build(cls, values: dict, where: str = ""):
    """Instantiate dataclass `cls` (recursively) from a nested dict, checking every type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {where}{unknown[0]}; {where or 'top level '}settings: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, f in fields.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            sub = values.get(name, {})
            if sub or f.default_factory is dataclasses.MISSING:
                kwargs[name] = build(typ, sub if sub is not None else {}, f"{where}{name}.")
        elif name in values:
            kwargs[name] = _coerce(f"{where}{name}", typ, values[name], f.metadata.get("choices"))
        elif f.default is REQUIRED and f.default_factory is dataclasses.MISSING:
            flag = _flag_names(f, (*where.split(".")[:-1], name))
            how = f" ({flag[0]})" if flag else ""
            raise ConfigError(f"missing required setting {where}{name}{how}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The config as plain JSON-able data (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_sets(sets) -> dict:
    """`("a.b=1", "c=x")` -> {"a": {"b": 1}, "c": "x"}; values are JSON when they parse."""
    out: dict = {}
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is a setting, not a section")
        node[parts[-1]] = value
    return out


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """A YAML mapping that names a key twice is refused (it would silently keep the
        last value)."""

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {path} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        data = yaml.load(p.read_text(), Loader=_unique_key_loader()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings")
    return data


def resolve(cls, flags: dict | None = None, config_file: str | None = None, sets=()):
    """defaults < YAML < flags (nested dict; absent = not given) < each --set."""
    values = _merge(_merge(load_yaml(config_file), flags or {}), parse_sets(sets))
    return build(cls, values)


# --- click options generated from the declaration --------------------------------------


def _flag_names(f, path) -> list[str]:
    flag = f.metadata.get("flag")
    if not flag:
        return []
    if flag is True:
        return [f"--{path[-1].replace('_', '-')}"]
    return [flag]


def _dest(path) -> str:
    return "cfg__" + "__".join(path)


def _help(f, typ) -> str:
    doc = f.metadata.get("doc", "")
    default = f.default
    if default is REQUIRED or default is None or isinstance(default, bool):
        return doc
    if isinstance(default, tuple):
        default = " ".join(default)
    return f"{doc} [default: {default}]"


def _click_option(path, f, typ):
    import click

    inner, _ = _optional(typ)
    decl = _flag_names(f, path)
    kw: dict = {"help": _help(f, typ), "default": None}
    choices = f.metadata.get("choices")
    if inner is bool:
        if "/" not in decl[0]:
            fv = f.metadata.get("flag_value")
            kw.update(is_flag=True, flag_value=True if fv is None else fv)
    elif typing.get_origin(inner) is tuple:
        kw.update(multiple=True, default=())
    elif choices is not None:
        kw["type"] = click.Choice([str(c) for c in choices])
    else:
        kw["type"] = {int: int, float: float, str: str}[inner]
    return click.option(*decl, _dest(path), **kw)


def command_options(cls):
    """Decorator: the click options of every flagged setting of `cls`, plus `--config` and
    `--set`; the command receives the resolved config as its first argument."""
    import click

    flagged = [(p, f, t) for p, f, t in leaves(cls) if f.metadata.get("flag")]

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, config_file=None, sets=(), print_config=False, **kw):
            flags: dict = {}
            for path, _, _ in flagged:
                value = kw.pop(_dest(path))
                if value is None or value == ():
                    continue
                node = flags
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = value
            cfg = resolve(cls, flags, config_file, sets)
            if print_config:
                click.echo(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
                return None
            return fn(cfg, *args, **kw)

        for path, f, typ in reversed(flagged):
            wrapper = _click_option(path, f, typ)(wrapper)
        wrapper = click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any setting, e.g. --set a.b=1 (repeatable; beats flags and --config).",
        )(wrapper)
        wrapper = click.option(
            "--print-config",
            is_flag=True,
            help="Print the resolved settings as JSON and exit (nothing is run).",
        )(wrapper)
        wrapper = click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML file of settings (sections as nested mappings).",
        )(wrapper)
        return wrapper

    return deco


def describe(cls) -> list[tuple[str, str, str, str]]:
    """(dotted key, flag, type, doc + default) for every setting: the reference tables."""
    rows = []
    for path, f, typ in leaves(cls):
        flag = ", ".join(_flag_names(f, path))
        rows.append((".".join(path), flag, _type_name(typ), _help(f, typ)))
    return rows


def markdown(cls) -> str:
    """The settings of `cls` as a Markdown table (docs/settings.md is made of these)."""
    lines = ["| setting (`--set` key) | flag | type | meaning |", "|---|---|---|---|"]
    for key, flag, typ, doc in describe(cls):
        flag = f"`{flag}`" if flag else ""
        lines.append(f"| `{key}` | {flag} | {typ} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
