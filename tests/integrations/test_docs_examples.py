"""The examples of docs/integrations.md run as written (paths substituted)."""

import re
from pathlib import Path

import pytest

DOC = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()

pytestmark = pytest.mark.slow


def _example(name: str) -> str:
    blocks = re.findall(r"```python\n(# example: [\w-]+\n.*?)```", DOC, flags=re.S)
    found = [b for b in blocks if b.startswith(f"# example: {name}\n")]
    assert len(found) == 1, f"docs/integrations.md has no single '# example: {name}' block"
    return found[0]


@pytest.mark.parametrize("name", ["plain-pytorch", "trainer", "trl"])
def test_integration_examples_run(tmp_path, hf_topk_cache, tiny_student, name):
    if name == "trl":
        pytest.importorskip("trl")
    code = _example(name)
    out = tmp_path / "out"
    out.mkdir()
    code = code.replace('"cache/"', repr(str(hf_topk_cache))).replace(
        '"student/"', repr(str(tiny_student))
    )
    code = re.sub(r'"run-[\w]+/"', repr(str(out) + "/"), code)
    code = code.replace("max_steps=20", "max_steps=3").replace("save_steps=10", "save_steps=2")
    code = code.replace("num_workers=2", "num_workers=0").replace("range(2)", "range(1)")
    exec(compile(code, f"docs/integrations.md:{name}", "exec"), {"__name__": "__example__"})
    assert any(out.iterdir())
