"""The architecture contract: the layers of `consumer/` and who may import vLLM.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them. The
second test breaks a copy of the package on purpose, so a contract that silently stopped
checking anything would fail here too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the `consumer` package found in `root`, with `root`'s pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "COLUMNS": "200"}, capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def test_the_package_keeps_its_layers_and_its_engine_boundary():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # upward: a layer importing one above it (which also closes a cycle between the two)
        ("kafka/sink.py", "from consumer.pipeline import batcher", ("layers", "no import cycles")),
        ("decode/plain_json.py", "from consumer.pipeline import chat", ("layers", "no import cycles")),
        ("decode/plain_json.py", "import vllm", ("vllm and openai_harmony",)),
        ("pipeline/outputs.py", "from consumer.pipeline import pipeline", ("no import cycles",)),
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, line: str, broken: tuple[str, ...]):
    shutil.copytree(REPO / "consumer", tmp_path / "consumer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "consumer" / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = [line for line in result.stdout.splitlines() if line.endswith((" KEPT", " BROKEN"))]
    assert sorted(v for v in verdicts if v.endswith(" BROKEN")) == sorted(
        v for v in verdicts if v.startswith(broken)
    ), result.stdout
    assert f"{3 - len(broken)} kept, {len(broken)} broken" in result.stdout
