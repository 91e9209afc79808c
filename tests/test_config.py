"""Settings declared once: types checked with one-line errors naming the setting, the
precedence defaults < --config < flags < --set, and the reference rows for the docs."""

import pytest

from sparsekd.cache_builder.config import BuildConfig
from sparsekd.config import build, describe, parse_sets, resolve, to_dict
from sparsekd.errors import ConfigError
from sparsekd.student_train.config import TrainConfig

REQUIRED = {"teacher": {"path": "t"}, "writer": {"out": "o"}}


def _build(**over):
    values = {**REQUIRED, **over}
    return build(BuildConfig, values)


@pytest.mark.parametrize(
    "sets, match",
    [
        (["encoder.k=2.5"], "encoder.k must be an integer or null, got 2.5"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["writer.out=null"], "writer.out must be a string, got null"),
        (["encoder.k=[1,2]"], "encoder.k must be an integer or null, got \\[1, 2\\]"),
        (["corpus.skip_bad_lines=yes"], "corpus.skip_bad_lines must be true or false, got 'yes'"),
        (["encoder.mode=dense"], "encoder.mode must be one of topk, sample, logprob, got 'dense'"),
        (["encoder.nope=1"], "unknown setting encoder.nope"),
        (["encoder=3"], "encoder must be a mapping"),
        (["k"], "expected key.path=value"),
        (["seed.x=1"], "seed must be an integer"),
    ],
)
def test_set_values_of_the_wrong_type_are_one_line_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(BuildConfig, REQUIRED, None, sets)


def test_yaml_values_are_checked_the_same_way(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("teacher: {path: t}\nwriter: {out: o}\nencoder:\n  k: [1, 2]\n")
    with pytest.raises(ConfigError, match="encoder.k must be an integer"):
        resolve(BuildConfig, {}, str(f), ())
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve(BuildConfig, {}, str(f), ())
    f.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve(BuildConfig, {}, str(f), ())
    with pytest.raises(ConfigError, match="--config file not found"):
        resolve(BuildConfig, {}, str(tmp_path / "nope.yaml"), ())


def test_precedence_defaults_yaml_flags_set(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text(
        "teacher: {path: t}\nwriter: {out: o}\ncorpus: {seq_len: 128, text_field: body}\nseed: 3\n"
    )
    cfg = resolve(BuildConfig, {"corpus": {"seq_len": 256}}, str(f), ["corpus.seq_len=64"])
    assert cfg.corpus.seq_len == 64  # --set beats the flag, which beats the file
    assert cfg.corpus.text_field == "body" and cfg.seed == 3  # the file beats the defaults
    assert cfg.encoder.mode == "topk"  # a default
    cfg = resolve(BuildConfig, {"corpus": {"seq_len": 256}}, str(f), ())
    assert cfg.corpus.seq_len == 256


def test_missing_required_settings_name_their_flag():
    with pytest.raises(ConfigError, match=r"missing required setting teacher.path \(--teacher\)"):
        build(BuildConfig, {"writer": {"out": "o"}})
    with pytest.raises(ConfigError, match=r"missing required setting data.cache \(--cache\)"):
        build(TrainConfig, {"student": "s", "out": "o", "steps": 1, "data": {}})


def test_round_trip_and_types():
    cfg = _build(
        corpus={"paths": "one.jsonl", "seq_len": 32},
        encoder={"proposal_temperature": 1, "mode": "sample"},
    )
    assert cfg.corpus.paths == ("one.jsonl",) and cfg.encoder.proposal_temperature == 1.0
    assert build(BuildConfig, to_dict(cfg)) == cfg
    assert parse_sets(["a.b=1", "a.c=x", 'd="2"']) == {"a": {"b": 1, "c": "x"}, "d": "2"}


def test_every_setting_has_a_doc():
    for cls in (BuildConfig, TrainConfig):
        rows = describe(cls)
        assert rows and all(doc.strip() for _, _, _, doc in rows), [
            r for r in rows if not r[3].strip()
        ]
        keys = [k for k, *_ in rows]
        assert len(keys) == len(set(keys))


def test_docs_settings_is_generated_from_the_declarations():
    from pathlib import Path

    from sparsekd.settings_doc import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert doc.read_text() == render(), "run: python -m sparsekd.settings_doc > docs/settings.md"
