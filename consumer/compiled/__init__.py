"""The hot path's modules compiled by Cython as they are, run in place of their source where built.

A record of the keyword path passes through the modules of `HOT_MODULES` (decode, route, the
keyword search, the output step, the offset tracker, the size budget, the Kafka sink, tracing
and metrics), and the cascade's cheap stages through a few more. Compiled unchanged (Cython's
pure-Python mode, annotations not read as C types), they execute fewer instructions an event
than the interpreter does (docs/benchmark.md, issue 31): the same code without the bytecode
dispatch.

- `build()` (`python -m consumer.compiled build`, run by `scripts/bootstrap` and the
  Dockerfile) compiles them into `directory()`, under the environment's prefix, never beside
  the sources, and writes a manifest of each source's SHA-256.
- `install()` (from `consumer/__init__.py`) puts a finder first on `sys.meta_path` that loads a
  module's compiled copy only while its source is the one that was compiled. A module edited
  since, one that failed to compile, a machine without a C compiler or Cython: the source runs,
  as it always can. `SAFEGUARD_COMPILED=0` runs the sources whatever was built.

So a compiled copy never shadows an edited source (the trap of `build_ext --inplace`), and one
environment shared by several checkouts runs each checkout's own code.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What a keyword record runs, poll to produce (module names; a package's name means its __init__).
HOT_MODULES = (
    "consumer.kafka.poll",
    "consumer.kafka.source",
    "consumer.kafka.offsets",
    "consumer.kafka.budget",
    "consumer.kafka.records",
    "consumer.decode.plain_json",
    "consumer.decode.wire",
    "consumer.decode.fields",
    "consumer.policy.route",
    "consumer.classify.keyword",
    "consumer.classify.evaluate",
    "consumer.pipeline.pipeline",
    "consumer.pipeline.classify_step",
    "consumer.pipeline.output_step",
    "consumer.pipeline.outputs",
    "consumer.pipeline.chat",
    "consumer.pipeline.telemetry",
    "consumer.pipeline.telemetry.tracing",
    "consumer.pipeline.telemetry.metrics",
    "consumer.pipeline.telemetry.drift",
    "consumer.pipeline.telemetry.otlp_encoding",
    "consumer.sinks.kafka",
    "consumer.review.desk",
    # The cascade's cheap stages, the Python around their numpy and C (the lexical and static cases).
    "consumer.classify.cascade.cascade",
    "consumer.classify.cascade.cache",
    "consumer.classify.cascade.stage",
    "consumer.classify.cascade.lexical",
    "consumer.classify.cascade.static",
    "consumer.classify.cascade.hashing",
    "consumer.classify.cascade.calibrate",
    "consumer.classify.cascade.verdicts",
    "consumer.classify.cascade.counters",
)
DISABLE_ENV = "SAFEGUARD_COMPILED"  # 0 (or false, no, off): run the sources
# Python semantics kept: annotations are not C types, functions stay introspectable.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}
MANIFEST = "manifest.json"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the `consumer` package


def directory() -> Path:
    """Where this environment's compiled modules live: under its prefix, one folder per Python."""
    return Path(sys.prefix) / "share" / "safeguard-consumer" / f"compiled-{sys.implementation.cache_tag}"


def source_of(module: str, root: Path = SOURCE_ROOT) -> Path:
    """The source file of a module under `root`: `a/b.py`, or `a/b/__init__.py` for a package."""
    base = root.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.is_file() else base.with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled copy of a module in the manifest whose source has not changed since it
    was compiled; for anything else it answers None and the usual finders go on."""

    def __init__(self, folder: Path, modules: dict[str, dict[str, str]]):
        self.folder = folder
        self.modules = modules
        self.loaded: list[str] = []
        self.stale: list[str] = []  # compiled, but their source changed since: run as source

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self.modules.get(fullname)
        if entry is None:
            return None
        source = importlib.machinery.PathFinder.find_spec(fullname, path)
        if source is None or not source.has_location or source.origin is None:
            return None
        binary = self.folder / entry["binary"]
        try:
            current = digest(Path(source.origin))
        except OSError:
            return None
        if current != entry["sha256"] or not binary.is_file():
            self.stale.append(fullname)
            return None
        self.loaded.append(fullname)
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(binary))
        return importlib.util.spec_from_file_location(
            fullname, binary, loader=loader, submodule_search_locations=source.submodule_search_locations
        )


def install() -> CompiledFinder | None:
    """Put the finder first on `sys.meta_path` when this environment has compiled modules (once)."""
    for finder in sys.meta_path:
        if isinstance(finder, CompiledFinder):
            return finder
    if disabled():
        return None
    folder = directory()
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        modules = manifest["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finder = CompiledFinder(folder, modules)
    sys.meta_path.insert(0, finder)
    return finder


def disabled() -> bool:
    """Whether `SAFEGUARD_COMPILED` says to run the sources (0, false, no or off)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"0", "false", "no", "off"}


def installed() -> CompiledFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, CompiledFinder)), None)


@dataclass
class Built:
    compiled: list[str] = field(default_factory=list)  # built by this call
    unchanged: list[str] = field(default_factory=list)  # built before, source unchanged
    failed: dict[str, str] = field(default_factory=dict)  # module: why


def build(
    modules: Sequence[str] = HOT_MODULES, root: Path = SOURCE_ROOT, folder: Path | None = None, jobs: int | None = None
) -> Built:
    """Compile `modules` (their sources under `root`) into `folder` and record them in its manifest.
    A module whose source is unchanged since its last build is not compiled again. Raises
    ImportError without Cython or setuptools."""
    import tempfile

    from Cython.Build import cythonize
    from setuptools import Extension

    folder = folder or directory()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads((folder / MANIFEST).read_bytes())["modules"]
    except (OSError, ValueError, KeyError):
        known = {}
    result = Built()
    todo: dict[str, tuple[Path, str]] = {}
    for module in modules:
        source = source_of(module, root)
        sha = digest(source)
        entry = known.get(module)
        if entry and entry["sha256"] == sha and (folder / entry["binary"]).is_file():
            result.unchanged.append(module)
        else:
            todo[module] = (source, sha)
    manifest = {m: known[m] for m in result.unchanged}
    if todo:
        with tempfile.TemporaryDirectory(prefix="safeguard-compile-") as scratch:
            extensions = {}
            for module, (source, _) in todo.items():  # one at a time: what Cython refuses costs only its own
                try:
                    # -w: the generated C's warnings say nothing about the module.
                    extension = Extension(module, [str(source)], extra_compile_args=["-w"])
                    (extensions[module],) = cythonize(
                        [extension], build_dir=scratch, compiler_directives=DIRECTIVES, quiet=True, force=True
                    )
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - the source runs instead; say why
                    result.failed[module] = f"{type(exc).__name__}: {exc}".strip()
            # All at once, in parallel; if the C compiler fails on one, one at a time to find it.
            try:
                binaries = _compile(list(extensions.values()), folder, scratch, jobs)
            except (Exception, SystemExit):  # noqa: BLE001
                binaries = {}
                for module, extension in extensions.items():
                    try:
                        binaries |= _compile([extension], folder, scratch, 1)
                    except (Exception, SystemExit) as exc:  # noqa: BLE001
                        result.failed[module] = f"{type(exc).__name__}: {exc}".strip()
            for module, binary in binaries.items():
                manifest[module] = {"sha256": todo[module][1], "binary": binary}
                result.compiled.append(module)
    # Replaced whole: a process starting meanwhile reads the old manifest or the new, never half of one.
    scratch_manifest = folder / f"{MANIFEST}.{os.getpid()}"
    scratch_manifest.write_text(json.dumps({"modules": manifest}, indent=1, sort_keys=True))
    os.replace(scratch_manifest, folder / MANIFEST)
    return result


def _compile(extensions: list, folder: Path, scratch: str, jobs: int | None) -> dict[str, str]:
    """The C compiler's part: each extension's binary under `folder`, by module name."""
    from setuptools import Distribution

    dist = Distribution({"ext_modules": extensions, "script_name": "compiled", "script_args": []})
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(folder)
    command.build_temp = str(Path(scratch) / "temp")
    command.parallel = jobs or os.cpu_count() or 1
    dist.run_command("build_ext")
    return {e.name: str(Path(command.get_ext_fullpath(e.name)).relative_to(folder)) for e in extensions}
