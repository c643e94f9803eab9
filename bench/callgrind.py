"""Instructions a case runs in its measured window, counted by valgrind's callgrind.

This VM has no hardware counters (`perf stat`: not supported) and its CPU times move by a third
for the same code, in phases of the host's; an instruction count moves by a percent or two. A
case marks both ends of its window (`bench.workload.mark_window`, a `getsid` call, in `Meter`),
callgrind dumps its counts before each (`--dump-before=getsid`), and the second dump holds the
window, all of the process's threads together. Run at two sizes, the difference of the counts
over the difference of the sizes is the instructions an event, start-up and shutdown cancelled.

Instructions are not time: a cache miss or a system call costs none, and what a thread does by
the clock (a timer, a poll timeout) happens about fifty times as often an event under valgrind,
which runs that much slower.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

MISSING = "needs valgrind (Debian's package valgrind)"
SIZES = (1000, 4000)  # events of the two runs of each counted side

# Spans exported when the count says, not by the clock: the batch span processor exports every
# 5 s, which under valgrind comes about fifty times as often an event, each export's fixed cost
# over a handful of spans, and how many fell in a window moved a count by several percent. With
# exports by batches of 16 instead, the export thread lagged behind under valgrind (what it had
# not sent by the window's end went uncounted) and the first export's one-time costs fell in one
# run's window and not the other's: 1% sampled counted more than 10%. So a counted case (its
# spec's option "counted", `bench.cases`) exports a span before its window (the exporter's
# connection and first-use costs), holds the rest (this delay, batches of 512 as deployed) and
# exports them all as its window ends, inside it: every sampled span's export counted once.
TRACING_COUNTED = {"OTEL_BSP_SCHEDULE_DELAY": "3600000"}


def available() -> bool:
    return shutil.which("valgrind") is not None


def count_window(command: list[str], cwd: Path, env: dict[str, str], out: Path, timeout: float) -> int:
    """Run `command` under callgrind; the instructions of its window (between its first two marks).
    `out`: callgrind's output file (its dumps are written beside it, `.1`, `.2`, ...)."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no", "--dump-before=getsid",
         f"--callgrind-out-file={out}", *command],
        cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    window = Path(f"{out}.2")  # dumps: .1 up to the window, .2 the window, then the rest
    if done.returncode != 0 or not window.is_file():
        raise SystemExit(f"{' '.join(command[:3])}: exit {done.returncode}: {done.stderr[-1500:]}")
    found = re.search(r"^(?:summary|totals): (\d+)", window.read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit(f"{window}: no instruction count in callgrind's output")
    return int(found.group(1))


def per_event(counts: tuple[int, int], sizes: tuple[int, int]) -> float:
    """Instructions an event from the counts of two runs of `sizes` events."""
    return (counts[1] - counts[0]) / (sizes[1] - sizes[0])
