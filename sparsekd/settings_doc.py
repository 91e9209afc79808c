"""docs/settings.md, generated from the settings' declarations:
`python -m sparsekd.settings_doc > docs/settings.md` (a test keeps the two equal)."""

from __future__ import annotations

from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.refine import RefineConfig
from sparsekd.config import markdown
from sparsekd.demo import DemoConfig
from sparsekd.fidelity import FidelityConfig
from sparsekd.student_train.config import TrainConfig
from sparsekd.student_train.evaluate import EvaluateConfig
from sparsekd.student_train.model import InitStudentConfig

COMMANDS = {
    "build-cache": BuildConfig,
    "train-student": TrainConfig,
    "refine": RefineConfig,
    "evaluate": EvaluateConfig,
    "fidelity": FidelityConfig,
    "init-student": InitStudentConfig,
    "demo": DemoConfig,
}


def render() -> str:
    parts = [
        "# Settings of every command",
        "",
        "Generated from the declarations (`python -m sparsekd.settings_doc`). Every setting",
        "can be given in a YAML file (`--config FILE`, sections as nested mappings) or with",
        "`--set key=value` (the value read as JSON when it parses, as text otherwise);",
        "those with a flag also by the flag. Precedence: defaults < `--config` < flags <",
        "`--set`. `--print-config` prints the resolved settings and runs nothing.",
    ]
    for name, cls in COMMANDS.items():
        parts += ["", f"## `sparsekd {name}`", "", markdown(cls)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
