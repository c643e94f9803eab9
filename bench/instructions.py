"""Instructions an event of whole cases through a broker: the issue-31 ratios in a unit this
machine's noise does not move.

`pipeline_bench` times each case's process CPU from its first record read to its last output
acknowledged. On this 2-core VM that figure moves by a third between rounds for the same code (the
host's phases), so a ratio of two cases needs many rounds to settle. This bench runs the same cases
(the same processes: `bench.cases`, and `bench.peer` in the peer's environment) under valgrind's
callgrind and counts the instructions of that same window, every thread of the process together
(the event loop, the poll thread, librdkafka's threads, the exporter's): at 1,000 and 4,000
events, the difference of the counts over the difference of the sizes (`bench.callgrind`). Our
cases trace at 1% to a local OTLP sink, as `pipeline_bench` runs them, with seeded random numbers
so that the same records are sampled in every run.

Read the figures as work, not time: a cache miss, a system call or a wait costs no instructions,
and what a thread does by the clock (librdkafka's timers, a commit a second) happens about fifty
times as often an event under valgrind, which runs that much slower, for every case alike.

    python -m bench.instructions --peer-python ~/.cache/safeguard-consumer/venv-peer-*/bin/python
    python -m bench.instructions --cases peer,keyword     # about 6 minutes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench import callgrind
from bench.callgrind import SIZES
from bench.pipeline_bench import PEER_PYTHON, OtlpSink, case_command, tracing_env
from bench.workload import REPO, Spec, chat_events, produce_events
from consumer.kafka.devkafka import KafkaBroker, create_topics

CASES = ("hand", "peer", "keyword", "cascade-lexical")
OURS = ("keyword", "cascade-lexical")
PARTITIONS = 6
# (case, against, what the ratio is): printed when both cases ran.
RATIOS = (
    ("keyword", "peer", "the issue's CPU target: at most 1.0"),
    ("keyword", "hand", "what the pipeline costs over a hand-written loop"),
    ("cascade-lexical", "keyword", "work, not events/s: the lexical features run beside the loop"),
)


def counted(case: str, spec: Spec, peer_python: str, env: dict[str, str], out: Path, timeout: float) -> int:
    """The instructions of one case's window, in a process of its own under callgrind."""
    python, module, args = case_command(case, spec, peer_python)
    return callgrind.count_window([python, "-m", module, *args], REPO, {**env, "PYTHONPATH": str(REPO)}, out,
                                  timeout)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON), help="the Python of the peer's environment")
    parser.add_argument("--trace-ratio", type=float, default=0.01, help="our cases' sampler ratio; 0: tracing off")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds a case may run under valgrind")
    parser.add_argument(
        "--keep", type=Path, metavar="FOLDER", help="keep callgrind's outputs there (each window: NAME.callgrind.2)"
    )
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    if not callgrind.available():
        parser.error(callgrind.MISSING)
    if "peer" in cases and not Path(args.peer_python).is_file():
        parser.error(f"--peer-python {args.peer_python}: not found (scripts/bootstrap peer prints its environment)")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = KafkaBroker(data_dir)
    otlp = OtlpSink()
    per_event: dict[str, float] = {}
    try:
        print("starting Kafka ...", file=sys.stderr, flush=True)
        broker.start(timeout=120)
        inputs = {}
        for size in SIZES:
            inputs[size] = f"instructions-in-{size}"
            create_topics(broker.bootstrap, inputs[size], partitions=PARTITIONS)
            produce_events(broker.bootstrap, inputs[size], chat_events(size))
        env = tracing_env(args.trace_ratio, otlp.endpoint) | callgrind.TRACING_COUNTED
        print(f"instructions an event, whole process, through Kafka; our cases trace at {args.trace_ratio:g}")
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="instructions-callgrind-") as scratch:
            folder = args.keep or scratch
            for case in cases:
                print(f"  {case}: {SIZES[0]} and {SIZES[1]} events under callgrind ...", file=sys.stderr, flush=True)
                counts = []
                for size in SIZES:
                    name = f"instructions-{case}-{size}"
                    create_topics(broker.bootstrap, f"{name}-out", f"{name}-dlq", partitions=PARTITIONS)
                    spec = Spec(broker.bootstrap, inputs[size], f"{name}-out", f"{name}-dlq", name, size,
                                {"counted": True} if case in OURS else {})  # fmt: skip
                    out = Path(folder) / f"{name}.callgrind"
                    counts.append(counted(case, spec, args.peer_python, env, out, args.case_timeout))
                per_event[case] = callgrind.per_event((counts[0], counts[1]), SIZES)
                print(f"{case:16s} {per_event[case]:9.0f} ({SIZES[0]} events: {counts[0]:,}; "
                      f"{SIZES[1]}: {counts[1]:,})", flush=True)  # fmt: skip
    finally:
        otlp.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    for case, against, what in RATIOS:
        if case in per_event and against in per_event:
            print(f"{case} / {against}: {per_event[case] / per_event[against]:.3f} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
