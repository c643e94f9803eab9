"""consumer.compiled: the hot path's modules compiled by Cython run in place of their sources,
only while those sources are the ones compiled. The build here is real (Cython and the C
compiler, as `scripts/bootstrap` runs them), on a small package of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from consumer import compiled

ROOT = Path(__file__).resolve().parents[2]


def _cython_or_skip() -> None:
    try:
        import Cython  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Cython not found: scripts/bootstrap installs requirements/compile.txt")
        pytest.skip("Cython is not installed (pip install -r requirements/compile.txt)")


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package `hotdemo` (an __init__ and a module) under tmp_path/src, forgotten afterwards."""
    src = tmp_path / "src"
    (src / "hotdemo").mkdir(parents=True)
    (src / "hotdemo" / "__init__.py").write_text("from hotdemo.mod import double\n\nKIND = 'package'\n")
    (src / "hotdemo" / "mod.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Pair:\n    a: int\n    b: int = 2\n\n\n"
        "def double(x):\n    return [v * 2 for v in x]\n\n\nasync def later(x):\n    return x + 1\n"
    )
    sys.path.insert(0, str(src))
    yield src
    sys.path.remove(str(src))
    for name in [m for m in sys.modules if m == "hotdemo" or m.startswith("hotdemo.")]:
        del sys.modules[name]


def _import_with(folder: Path) -> tuple[compiled.CompiledFinder, ModuleType, ModuleType]:
    finder = compiled.CompiledFinder(folder, json.loads((folder / compiled.MANIFEST).read_text())["modules"])
    sys.meta_path.insert(0, finder)
    try:
        import hotdemo.mod

        return finder, sys.modules["hotdemo"], hotdemo.mod
    finally:
        sys.meta_path.remove(finder)


def test_built_modules_run_compiled_and_an_edited_source_runs_as_source(package: Path, tmp_path: Path) -> None:
    _cython_or_skip()
    folder = tmp_path / "out"
    built = compiled.build(["hotdemo", "hotdemo.mod"], root=package, folder=folder)
    assert built.failed == {} and sorted(built.compiled) == ["hotdemo", "hotdemo.mod"]
    assert not list(package.rglob("*.so")) and not list(package.rglob("*.c"))  # nothing beside the sources

    finder, pkg, mod = _import_with(folder)
    assert finder.loaded == ["hotdemo", "hotdemo.mod"] and finder.stale == []
    assert pkg.__file__.endswith(".so") and mod.__file__.endswith(".so")
    assert pkg.__path__ == [str(package / "hotdemo")]  # a package still: its submodules are found
    assert pkg.KIND == "package" and mod.double([1, 2]) == [2, 4] and pkg.double is mod.double
    assert mod.Pair(1) == mod.Pair(1, 2) and repr(mod.Pair(3)) == "Pair(a=3, b=2)"  # dataclasses as in Python
    import asyncio

    assert asyncio.run(mod.later(1)) == 2

    # Unchanged: nothing compiled again. Edited: its compiled copy is not used, the source is.
    assert compiled.build(["hotdemo", "hotdemo.mod"], root=package, folder=folder).unchanged == [
        "hotdemo",
        "hotdemo.mod",
    ]
    for name in ("hotdemo", "hotdemo.mod"):
        del sys.modules[name]
    (package / "hotdemo" / "mod.py").write_text("def double(x):\n    return [v * 3 for v in x]\n")
    finder, pkg, mod = _import_with(folder)
    assert finder.loaded == ["hotdemo"] and finder.stale == ["hotdemo.mod"]
    assert mod.__file__ == str(package / "hotdemo" / "mod.py") and mod.double([1]) == [3]

    again = compiled.build(["hotdemo", "hotdemo.mod"], root=package, folder=folder)
    assert again.compiled == ["hotdemo.mod"] and again.unchanged == ["hotdemo"]


def test_a_module_cython_refuses_is_left_to_its_source_and_said(package: Path, tmp_path: Path) -> None:
    _cython_or_skip()
    (package / "hotdemo" / "bad.py").write_text("def f(:\n    pass\n")
    built = compiled.build(["hotdemo.mod", "hotdemo.bad"], root=package, folder=tmp_path / "out")
    assert built.compiled == ["hotdemo.mod"] and list(built.failed) == ["hotdemo.bad"]
    manifest = json.loads((tmp_path / "out" / compiled.MANIFEST).read_text())["modules"]
    assert sorted(manifest) == ["hotdemo.mod"]


def _run(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_this_environment_runs_the_hot_path_compiled_unless_told_not_to() -> None:
    """What `scripts/bootstrap` built: every hot module compiled (CI builds them from this very
    checkout); SAFEGUARD_COMPILED=0 runs the sources."""
    probe = (
        "import importlib, consumer.compiled as c; print(*(importlib.import_module(m).__file__ for m in c.HOT_MODULES))"
    )
    files = _run(probe).split()
    if not (compiled.directory() / compiled.MANIFEST).is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"nothing compiled in {compiled.directory()}: scripts/bootstrap runs python -m consumer.compiled build"
            )
        pytest.skip(f"nothing compiled in {compiled.directory()} (python -m consumer.compiled build)")
    as_source = [m for m, f in zip(compiled.HOT_MODULES, files) if not f.endswith(".so")]
    if os.environ.get("CI") == "true":
        assert as_source == []
    assert all(f.endswith(".py") for f in _run(probe, SAFEGUARD_COMPILED="0").split())


def test_status_names_each_hot_module_and_how_it_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "consumer.compiled", "status"], capture_output=True, text=True,
                         timeout=120, check=True, cwd=ROOT, env={**os.environ, "SAFEGUARD_COMPILED": "0"}).stdout  # fmt: skip
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[: len(compiled.HOT_MODULES)]] == list(compiled.HOT_MODULES)
    assert all(line.endswith(": source") for line in lines[: len(compiled.HOT_MODULES)])
    assert lines[-1] == "all from source: SAFEGUARD_COMPILED=0"
