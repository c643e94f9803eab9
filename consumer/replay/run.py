"""Replay: run the pipeline over a fixed window of a historical topic, and backtest a policy change.

`safeguard-consumer replay` reads the records of one topic between START and END through the
same stages as the live consumer (decode, route, batcher, classifier, dead letters; the
`Pipeline` itself), with two parts swapped in:

- `ReplaySource` in the role of `consumer.kafka.source.Source`: partitions are *assigned*, under a
  group id of the replay's own that never commits, so the live group's committed offsets are
  never touched; it hands on only records inside the window and, instead of committing,
  moves a `Checkpoint` file; it stops the pipeline once every partition reached END and every
  output was delivered.
- `ReplayOutput` in the role of `consumer.kafka.sink.Sink`: stamps each output with `replay`
  (run id, start time, the `id@version` of every policy in force) and hands it to the Kafka
  `Sink` (an output topic) or to `JsonlSink` (a file).

The window is fixed when a replay starts: START and END resolve to offsets per partition
(`offsets_for_times` for times, the high watermark for `now`), so a replay of a live topic
ends. It is stored in the checkpoint, and `--resume` continues the same window with the same
policy versions after an interruption without reclassifying what was delivered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, Optional

import orjson
import typer
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from consumer.classify import Classifier
from consumer.classify.factory import build_classifier
from consumer.config import ConfigError, Settings, format_validation_error, load_settings
from consumer.events import ReplayInfo
from consumer.kafka.offsets import OffsetTracker, Ticket, TopicPartitionKey
from consumer.kafka.sink import Document, Headers, Sink
from consumer.kafka.source import POLL_BATCH, POLL_TIMEOUT_S, Received, close_consumer
from consumer.pipeline.pipeline import Pipeline, RunResult
from consumer.policy import PolicyError, PolicyStore, load_policy
from consumer.policy.route import Router, RoutingError
from consumer.replay.backtest import Outputs, compare, markdown, tables

log = logging.getLogger(__name__)

# A replay never joins the live group: these group options are dropped from the user's
# consumer options, and the rest below cannot be overridden.
GROUP_OPTIONS = ("group.instance.id", "group.protocol", "group.remote.assignor", "partition.assignment.strategy")
REPLAY_CONSUMER_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,  # END may sit behind a transaction marker: EOF says we are past it
    "auto.offset.reset": "earliest",  # a start deleted by retention meanwhile: the oldest record left
}
METADATA_TIMEOUT_S = 10.0
# Verdict timestamps come from the producing clock, which may lag the input's producer.
CLOCK_SLACK = timedelta(hours=1)
EXIT_CONFIG, EXIT_INTERRUPTED = 2, 130


class ReplayError(ValueError):
    """A replay that cannot start as asked; the CLI exits with code 2 and prints this."""


# -- the window --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """`--from`/`--to`: `earliest`, `now`, an offset (the same in every partition), or an
    ISO-8601 time (UTC when it names no zone). A time START is inclusive, a time END exclusive."""

    kind: Literal["earliest", "now", "offset", "time"]
    value: int = 0  # the offset, or the time in milliseconds since the epoch

    @classmethod
    def parse(cls, text: str) -> Bound:
        text = text.strip()
        if text in ("earliest", "now"):
            return cls(text)  # type: ignore[arg-type]
        if text.isdigit():
            return cls("offset", int(text))
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ReplayError(f"{text!r} is not an ISO-8601 time, an offset, 'earliest' or 'now'") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return cls("time", int(moment.timestamp() * 1000))


class PartitionWindow(BaseModel):
    start: int
    end: int  # exclusive
    next: int  # the first offset whose output is not known to be delivered


def resolve_window(
    consumer: Any, topic: str, partitions: list[int] | None, start: Bound, end: Bound
) -> dict[int, PartitionWindow]:
    """Offsets [start, end) per partition, fixed now: `now` and a future END are today's high watermark."""
    found = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ReplayError(f"topic {topic!r} does not exist or cannot be described")
    chosen = partitions or sorted(found.partitions)
    unknown = sorted(set(chosen) - set(found.partitions))
    if unknown:
        raise ReplayError(f"topic {topic!r} has no partition {', '.join(map(str, unknown))}")
    marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S) for p in chosen}

    def offsets(bound: Bound) -> dict[int, int]:
        if bound.kind == "time":
            query = [TopicPartition(topic, p, bound.value) for p in chosen]
            answers = consumer.offsets_for_times(query, timeout=METADATA_TIMEOUT_S)
            for tp in answers:
                if tp.error is not None:
                    raise ReplayError(f"cannot look up a time in {topic}[{tp.partition}]: {tp.error}")
            # -1: no record at or after that time yet, so the window ends (or starts) at today's end
            return {tp.partition: marks[tp.partition][1] if tp.offset < 0 else tp.offset for tp in answers}
        low_high = {"earliest": 0, "now": 1}
        if bound.kind in low_high:
            return {p: marks[p][low_high[bound.kind]] for p in chosen}
        return {p: min(max(bound.value, marks[p][0]), marks[p][1]) for p in chosen}

    starts, ends = offsets(start), offsets(end)
    return {p: PartitionWindow(start=starts[p], end=max(starts[p], ends[p]), next=starts[p]) for p in chosen}


def parse_rate(text: str) -> float:
    """`N`, `N/s`, `N/min` or `N/h` events per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|min|m|h))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ReplayError(f"--rate {text!r}: expected a positive number of events, e.g. 200/s or 6000/min")
    per = {None: 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) / per


class TokenBucket:
    """At most `rate` events a second: over any t seconds, no more than rate*t + burst, where the
    burst is a tenth of a second's worth (at least 1). Starts empty. Used by one thread only."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self._clock = clock
        self._tokens = 0.0
        self._last = clock()

    def take(self, wanted: int, timeout: float) -> int:
        """Take up to `wanted` tokens, waiting at most `timeout` for the first; returns how many."""
        deadline = self._clock() + timeout
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            granted = min(wanted, int(self._tokens))
            if granted >= 1:
                self._tokens -= granted
                return granted
            if now >= deadline:
                return 0
            time.sleep(min((1 - self._tokens) / self.rate, deadline - now))

    def refund(self, tokens: int) -> None:
        """Return tokens taken for events that did not come (fewer records than asked for)."""
        self._tokens = min(self.burst, self._tokens + tokens)


# -- the checkpoint ----------------------------------------------------------------------------


class Checkpoint(BaseModel):
    """The state of one replay run; owns "a resumed replay starts after what was delivered".

    It records what a resumed run must keep identical (topic, window, output, policy
    versions) and, per partition, `next`: one past the highest offset below which every
    record's output was delivered (the offset tracker's position). `save` writes a temporary
    file, fsyncs it and renames it over the old one, so a crash leaves either checkpoint.
    """

    run_id: str
    topic: str
    output: str  # "topic:NAME" or "file:PATH"
    policies: list[str]  # id@version of every policy in force
    started_at: datetime
    window: dict[int, PartitionWindow]
    complete: bool = False

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
        except ValidationError:
            raise ReplayError(f"{path}: not a replay checkpoint") from None

    def save(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as out:
            out.write(self.model_dump_json(indent=2).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    def advance(self, positions: dict[int, int]) -> None:
        for partition, position in positions.items():
            window = self.window[partition]
            window.next = max(window.next, min(position, window.end))

    def finish(self) -> None:
        """Every record of the window was delivered (offsets in gaps are transaction markers or compacted)."""
        for window in self.window.values():
            window.next = window.end
        self.complete = True

    def records(self) -> int:
        return sum(w.end - w.start for w in self.window.values())

    def covers(self, topic: str, partition: int, offset: int) -> bool:
        window = self.window.get(partition)
        return topic == self.topic and window is not None and window.start <= offset < window.next


# -- the source --------------------------------------------------------------------------------


class ReplaySource:
    """Reads a fixed window of one topic for a `Pipeline`, in the role of `consumer.kafka.source.Source`.

    Guarantees:
    - the live consumer group is never joined and no offset is ever committed: partitions
      are assigned under the replay's own group id with auto-commit off;
    - each record in [next, end) of each partition is handed on once; nothing at or past END,
      however fast producers keep writing;
    - no more than the in-flight window (records, bytes) is outstanding, and no more than the
      token bucket's rate is handed on;
    - the checkpoint only moves to positions the offset tracker allows (delivered outputs);
    - once every partition reached END and every output was delivered, the checkpoint is
      marked complete and `on_finished` is called, once.
    """

    def __init__(
        self,
        consumer: Any,
        checkpoint: Checkpoint,
        checkpoint_path: Path,
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        on_finished: Callable[[], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        save_interval_s: float,
        limiter: TokenBucket | None = None,
    ):
        self._consumer = consumer
        self._checkpoint = checkpoint
        self._path = checkpoint_path
        self._topic = checkpoint.topic
        self._tracker = tracker
        self._deliver = deliver
        self._on_fatal = on_fatal
        self._on_finished = on_finished
        self._max_events = max_in_flight_events
        self._max_bytes = max_in_flight_bytes
        self._save_interval_s = save_interval_s
        self._limiter = limiter
        self._open = {p for p, w in checkpoint.window.items() if w.next < w.end}
        # What Source reports too: the partitions being read, and records left in each (to END).
        self.assigned: set[TopicPartitionKey] = {(self._topic, p) for p in self._open}
        self.lag: dict[TopicPartitionKey, int] = {
            (self._topic, p): w.end - w.next for p, w in checkpoint.window.items()
        }
        self._accepting = True
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-poll", daemon=True)

    def start(self) -> None:
        window = self._checkpoint.window
        if self._open:
            self._consumer.assign([TopicPartition(self._topic, p, window[p].next) for p in sorted(self._open)])
        self._thread.start()

    def stop_accepting(self) -> None:
        """Stop handing on new records (shutdown); the checkpoint keeps moving until `close`."""
        self._accepting = False

    def close(self, timeout: float = 30.0) -> None:
        """Save the last checkpoint and close the consumer; call after the sink has flushed."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_save = time.monotonic() + self._save_interval_s
        try:
            while not self._stop.is_set():
                if self._open:
                    received = self._poll_once()
                    if received:
                        self._deliver(received)
                elif not self.finished and self._tracker.wait_until_drained(POLL_TIMEOUT_S):
                    self._finish()
                else:
                    self._stop.wait(POLL_TIMEOUT_S)
                if time.monotonic() >= next_save:
                    self._save()
                    next_save = time.monotonic() + self._save_interval_s
        except Exception as exc:  # noqa: BLE001 - the poll thread must report, never die silently
            log.exception("replay source stopped")
            self._on_fatal(f"replay source failed: {exc}")
        finally:
            self._save()
            close_consumer(self._consumer)

    def _poll_once(self) -> Received:
        room = min(POLL_BATCH, self._max_events - self._tracker.in_flight())
        if not self._accepting or room <= 0 or self._tracker.in_flight_bytes >= self._max_bytes:
            # No group membership to keep alive, so a full window simply waits.
            self._stop.wait(POLL_TIMEOUT_S)
            return []
        granted = self._limiter.take(room, POLL_TIMEOUT_S) if self._limiter else room
        if not granted:
            return []
        received: Received = []
        for message in self._consumer.consume(num_messages=granted, timeout=POLL_TIMEOUT_S):
            partition, offset = message.partition(), message.offset()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if offset >= self._checkpoint.window[partition].end:
                        self._close_partition(partition)
                elif error.fatal():
                    raise KafkaException(error)
                else:
                    log.warning("consumer: %s", error.str())
                continue
            if partition not in self._open:
                continue  # fetched before its partition reached END
            if offset >= self._checkpoint.window[partition].end:
                self._close_partition(partition)
                continue
            value = message.value()
            received.append((message, self._tracker.track(self._topic, partition, offset, len(value) if value else 0)))
        if self._limiter:
            self._limiter.refund(granted - len(received))
        if self._open:
            for tp in self._consumer.position([TopicPartition(self._topic, p) for p in sorted(self._open)]):
                end = self._checkpoint.window[tp.partition].end
                if tp.offset >= 0:
                    self.lag[(self._topic, tp.partition)] = max(0, end - tp.offset)
                if tp.offset >= end:
                    self._close_partition(tp.partition)
        return received

    def _close_partition(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self.assigned.discard((self._topic, partition))
            self.lag[(self._topic, partition)] = 0
            self._consumer.pause([TopicPartition(self._topic, partition)])

    def _finish(self) -> None:
        self.finished = True
        self._checkpoint.finish()
        self._save(changed=True)
        self._on_finished()

    def _save(self, changed: bool = False) -> None:
        positions = self._tracker.commit_positions()
        if not positions and not changed:
            return
        self._checkpoint.advance({partition: offset for (_, partition), offset in positions.items()})
        try:
            self._checkpoint.save(self._path)
        except OSError as exc:
            # Not fatal: the replay goes on, and the next save tries again.
            log.warning("cannot save the checkpoint %s: %s", self._path, exc.strerror)
            return
        self._tracker.mark_committed(positions)


def replay_consumer_config(bootstrap_servers: str, group_id: str, options: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in options.items() if k not in GROUP_OPTIONS}
    return config | REPLAY_CONSUMER_REQUIRED | {"bootstrap.servers": bootstrap_servers, "group.id": group_id}


# -- the output --------------------------------------------------------------------------------


class JsonlSink:
    """Writes outputs to a JSON Lines file; owns "delivered means on disk".

    Same interface as `consumer.kafka.sink.Sink`. Lines are appended as they come; every
    `SYNC_INTERVAL_S` the sink's thread flushes and fsyncs the file and only then reports
    the written outputs delivered. A write or sync error is fatal (`on_fatal`) and what was
    not synced is never reported delivered.
    """

    SYNC_INTERVAL_S = 0.1

    def __init__(self, path: Path, on_delivered: Callable[[list[Ticket]], None], on_fatal: Callable[[str], None]):
        self.path = path
        self._file = open(path, "ab")
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._lock = threading.Lock()
        self._written: list[Ticket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="jsonl-sync", daemon=True)
        self.failed: str | None = None

    def start(self) -> None:
        self._thread.start()

    def send_verdict(self, verdict: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._write(verdict, ticket)

    def send_dead_letter(self, letter: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._write(letter, ticket)

    def _write(self, document: Document, ticket: Ticket) -> None:
        line = orjson.dumps(document) + b"\n"
        with self._lock:
            if self.failed:
                return
            try:
                self._file.write(line)
            except OSError as exc:
                self._fail(f"cannot write {self.path}: {exc.strerror}")
                return
            self._written.append(ticket)

    def _sync(self) -> None:
        with self._lock:
            if self.failed or not self._written:
                return
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                self._fail(f"cannot write {self.path}: {exc.strerror}")
                return
            synced, self._written = self._written, []
        self._on_delivered(synced)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        log.error("%s", reason)
        self._on_fatal(reason)

    def _serve(self) -> None:
        while not self._stop.wait(self.SYNC_INTERVAL_S):
            self._sync()

    def awaiting_reports(self) -> bool:
        return False

    def serve(self) -> None:
        return None  # the sink's own thread syncs the file

    def flush(self, timeout: float) -> int:
        """Sync what was written; returns how many outputs are still undelivered."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sync()
        return len(self._written)

    def close(self) -> None:
        self._file.close()


class ReplayOutput:
    """The replay's sink: stamps each output with the replay that produced it (the `replay`
    field, and `safeguard-replay*` headers on a topic) and hands it to the inner sink, which
    owns delivery. Counts what it sent, per kind."""

    def __init__(self, inner: Sink | JsonlSink, info: ReplayInfo):
        self._inner = inner
        self._info = info
        self._stamp = info.model_dump(mode="json")
        self._headers: Headers = [
            ("safeguard-replay", info.run_id.encode()),
            ("safeguard-replay-policies", ",".join(info.policies).encode()),
        ]
        self.violations = 0

    def start(self) -> None:
        self._inner.start()

    def send_verdict(self, verdict: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self.violations += verdict["violation"]
        self._inner.send_verdict({**verdict, "replay": self._stamp}, key, ticket, headers + self._headers)

    def send_dead_letter(self, letter: Document, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        self._inner.send_dead_letter({**letter, "replay": self._stamp}, key, ticket, headers + self._headers)

    def awaiting_reports(self) -> bool:
        return self._inner.awaiting_reports()

    def serve(self) -> None:
        self._inner.serve()

    def flush(self, timeout: float) -> int:
        return self._inner.flush(timeout)

    def close(self) -> None:
        self._inner.close()


def keep_delivered_lines(path: Path, checkpoint: Checkpoint) -> int:
    """Before resuming into a file: keep only the lines the checkpoint counts as delivered.

    Lines written after the last checkpoint (and a line cut short by a crash) are dropped,
    because the resumed run writes those records again; the file then holds one output per
    record. Returns how many lines were dropped.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            source = orjson.loads(line)["source"]
            covered = checkpoint.covers(source["topic"], source["partition"], source["offset"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            covered = False
        if covered:
            kept.append(line + b"\n")
        else:
            dropped += 1
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as out:
        out.writelines(kept)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return dropped


# -- progress ----------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="cyan")


class ReplayProgress:
    """A rich progress bar per partition: records of the window done, rate, time left.

    `delivered` may be called from any thread (rich's Progress holds a lock)."""

    def __init__(self, console: Console, checkpoint: Checkpoint):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), console=console,
        )  # fmt: skip
        self._totals = {p: w.end - w.start for p, w in checkpoint.window.items()}
        self._tasks = {
            p: self.progress.add_task(f"{checkpoint.topic}[{p}]", total=self._totals[p], completed=w.next - w.start)
            for p, w in sorted(checkpoint.window.items())
        }
        self.done_this_run: Counter[int] = Counter()

    def delivered(self, tickets: list[Ticket]) -> None:
        by_partition = Counter(ticket.partition for ticket in tickets)
        for partition, count in by_partition.items():
            self.done_this_run[partition] += count
            self.progress.advance(self._tasks[partition], count)

    def complete(self) -> None:
        for partition, task in self._tasks.items():
            self.progress.update(task, completed=self._totals[partition])


# -- one replay run ----------------------------------------------------------------------------


@dataclass
class ReplayResult:
    finished: bool  # every record of the window has its output
    run: RunResult
    violations: int
    done_before: dict[int, int]  # per partition, records an interrupted earlier part delivered
    done_this_run: dict[int, int]
    elapsed_s: float

    @property
    def exit_code(self) -> int:
        if self.run.exit_code:
            return self.run.exit_code
        return 0 if self.finished else EXIT_INTERRUPTED


class Replay:
    """One replay run over the window of `checkpoint`: the live `Pipeline` with a `ReplaySource`
    and a `ReplayOutput`, writing to `output_file` or to the settings' verdict topic.

    `settings` are the replay's own (see `replay_settings`); the checkpoint file is saved as
    the run goes, and `run()` returns when the window is done, on `stop()`, on SIGINT/SIGTERM
    when handlers are installed, or on a fatal error.
    """

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        policies: PolicyStore,
        checkpoint: Checkpoint,
        checkpoint_path: Path,
        output_file: Path | None = None,
        rate: float | None = None,
        console: Console | None = None,
    ):
        self.checkpoint = checkpoint
        self.checkpoint_path = checkpoint_path
        self.output_file = output_file
        self.rate = rate
        self.info = ReplayInfo(run_id=checkpoint.run_id, started_at=checkpoint.started_at, policies=checkpoint.policies)
        self.progress = ReplayProgress(console or Console(stderr=True), checkpoint)
        self.done_before = {p: w.next - w.start for p, w in checkpoint.window.items()}
        self.pipeline = Pipeline(
            settings, classifier, policies, source_factory=self._connect_source, sink_factory=self._open_sink
        )
        self.source: ReplaySource | None = None
        self.output: ReplayOutput | None = None

    def stop(self) -> None:
        """Interrupt: drain what is in flight, save the checkpoint, return; safe from any thread."""
        self.pipeline.stop()

    async def run(self, install_signal_handlers: bool = True) -> ReplayResult:
        started = time.monotonic()
        with self.progress.progress:
            result = await self.pipeline.run(install_signal_handlers)
            finished = self.source is not None and self.source.finished
            if finished:
                self.progress.complete()
        return ReplayResult(
            finished=finished,
            run=result,
            violations=self.output.violations if self.output else 0,
            done_before=self.done_before,
            done_this_run=dict(self.progress.done_this_run),
            elapsed_s=time.monotonic() - started,
        )

    def _connect_source(
        self,
        bootstrap_servers: str,
        group_id: str,
        options: dict[str, Any],
        *,
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        commit_interval_s: float,
        **_subscription: Any,  # topics and revoke_drain_s: a replay assigns, it never subscribes
    ) -> ReplaySource:
        self.source = ReplaySource(
            Consumer(replay_consumer_config(bootstrap_servers, group_id, options)),
            self.checkpoint,
            self.checkpoint_path,
            tracker,
            deliver,
            on_fatal,
            on_finished=self.pipeline.stop,
            max_in_flight_events=max_in_flight_events,
            max_in_flight_bytes=max_in_flight_bytes,
            save_interval_s=commit_interval_s,
            limiter=TokenBucket(self.rate) if self.rate else None,
        )
        return self.source

    def _open_sink(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        *,
        on_delivered: Callable[[list[Ticket]], None],
        on_fatal: Callable[[str], None],
        delivery_retries: int,
    ) -> ReplayOutput:
        def delivered(tickets: list[Ticket]) -> None:
            on_delivered(tickets)
            self.progress.delivered(tickets)

        inner: Sink | JsonlSink
        if self.output_file is not None:
            inner = JsonlSink(self.output_file, delivered, on_fatal)
        else:
            inner = Sink(producer_config, verdict_topic, dead_letter_topic, delivered, on_fatal, delivery_retries)
        self.output = ReplayOutput(inner, self.info)
        return self.output


def replay_settings(settings: Settings, run_id: str, topic: str, output_topic: str | None) -> Settings:
    """The live settings narrowed to a replay: one input topic, its own group, one output for
    verdicts and dead letters alike, policies fixed for the whole run, no health endpoint."""
    kafka = settings.kafka.model_copy(update={
        "input_topics": [topic],
        "group_id": f"safeguard-replay-{run_id}",
        "verdict_topic": output_topic or "",
        "dead_letter_topic": output_topic or "",
    })  # fmt: skip
    policies = settings.policies.model_copy(update={"reload_interval_s": 0.0})
    # The live consumer may serve its health port on this host; a replay stays off it.
    telemetry = settings.telemetry.model_copy(update={"http_port": None})
    return settings.model_copy(update={"kafka": kafka, "policies": policies, "telemetry": telemetry})


def replay_policies(settings: Settings, policy: str | None) -> tuple[Settings, PolicyStore]:
    """The policies a replay runs, fixed for the run.

    Without `policy`: the configured directory and routes, as the live consumer runs them.
    With `ID` or `ID@FILE`: that one policy (the file's version when given) applies to every
    record, routes aside, so that a backtest compares one policy's decisions.
    """
    if policy is None:
        store = PolicyStore(settings.policies.directory, settings.policies.max_tokens)
        Router(settings.policies, store.get)  # fails early on routes naming unknown policies
        return settings, store
    policy_id, _, file = policy.partition("@")
    if file:
        source = Path(file)
        named = load_policy(source).id
        if named != policy_id:
            raise PolicyError(f"{source}:2: its id is {named!r}, not {policy_id!r}")
    else:
        configured = PolicyStore(settings.policies.directory, settings.policies.max_tokens).get()
        if policy_id not in configured or configured[policy_id].path is None:
            raise PolicyError(f"{settings.policies.directory}:0: no policy {policy_id!r}")
        source = configured[policy_id].path
    # A store of exactly this file: PolicyStore validates it as it would a live edit. Reloads
    # are off for a replay, so the staging folder is not needed once loaded.
    with tempfile.TemporaryDirectory(prefix="safeguard-replay-policy-") as staging:
        shutil.copyfile(source, Path(staging) / f"{policy_id}.md")
        store = PolicyStore(Path(staging), settings.policies.max_tokens)
    narrowed = settings.policies.model_copy(update={"routes": [], "default": policy_id})
    return settings.model_copy(update={"policies": narrowed}), store


def plan_replay(
    settings: Settings,
    policies: PolicyStore,
    topic: str,
    output: str,
    start: Bound,
    end: Bound,
    partitions: list[int] | None = None,
) -> Checkpoint:
    """A fresh run: the window resolved now, the policy versions in force."""
    probe = Consumer(replay_consumer_config(settings.kafka.bootstrap_servers, "safeguard-replay-plan",
                                            settings.kafka.consumer_options))  # fmt: skip
    try:
        window = resolve_window(probe, topic, partitions, start, end)
    except KafkaException as exc:
        raise ReplayError(f"cannot read the window of {topic!r}: {exc}") from None
    finally:
        probe.close()
    return Checkpoint(
        run_id=uuid.uuid4().hex[:12],
        topic=topic,
        output=output,
        policies=sorted(p.ref for p in policies.get().values()),
        started_at=datetime.now(timezone.utc),
        window=window,
    )


def check_resumable(checkpoint: Checkpoint, topic: str, output: str, policies: PolicyStore) -> None:
    """A resumed run must write where the first part wrote, with the same policy versions."""
    if checkpoint.topic != topic or checkpoint.output != output:
        raise ReplayError(f"the checkpoint is of a replay of {checkpoint.topic!r} to {checkpoint.output}, "
                          f"not of {topic!r} to {output}")  # fmt: skip
    now = sorted(p.ref for p in policies.get().values())
    if now != checkpoint.policies:
        raise ReplayError(f"the policies changed since the replay started ({', '.join(checkpoint.policies)} then, "
                          f"{', '.join(now)} now); start a new replay without --resume")  # fmt: skip


# -- reading outputs back for a backtest -------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                yield record


def read_topic(settings: Settings, topic: str, since: datetime | None) -> Iterator[dict[str, Any]]:
    """Every JSON object in `topic` from `since` (from the start when None) up to its end as of now."""
    consumer = Consumer(replay_consumer_config(settings.kafka.bootstrap_servers, f"safeguard-replay-read-{topic}",
                                               settings.kafka.consumer_options))  # fmt: skip
    try:
        found = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise ReplayError(f"topic {topic!r} does not exist or cannot be described")
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S)
                 for p in found.partitions}  # fmt: skip
        ends = {p: high for p, (_, high) in marks.items()}
        if since is None:
            starts = {p: low for p, (low, _) in marks.items()}
        else:
            query = [TopicPartition(topic, p, int(since.timestamp() * 1000)) for p in marks]
            answers = consumer.offsets_for_times(query, timeout=METADATA_TIMEOUT_S)
            starts = {tp.partition: ends[tp.partition] if tp.offset < 0 else tp.offset for tp in answers}
        todo = {p for p in marks if starts[p] < ends[p]}
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        while todo:
            for message in consumer.consume(POLL_BATCH, timeout=1.0):
                partition, offset, error = message.partition(), message.offset(), message.error()
                if error is None and partition in todo and offset < ends[partition]:
                    try:
                        record = orjson.loads(message.value() or b"")
                    except orjson.JSONDecodeError:
                        continue  # not an output of this project
                    if isinstance(record, dict):
                        yield record
                elif error is not None and error.code() == KafkaError._PARTITION_EOF and offset >= ends[partition]:
                    todo.discard(partition)
            if todo:
                for tp in consumer.position([TopicPartition(topic, p) for p in todo]):
                    if tp.offset >= ends[tp.partition]:
                        todo.discard(tp.partition)
    finally:
        consumer.close()


def backtest(
    settings: Settings, checkpoint: Checkpoint, candidate: Path | str, baseline: str, report: Path, console: Console
) -> None:
    """Compare the replay's outputs (a file, or a topic filtered to this run) with `baseline`
    (a file or topic) over the replay's window; print the tables and write the Markdown."""
    in_window = lambda key: checkpoint.covers(*key)  # noqa: E731
    if isinstance(candidate, Path):
        after = Outputs.collect(read_jsonl(candidate), in_window)
    else:
        mine = (r for r in read_topic(settings, candidate, checkpoint.started_at - CLOCK_SLACK)
                if (r.get("replay") or {}).get("run_id") == checkpoint.run_id)  # fmt: skip
        after = Outputs.collect(mine, in_window)
    if Path(baseline).is_file():
        before = Outputs.collect(read_jsonl(Path(baseline)), in_window)
    else:
        # Outputs are produced after their input, so the baseline's start is near the window's.
        oldest = None if after.oldest_ms is None else datetime.fromtimestamp(after.oldest_ms / 1000, timezone.utc)
        before = Outputs.collect(read_topic(settings, baseline, oldest and oldest - CLOCK_SLACK), in_window)
    result = compare(before, after)
    for table in tables(result):
        console.print(table)
    report.write_text(markdown(result, baseline, f"replay {checkpoint.run_id} ({', '.join(checkpoint.policies)})"),
                      encoding="utf-8")  # fmt: skip
    console.print(f"backtest report written to {report}")


# -- the command -------------------------------------------------------------------------------


def summary(checkpoint: Checkpoint, result: ReplayResult, output: str) -> Table:
    state = "finished" if result.finished else "interrupted: run again with --resume to continue"
    table = Table(title=f"Replay {checkpoint.run_id} of {checkpoint.topic}: {state}")
    for column in ("partition", "offsets", "records", "done before", "done this run", "left"):
        table.add_column(column, justify="right")
    for p, w in sorted(checkpoint.window.items()):
        table.add_row(str(p), f"{w.start}..{w.end}", str(w.end - w.start), str(result.done_before.get(p, 0)),
                      str(result.done_this_run.get(p, 0)), str(w.end - w.next))  # fmt: skip
    run = result.run
    rate = sum(result.done_this_run.values()) / result.elapsed_s if result.elapsed_s else 0.0
    table.caption = (
        f"verdicts {run.verdicts} ({result.violations} violations), dead letters {run.dead_letters}, "
        f"{result.elapsed_s:.1f} s, {rate:,.0f} records/s; policies {', '.join(checkpoint.policies)}; to {output}"
    )
    return table


def replay(
    topic: str = typer.Option(..., "--topic", help="The topic to replay."),
    start: Optional[str] = typer.Option(None, "--from", help="ISO-8601 time (UTC if unzoned), offset, earliest, now."),
    end: Optional[str] = typer.Option(None, "--to", help="Same forms as --from; fixed when the replay starts."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; SAFEGUARD_* env overrides it."),
    partitions: Optional[str] = typer.Option(None, help="Comma-separated partitions, e.g. 0,3; all by default."),
    policy: Optional[str] = typer.Option(None, help="ID or ID@FILE: only this policy, on every record."),
    output_topic: Optional[str] = typer.Option(None, help="Write verdicts and dead letters to this topic."),
    output: Optional[Path] = typer.Option(None, help="Write verdicts and dead letters to this JSONL file."),
    rate: Optional[str] = typer.Option(None, help="Cap on records a second, e.g. 200/s or 6000/min."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted replay of the checkpoint."),
    checkpoint_file: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: next to the output."),
    compare_with: Optional[str] = typer.Option(None, "--compare", help="Baseline verdicts: a topic or a JSONL file."),
    report: Optional[Path] = typer.Option(None, help="Backtest Markdown report; default backtest-RUN.md."),
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
    priority: str = typer.Option("low", help="live or low: a remote reasoner's priority on a shared fleet."),
) -> None:
    """Replay a window of a topic through the pipeline, and backtest a policy change with --compare."""
    console, status = Console(), Console(stderr=True)
    if (output_topic is None) == (output is None):
        raise _exit("give exactly one of --output-topic and --output")
    try:
        overrides = {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None
        settings, policies = replay_policies(load_settings(config, overrides), policy)
        where = f"topic:{output_topic}" if output_topic else f"file:{output.resolve()}"  # type: ignore[union-attr]
        path = checkpoint_file or _default_checkpoint(topic, output_topic, output)
        if resume:
            checkpoint = Checkpoint.load(path)
            check_resumable(checkpoint, topic, where, policies)
            if output is not None:
                dropped = keep_delivered_lines(output, checkpoint)
                if dropped:
                    status.print(f"dropped {dropped} lines written after the last checkpoint; they are redone")
            status.print(f"resuming replay {checkpoint.run_id}: its window, fixed when it started, applies")
        else:
            if start is None or end is None:
                raise ReplayError("--from and --to are needed (unless --resume)")
            if output is not None and output.exists() and output.stat().st_size:
                raise ReplayError(f"{output} exists; pass --resume to continue its replay, or remove it")
            checkpoint = plan_replay(settings, policies, topic, where, Bound.parse(start), Bound.parse(end),
                                     _partitions(partitions))  # fmt: skip
            checkpoint.save(path)
        limit = parse_rate(rate) if rate else None
        if priority not in ("live", "low"):
            raise ReplayError(f"--priority must be live or low, not {priority!r}")
        # Low by default: on a fleet shared with the live consumer, a replay must not slow live traffic.
        classifier = build_classifier(settings, policies, priority=priority)
    except (ConfigError, PolicyError, RoutingError, ReplayError) as exc:
        raise _exit(str(exc)) from None
    except ValidationError as exc:
        raise _exit(format_validation_error(exc, config).replace("\n  ", "\n  engine.")) from None
    except (ImportError, TypeError, ValueError) as exc:
        raise _exit(f"classifier: {exc}") from None
    _log_through(status, settings.log.level)

    run_settings = replay_settings(settings, checkpoint.run_id, topic, output_topic)
    job = Replay(run_settings, classifier, policies, checkpoint, path, output, limit, status)
    result = asyncio.run(job.run())
    console.print(summary(checkpoint, result, output_topic or str(output)))
    if result.run.exit_code:
        console.print(f"[red]error:[/] {result.run.reason}")
    elif compare_with and result.finished:
        candidate: Path | str = output if output is not None else output_topic  # type: ignore[assignment]
        try:
            backtest(settings, checkpoint, candidate, compare_with,
                     report or Path(f"backtest-{checkpoint.run_id}.md"), console)  # fmt: skip
        except ReplayError as exc:
            raise _exit(str(exc)) from None
    raise typer.Exit(result.exit_code)


def _partitions(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise ReplayError(f"--partitions {text!r}: expected numbers separated by commas, e.g. 0,3") from None


def _default_checkpoint(topic: str, output_topic: str | None, output: Path | None) -> Path:
    if output is not None:
        return output.with_name(output.name + ".checkpoint.json")
    return Path(f"replay-{topic}-to-{output_topic}.checkpoint.json")


def _exit(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_CONFIG)


def _log_through(console: Console, level: str) -> None:
    # Log lines printed through rich appear above the progress bars instead of tearing them.
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[RichHandler(console=console)])
