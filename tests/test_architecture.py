"""The architecture contract: the layers of `consumer/`, who may import vLLM and confluent_kafka, and the one
list of stage names.

The import contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them.
The stage names live in `consumer.stages`; `stage_name_literals` finds a module that spells one
where a stage is meant. Each check is also run over a copy of the package broken on purpose, so
a check that silently stopped finding anything would fail here too.
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consumer import stages
from consumer.config.cascade import CascadeSettings, PolicyOverrides, PolicyPlan

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the `consumer` package found in `root`, with `root`'s pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "COLUMNS": "200"}, capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def test_the_package_keeps_its_layers_and_its_engine_and_kafka_client_boundaries():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # upward: a layer importing one above it (which also closes a cycle between the two)
        ("kafka/source.py", "from consumer.pipeline import batcher", ("layers", "no import cycles")),
        ("decode/plain_json.py", "from consumer.pipeline import chat", ("layers", "no import cycles")),
        # the sinks' place: above the Kafka plumbing, below the stages that send outputs
        ("sinks/fan_out.py", "from consumer.classify import Classifier", ("layers",)),
        ("kafka/budget.py", "from consumer.sinks import roles", ("layers", "no import cycles")),
        ("decode/plain_json.py", "import vllm", ("vllm and openai_harmony",)),
        ("pipeline/outputs.py", "from consumer.pipeline import pipeline", ("no import cycles",)),
        # the Kafka client straight from a layer above Kafka I/O, not through consumer.kafka.client
        ("review/loop.py", "from confluent_kafka import Producer", ("confluent_kafka only",)),
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
    assert f"{4 - len(broken)} kept, {len(broken)} broken" in result.stdout


def stage_name_literals(package: Path) -> list[str]:
    """Where a module under `package` spells a stage name as a literal where a stage is meant:
    compared with something named stage (`outcome.stage == "lexical"`, `.get("stage") in (...)`),
    passed as `stage=`, used as a key of the `decided` counts, assigned as a stage's `name`, or
    listed with another stage name in one collection. `consumer/stages.py` is the one place."""
    names = set(stages.ALL)
    found = []

    def stage_literals(node: ast.AST) -> int:
        return sum(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(node))

    for path in sorted(package.rglob("*.py")):
        if path == package / "stages.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                hit = any("stage" in ast.unparse(o) for o in operands) and any(stage_literals(o) for o in operands)
            elif isinstance(node, ast.keyword):
                hit = node.arg == "stage" and stage_literals(node.value) > 0
            elif isinstance(node, ast.Subscript):
                hit = "decided" in ast.unparse(node.value) and stage_literals(node.slice) > 0
            elif isinstance(node, ast.Assign):
                hit = any(isinstance(t, ast.Name) and t.id == "name" for t in node.targets) and (
                    isinstance(node.value, ast.Constant) and node.value.value in names
                )
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                hit = stage_literals(node) >= 2
            else:
                continue
            if hit:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_the_stage_registry_is_the_only_list_of_stage_names():
    assert stage_name_literals(REPO / "consumer") == []
    # Every stage the cascade can switch on and off has its switch in the settings and the plan.
    for fields in (CascadeSettings.model_fields, PolicyOverrides.model_fields,
                   {f.name for f in dataclasses.fields(PolicyPlan)}):  # fmt: skip
        assert set(stages.SWITCHABLE) <= set(fields)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("review/items.py", "LATE = lambda outcome: outcome.stage == 'lexical'"),
        ("review/desk.py", "CHEAP = ('lexical', 'embedding')"),
        ("classify/cascade/cascade.py", "FIRST = lambda counters: counters.decided['cache']"),
        ("classify/cascade/verdicts.py", "HUMAN = lambda: Classification(violation=False, stage='human')"),
    ],
)
def test_a_stage_name_spelt_outside_the_registry_is_found(tmp_path: Path, module: str, line: str):
    shutil.copytree(REPO / "consumer", tmp_path / "consumer", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "consumer" / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    (found,) = stage_name_literals(tmp_path / "consumer")
    assert found.startswith(f"consumer/{module}:")
