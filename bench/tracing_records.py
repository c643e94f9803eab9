"""An unsampled record's tracing alone: µs per record of its span, its `traceparent` and its end.

No Kafka: records without headers (each a root, as the pipeline bench's input is), a poll
batch at a time, the tracer provider built from `OTEL_*` as `run` builds it, at a ratio of 0 so
that every record takes the unsampled way (what 99% of records take at the deployed 1%). Each
side runs in a process of its own with its checkout's `consumer` package first on the path,
the sides alternating round by round, so `--baseline` measures another checkout's code beside
this one's (one from before `Telemetry.record_spans` is asked one record at a time):

    python -m bench.tracing_records
    git worktree add /tmp/base main && python -m bench.tracing_records --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _Record:
    """What the span of a consumed record without headers reads of it."""

    def headers(self) -> None:
        return None

    def topic(self) -> str:
        return "chat"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0

    def key(self) -> bytes:
        return b"channel-7"


def measure(records: int, batch: int) -> float:
    """µs of this thread's CPU per record (in the side's own process)."""
    os.environ.update({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0"})  # fmt: skip
    from consumer.pipeline.telemetry import Telemetry
    from consumer.pipeline.telemetry.tracing import inject, tracer_provider_from_env

    telemetry = Telemetry.create("bench", tracer_provider=tracer_provider_from_env())
    spans_of = getattr(telemetry, "record_spans", None)
    if spans_of is None:  # a checkout from before record_spans
        spans_of = lambda messages: [telemetry.record_span(m) for m in messages]
    messages = [_Record() for _ in range(batch)]
    started = time.thread_time()
    for _ in range(records // batch):
        for span in spans_of(messages):
            if span.is_recording():
                raise SystemExit("a span was sampled at a ratio of 0")
            inject(span)
            span.end()
    return (time.thread_time() - started) / (records // batch * batch) * 1e6


def _side(checkout: Path, records: int, batch: int) -> float:
    """One round of one side: this file run as a script, `checkout` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, __file__, "--side", "--records", str(records), "--batch", str(batch)],
                          cwd=checkout, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {done.stderr[-1000:]}")
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_records", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="records per poll batch (the pipeline's most)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median and range are printed")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured side by side")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(f"{measure(args.records, args.batch):.4f}")
        return
    sides = {"this checkout": REPO}
    if args.baseline:
        if not (args.baseline / "consumer" / "pipeline" / "telemetry").is_dir():
            raise SystemExit(f"--baseline {args.baseline}: no consumer/pipeline/telemetry there "
                             "(give a checkout of this repo)")
        sides["baseline"] = args.baseline
    print(f"{args.records} records without headers, {args.batch} a batch, ratio 0, {args.rounds} rounds")
    figures: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, checkout in sides.items():
            figures[name].append(_side(checkout, args.records, args.batch))
    for name, rounds in figures.items():
        print(f"{name:13s} {statistics.median(rounds):5.2f} µs a record (rounds {min(rounds):.2f}-{max(rounds):.2f})")
    if args.baseline:
        ratios = [a / b for a, b in zip(figures["this checkout"], figures["baseline"])]
        print(f"this checkout / baseline, round by round: {statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
