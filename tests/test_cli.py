"""The command line: every command with settings takes them by flag, --config and --set
(all from one declaration); errors a user causes are one line and exit 2, a bug shows its
traceback and exits 1; the README documents every option `--help` shows."""

import json
import re
from pathlib import Path

import pytest

from sparsekd import cli
from sparsekd.errors import CacheError
from tests.helpers import error_line, run_cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# command -> (required flags, a flag to set, the --set key it maps to, value)
COMMANDS = {
    "build-cache": (["--teacher", "t", "--out", "o"], "--seq-len", "corpus.seq_len", 64),
    "train-student": (
        ["--cache", "c", "--student", "s", "--out", "o", "--steps", "3"],
        "--batch-size",
        "data.batch_size",
        5,
    ),
    "refine": (
        ["--teacher-cache", "a", "--reference-cache", "b", "--out", "o"],
        "--ratio",
        "ratio",
        0.25,
    ),
    "evaluate": (["--model", "m", "--cache", "c"], "--max-sequences", "max_sequences", 7),
    "init-student": (
        ["--like", "t", "--out", "o", "--layers", "2", "--hidden", "64"],
        "--heads",
        "heads",
        4,
    ),
    "demo": ([], "--engine", "engine", "hf"),
}


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("command", list(COMMANDS))
def test_settings_by_flag_config_file_and_set(tmp_path, capsys, command):
    required, flag, key, value = COMMANDS[command]
    run = lambda *a: cli.main([command, *required, *map(str, a), "--print-config"])  # noqa: E731
    assert run(flag, value) == 0
    assert _get(json.loads(capsys.readouterr().out), key) == value
    node = value
    for part in reversed(key.split(".")):
        node = {part: node}
    yaml = tmp_path / "c.yaml"
    yaml.write_text(json.dumps(node))  # JSON is YAML
    assert run("--config", yaml) == 0
    assert _get(json.loads(capsys.readouterr().out), key) == value
    assert run("--config", yaml, "--set", f"{key}={json.dumps(value)}") == 0
    assert _get(json.loads(capsys.readouterr().out), key) == value
    other = {
        "build-cache": 32,
        "train-student": 2,
        "refine": 0.5,
        "evaluate": 3,
        "init-student": 2,
        "demo": "vllm",
    }[command]
    assert run(flag, value, "--set", f"{key}={json.dumps(other)}") == 0  # --set beats the flag
    assert _get(json.loads(capsys.readouterr().out), key) == other


def test_user_errors_are_one_line_and_bugs_show_a_traceback(tmp_path, capsys, monkeypatch):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"sparsekd: error: cache folder not found: {tmp_path / 'nope'}"
    monkeypatch.setenv("SPARSEKD_TRACEBACK", "1")
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(
        "cache folder not found: " + str(tmp_path / "nope")
    )
    monkeypatch.delenv("SPARSEKD_TRACEBACK")

    import sparsekd.schemas.cache as cache_module

    def broken(path):  # stands for any defect inside the package
        raise KeyError("oops")

    monkeypatch.setattr(cache_module, "open_cache", broken)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "sparsekd: internal error (a bug): KeyError: 'oops'" in err
    assert issubclass(CacheError, ValueError)


@pytest.mark.parametrize(
    "out, match",
    [
        ("FILE", "is a file, not a directory"),
        ("FILE/sub", "Not a directory"),
        ("/proc/sparsekd-test", ""),
    ],
)
def test_out_on_a_file_or_an_unwritable_place_is_one_line(tmp_path, tiny_llama_dir, out, match):
    (tmp_path / "FILE").write_text("x")
    target = out if out.startswith("/") else tmp_path / out
    proc = run_cli(
        "build-cache",
        "--teacher",
        tiny_llama_dir,
        "--out",
        target,
        "--engine",
        "hf",
        "--seq-len",
        "16",
        "--max-sequences",
        "1",
        "--quiet",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert error_line(proc).startswith("sparsekd: error:") and match in error_line(proc)
    assert (tmp_path / "FILE").read_text() == "x"


def _options(command: str) -> list[str]:
    proc = run_cli(command, "--help", check=True)
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", proc.stdout)) - {"--help"})


@pytest.mark.parametrize("command", [*COMMANDS, "inspect", "prepare-teacher"])
def test_the_readme_documents_every_option(command):
    section = README.split(f"### `sparsekd {command}")[1].split("\n### ")[0]
    missing = [o for o in _options(command) if o not in section]
    assert not missing, f"README's sparsekd {command} section lacks {missing}"


@pytest.mark.parametrize(
    "args, match",
    [
        (["build-cache", "--k", "abc"], "Invalid value for '--k': 'abc' is not a valid integer"),
        (["build-cache", "--engine", "banana"], "Invalid value for '--engine'"),
        (["build-cache", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["build-cache", "--config", "."], "Invalid value for '--config'"),
        (["build-cache", "--set", "teacher.dtype=banana"], "teacher.dtype must be one of auto"),
        (["build-cache", "--seed", "-1"], "seed must be in 0..2^63-1, got -1"),
        (["init-student", "--seed", "-3", "--like", "x", "--out", "y", "--layers", "1",
          "--hidden", "8", "--heads", "1"], "--seed must be in 0..2^63-1, got -3"),
        (["build-cache", "--proposal-temperature", "inf", "--mode", "sample"],
         "must be a finite number, got inf"),
        (["nonsense-command"], "No such command 'nonsense-command'"),
    ],
)  # fmt: skip
def test_every_usage_error_is_one_line_and_exit_2(args, match, tmp_path):
    base = (
        ["--teacher", str(tmp_path), "--out", str(tmp_path / "o")]
        if args[0] == "build-cache"
        else []
    )
    proc = run_cli(*args, *base, fresh_process=True)  # what a terminal shows, imports and all
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparsekd: error: ") and match in lines[0], lines[0]


def test_a_yaml_config_naming_a_setting_twice_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("corpus:\n  seq_len: 64\n  seq_len: 128\n")
    proc = run_cli("build-cache", "--config", cfg, "--teacher", tmp_path, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "setting 'seq_len' appears twice" in error_line(proc)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["train-student", "--cache", "c", "--student", "s", "--out", "s3://b/run", "--steps", "1"],
         "--out"),
        (["train-student", "--cache", "c", "--student", "gs://b/s", "--out", "o", "--steps", "1"],
         "--student"),
        (["init-student", "--like", "t", "--out", "s3://b/s", "--layers", "1", "--hidden", "64",
          "--heads", "2"], "--out"),
        (["init-student", "--like", "s3://b/t", "--out", "o", "--layers", "1", "--hidden", "64",
          "--heads", "2"], "--like"),
        (["evaluate", "--model", "s3://b/m", "--cache", "c"], "--model"),
        (["prepare-teacher", "--out", "s3://b/t"], "--out"),
        (["inspect", "c", "--plot", "s3://b/p.png"], "--plot"),
        (["demo", "--out", "s3://b/d"], "--out"),
    ],
)  # fmt: skip
def test_a_uri_where_only_a_local_path_is_served_is_refused_by_name(
    tmp_path, monkeypatch, args, flag
):
    """Never taken for a local path (a folder named `s3:` in the working directory)."""
    monkeypatch.chdir(tmp_path)
    proc = run_cli(*args)
    assert proc.returncode == 2 and error_line(proc).startswith(f"sparsekd: error: {flag} ")
    assert "object-store URIs are served for corpora and caches only" in error_line(proc)
    assert not any(tmp_path.iterdir())  # nothing written where it ran
