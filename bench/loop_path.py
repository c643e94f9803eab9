"""The pipeline's own work per record, with no Kafka on the records' path: the event loop's CPU
µs an event, before and after in one run.

`pipeline_bench` times whole cases through a broker. On this 2-core machine the broker, the Kafka
clients' threads and the host move a case's CPU figure 10-20% between rounds: more than most
single changes to the pipeline's Python save. This bench runs the same `Pipeline` (the keyword
case's settings, or a cascade's, tracing at 1% as deployed, spans to a local OTLP sink) on the
same chat events, from memory to memory:

- `MemorySource`, a `RecordSource`: `confluent_kafka.Message`s built once, handed over in poll
  batches of up to `POLL_BATCH` from a thread of its own, tracked by the pipeline's offset tracker under
  its intake limit, positions committed (to the tracker) as they advance, as the Kafka source does;
- `MemorySink`, an `OutputSink`: each output fitted and encoded by the pipeline's size budget,
  as the Kafka sink does before `produce`, and reported delivered when the loop next serves it.

A broker runs for the pipeline's start-up only (the size budget reads the output topics'
limits); no record reaches it. Left out, on purpose: librdkafka (`produce`, its delivery
reports, the consumer's fetches, its threads). So read the figure as what our Python costs on
the loop, not as a case's cost: a change to the Kafka sink or source does not show here. Each
side runs in a process of its own on its checkout's `consumer` package, alternating round by
round.

The CPU times still move with this VM's host (20-35 µs an event for the same code, in phases).
`--instructions` counts instead: each side runs under valgrind's callgrind at two sizes, the
count taken from the first record handed over to the last output delivered (the window the
case's `Meter` marks, `bench.callgrind`), random numbers seeded so that the same records are
sampled; instructions an event are the difference of the two counts over the difference of the
sizes, so start-up and shutdown cancel out. Spans are not exported every 5 seconds but all as the
window ends, inside it, the exporter warmed up before it (`callgrind.TRACING_COUNTED`): on the
clock, how many exports fell in a window moved the same code's count from 181k to 195k an event;
counted so, the same code moves by about 1%, where its CPU time moves by a third.
Instructions are not time (a cache miss costs none), so a change that moves memory rather than
work needs the CPU figures too.

    python -m bench.loop_path
    git worktree add /tmp/base main && python -m bench.loop_path --baseline /tmp/base --rounds 8
    python -m bench.loop_path --instructions --baseline /tmp/base    # about 4 minutes
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from bench import callgrind
from bench.cases import InstantClassifier, cascade_figures, cpu_classifier, run_ours
from bench.checkouts import baseline_problem
from bench.pipeline_bench import OtlpSink, bench_only, run_case, side_paths, tracing_env
from bench.workload import REPO, Spec, chat_events, report
from consumer.events import Document, Headers
from consumer.kafka.devkafka import KafkaBroker, create_topics
from consumer.kafka.offsets import Ticket
from consumer.kafka.poll import POLL_BATCH, PollingSource
from consumer.kafka.roles import Received, SourceOptions, SourceWiring
from consumer.sinks.roles import SinkOptions, SinkWiring

CASES = ("keyword", "ours", "cascade-lexical", "cascade-embedding")  # ours: pipeline_bench's instant classifier
PARTITIONS = 6
COMMIT_WAIT_S = 0.01  # how long the source waits for room at its intake limit, as the Kafka source does


def messages(events: int, topic: str) -> list[Message]:
    """The bench's chat events as consumed records, spread over the partitions by key."""
    out, offsets = [], [0] * PARTITIONS
    for i, (key, value) in enumerate(chat_events(events)):
        partition = zlib.crc32(key) % PARTITIONS
        out.append(Message(topic=topic, partition=partition, offset=offsets[partition], key=key, value=value,
                           timestamp=(1, 1_764_331_200_000 + 37 * i)))  # fmt: skip
        offsets[partition] += 1
    return out


class MemorySource(PollingSource):
    """A `RecordSource` on records held in memory (see the module's text), on the poll thread's own
    lifecycle (`PollingSource`): each step hands over the next poll batch that the intake limit
    has room for; at the limit it commits (to the tracker) and waits, as the Kafka source does."""

    def __init__(self, records: list[Message], options: SourceOptions, wiring: SourceWiring):
        super().__init__(_NoClient(), wiring.tracker, wiring.deliver, wiring.on_fatal, options.max_in_flight_events,
                         options.max_in_flight_bytes, options.commit_interval_s, "memory-poll")  # fmt: skip
        self.assigned.update((m.topic(), m.partition()) for m in records)
        self._records = records
        self._at = 0

    def _begin(self) -> None:
        return None

    def _step(self) -> Received:
        tracker, records, at = self._tracker, self._records, self._at
        if at == len(records) or not self._accepting or self._held:
            self._stop.wait(COMMIT_WAIT_S)
            return []
        room = min(POLL_BATCH, self._max_events - tracker.uncommitted(), len(records) - at)
        if room <= 0 or tracker.in_flight_bytes >= self._max_bytes:
            self._persist(final=False)
            tracker.wait_for_room(self._max_events, self._max_bytes, COMMIT_WAIT_S)
            return []
        batch = records[at : at + room]
        self._at = at + room
        return list(
            zip(batch, tracker.track_many([(m.topic(), m.partition(), m.offset(), len(m.value())) for m in batch]))
        )

    def _persist(self, final: bool) -> None:
        positions = self._tracker.commit_positions()
        if positions:
            self._tracker.mark_committed(positions)


class _NoClient:
    """What `PollingSource` closes when its thread ends: no Kafka client here."""

    def close(self) -> None:
        return None


class MemorySink:
    """An `OutputSink` that keeps nothing (see the module's text)."""

    def __init__(self, options: SinkOptions, wiring: SinkWiring):
        self._budget = wiring.budget
        self._on_delivered = wiring.on_delivered
        self._delivered: list[Ticket] = []
        self.held_back = 0
        self.verdicts_delivered = 0
        self.dead_letters_delivered = 0

    def start(self) -> None:
        return None

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._budget.verdict(verdict, record, headers)  # fitted and encoded, as the Kafka sink sends it
        self.verdicts_delivered += 1
        self._delivered.append(ticket)

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._budget.dead_letter(letter, record, headers)
        self.dead_letters_delivered += 1
        self._delivered.append(ticket)

    def awaiting_reports(self) -> bool:
        return bool(self._delivered)

    def serve(self) -> None:
        if self._delivered:
            delivered, self._delivered = self._delivered, []
            self._on_delivered(delivered)

    def flush(self, timeout: float) -> int:
        self.serve()
        return 0

    def close(self) -> None:
        return None


def side(case: str, spec: Spec) -> dict[str, Any]:
    """One round of one side, in this process: the case's pipeline over `spec.events` records."""
    if spec.options.get("counted"):
        random.seed(0)  # trace ids and the sampler's draws: the same records sampled on each side
    records = messages(spec.events, spec.input_topic)
    sinks: list[MemorySink] = []

    def sink(options: SinkOptions, wiring: SinkWiring) -> MemorySink:
        sinks.append(MemorySink(options, wiring))
        return sinks[-1]

    classifier = InstantClassifier() if case == "ours" else cpu_classifier(case)
    meter, _ = run_ours(spec, classifier, lambda options, wiring: MemorySource(records, options, wiring), sink)
    delivered = sinks[0].verdicts_delivered + sinks[0].dead_letters_delivered
    if delivered != spec.events:
        raise SystemExit(f"{delivered} outputs for {spec.events} records")
    return meter.result(spec.events, **cascade_figures(classifier), verdicts=sinks[0].verdicts_delivered,
                        dead_letters=sinks[0].dead_letters_delivered)  # fmt: skip


def counted(checkout: Path, case: str, spec: Spec, env: dict[str, str], folder: Path, timeout: float) -> int:
    """Instructions from the first record handed over to the last output delivered, under callgrind."""
    cwd, path = side_paths(checkout)
    command = [sys.executable, "-m", "bench.loop_path", "--side", case, spec.to_json()]
    out = folder / f"{len(list(folder.iterdir()))}.callgrind"
    return callgrind.count_window(command, cwd, {**env, "PYTHONPATH": path}, out, timeout)


def count_instructions(sides: dict[str, Path], case: str, spec: Spec, env: dict[str, str], timeout: float) -> None:
    """`--instructions`: instructions an event of each side, and this checkout's over the baseline's."""
    small, large = callgrind.SIZES
    per_event: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="loop-path-callgrind-") as folder:
        for name, checkout in sides.items():
            print(f"  {name}: {small} and {large} records under callgrind ...", file=sys.stderr, flush=True)
            counts = [
                counted(checkout, case, replace(spec, events=n), env, Path(folder), timeout) for n in (small, large)
            ]
            per_event[name] = callgrind.per_event((counts[0], counts[1]), callgrind.SIZES)
            print(f"{name:13s} {per_event[name]:9.0f} instructions an event ({small} records: {counts[0]:,}; "
                  f"{large}: {counts[1]:,})")  # fmt: skip
    if "baseline" in per_event:
        print(f"this checkout / baseline: {per_event['this checkout'] / per_event['baseline']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES, default="keyword")
    parser.add_argument(
        "--events",
        type=int,
        default=100_000,
        help="records a round (timing; --instructions runs each side at 1000 and 4000)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians and ranges are printed")
    parser.add_argument("--trace-ratio", type=float, default=0.01, help="the sampler's ratio; 0: tracing off")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="another checkout, measured side by side")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under valgrind instead of timing (the same code within about 1%%; about 6 minutes)",
    )
    parser.add_argument("--case-timeout", type=float, default=600.0)
    parser.add_argument("--side", nargs=2, metavar=("CASE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        report(side(args.side[0], Spec.from_json(args.side[1])))
        return 0
    if args.instructions and not callgrind.available():
        parser.error(f"--instructions {callgrind.MISSING}")
    sides = {"this checkout": REPO}
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        problem = baseline_problem(args.baseline)
        if problem:
            parser.error(f"--baseline {args.baseline}: {problem}")
        sides["baseline"] = args.baseline
    data_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = KafkaBroker(data_dir)
    otlp = OtlpSink()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    try:
        print("starting Kafka (for the pipeline's start-up only) ...", file=sys.stderr, flush=True)
        broker.start(timeout=120)
        create_topics(broker.bootstrap, "loop-out", "loop-dlq", partitions=PARTITIONS)
        spec = Spec(broker.bootstrap, "loop-in", "loop-out", "loop-dlq", "loop-path", args.events)
        env = tracing_env(args.trace_ratio, otlp.endpoint)
        if args.instructions:
            print(f"{args.case}, from memory to memory, tracing at {args.trace_ratio:g}, under callgrind")
            env |= callgrind.TRACING_COUNTED
            count_instructions(sides, args.case, replace(spec, options={"counted": True}), env, args.case_timeout)
            return 0
        for n in range(args.rounds):
            for name, checkout in sides.items():
                print(f"  round {n + 1}: {name} ...", file=sys.stderr, flush=True)
                result = run_case(sys.executable, "bench.loop_path", ["--side", args.case, spec.to_json()],
                                  args.case_timeout, root=checkout, env=env)  # fmt: skip
                if "error" in result:
                    raise SystemExit(f"{name}: {result['error']}")
                rounds[name].append(result)
    finally:
        otlp.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        if args.baseline is not None:
            shutil.rmtree(bench_only(), ignore_errors=True)  # the link only, never what it points to
    print(f"{args.case}, {args.events} events from memory to memory, tracing at {args.trace_ratio:g}, "
          f"{args.rounds} rounds; the event loop's CPU µs an event (the source's thread beside)")  # fmt: skip
    for name, results in rounds.items():
        main_us = [r["cpu_us_main"] for r in results]
        poll_us = [r["cpu_us_poll"] for r in results]
        print(f"{name:13s} {statistics.median(main_us):6.2f} (rounds {', '.join(f'{x:.2f}' for x in main_us)}); "
              f"source {statistics.median(poll_us):.2f}")  # fmt: skip
    if args.baseline is not None:
        ratios = [a["cpu_us_main"] / b["cpu_us_main"] for a, b in zip(rounds["this checkout"], rounds["baseline"])]
        print(f"this checkout / baseline, paired round by round: median {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
