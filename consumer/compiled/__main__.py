"""`python -m consumer.compiled build|status`: the hot path's modules compiled into this environment."""

from __future__ import annotations

import argparse
import os
import sys

from consumer.compiled import DISABLE_ENV, HOT_MODULES, build, directory, disabled, installed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.compiled",
        description="The hot path's modules compiled by Cython: build them into this environment, or say which run compiled.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help=f"compile the hot modules into {directory()} (unchanged ones are kept)")
    sub.add_parser("status", help="which hot modules run compiled here, and which as source (and why)")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            built = build()
        except ImportError as exc:
            print(f"compiled: cannot build ({exc}); the sources run as they are", file=sys.stderr)
            return 1
        for module, why in built.failed.items():
            print(f"compiled: {module} not compiled, its source runs: {why}", file=sys.stderr)
        print(f"compiled: {len(built.compiled)} compiled, {len(built.unchanged)} unchanged, {len(built.failed)} failed "
              f"({directory()})", file=sys.stderr)  # fmt: skip
        return 1 if built.failed else 0
    finder = installed()
    for module in HOT_MODULES:
        __import__(module)
    loaded = set(finder.loaded) if finder else set()
    stale = set(finder.stale) if finder else set()
    for module in HOT_MODULES:
        how = (
            "compiled" if module in loaded else "source (edited since it was compiled)" if module in stale else "source"
        )
        print(f"{module}: {how}")
    if finder is None:
        why = f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}" if disabled() else f"nothing built in {directory()}"
        print(f"all from source: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
