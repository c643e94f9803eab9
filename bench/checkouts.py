"""Another checkout measured beside this one (`--baseline`): its compiled part built and loaded.

A `git worktree` holds the sources only, and importing its Python modules by path still finds
this checkout's compiled module under the same package name. So the benches build the other
checkout's `_ngrams.c` in place (as `pip install` does) and load that build by its path:
otherwise the before side of a before/after would run this checkout's C code, or the numpy
fallback, and the ratio would measure that too.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

NGRAMS = Path("consumer") / "classify" / "cascade" / "_ngrams.c"


def baseline_problem(checkout: Path) -> str | None:
    """Why `checkout` cannot be measured as a `--baseline`, or None: it must be a checkout of this
    project, its compiled part built in place."""
    if not (checkout / "consumer" / "pipeline").is_dir():
        return "not a safeguard-consumer checkout"
    return compiled_in_place(checkout)


def compiled_in_place(checkout: Path) -> str | None:
    """Build `checkout`'s `_ngrams.c` beside it unless built already: None when built (or the
    checkout has none), else why not."""
    source = checkout / NGRAMS
    if not source.is_file() or _built(checkout) is not None:
        return None
    print(f"building {NGRAMS} of {checkout} in place (setup.py build_ext) ...", file=sys.stderr, flush=True)
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=checkout,
                           capture_output=True, text=True, check=False)  # fmt: skip
    if built.returncode != 0 or _built(checkout) is None:
        return f"could not build its {NGRAMS} (a C compiler and Python's headers are needed): {built.stderr[-500:]}"
    return None


def compiled_ngrams(checkout: Path) -> ModuleType | None:
    """`checkout`'s own compiled `_ngrams` module (built first if need be), or None without one."""
    if compiled_in_place(checkout) is not None:
        return None
    path = _built(checkout)
    if path is None:
        return None
    # A name of its own, so this checkout's module (same file name, same init function) stays as it is.
    loader = importlib.machinery.ExtensionFileLoader("baseline_checkout._ngrams", str(path))
    spec = importlib.util.spec_from_file_location("baseline_checkout._ngrams", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _built(checkout: Path) -> Path | None:
    source = checkout / NGRAMS
    return next(iter(sorted(source.parent.glob("_ngrams.*.so"))), None)
