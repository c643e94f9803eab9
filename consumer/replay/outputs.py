"""Where a replay's outputs go: a JSON Lines file (`JsonlSink`) or a topic (the Kafka `Sink`),
behind `ReplayOutput`, which stamps each output with the run that produced it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import orjson

from consumer.durable import replacing
from consumer.events import Document, Headers, ReplayInfo
from consumer.kafka.client import Message
from consumer.kafka.offsets import Ticket
from consumer.kafka.roles import OutputSink
from consumer.replay.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class JsonlSink:
    """Writes outputs to a JSON Lines file (an `OutputSink`); owns "delivered means on disk".

    Lines are appended as they come; every `SYNC_INTERVAL_S` the sink's thread flushes and
    fsyncs the file and only then reports the written outputs delivered. A write or sync
    error is fatal (`on_fatal`) and what was not synced is never reported delivered.
    """

    SYNC_INTERVAL_S = 0.1

    def __init__(self, path: Path, on_delivered: Callable[[list[Ticket]], None], on_fatal: Callable[[str], None]):
        self.path = path
        self._file = open(path, "ab")
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._lock = threading.Lock()
        self._written: list[tuple[Ticket, bool]] = []  # (ticket, is a dead letter)
        self.verdicts_delivered = 0  # synced to disk
        self.dead_letters_delivered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="jsonl-sync", daemon=True)
        self.failed: str | None = None
        self.held_back = 0  # a file is never full

    def start(self) -> None:
        self._thread.start()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._write(verdict, ticket, letter=False)

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._write(letter, ticket, letter=True)

    def _write(self, document: Document, ticket: Ticket, letter: bool) -> None:
        line = orjson.dumps(document) + b"\n"
        with self._lock:
            if self.failed:
                return
            try:
                self._file.write(line)
            except OSError as exc:
                self._fail(f"cannot write {self.path}: {exc.strerror}")
                return
            self._written.append((ticket, letter))

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
        letters = sum(letter for _, letter in synced)
        self.verdicts_delivered += len(synced) - letters
        self.dead_letters_delivered += letters
        self._on_delivered([ticket for ticket, _ in synced])

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
    """The replay's `OutputSink`: stamps each output with the replay that produced it (the
    `replay` field, and `safeguard-replay*` headers on a topic) and hands it to the inner
    sink, which owns delivery. Counts the violations it sent."""

    def __init__(self, inner: OutputSink, info: ReplayInfo):
        self._inner = inner
        self._stamp = info.model_dump(mode="json")
        self._headers: Headers = [
            ("safeguard-replay", info.run_id.encode()),
            ("safeguard-replay-policies", ",".join(info.policies).encode()),
        ]
        self.violations = 0

    @property
    def held_back(self) -> int:
        return self._inner.held_back

    @property
    def verdicts_delivered(self) -> int:
        return self._inner.verdicts_delivered

    @property
    def dead_letters_delivered(self) -> int:
        return self._inner.dead_letters_delivered

    def start(self) -> None:
        self._inner.start()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self.violations += verdict["violation"]
        self._inner.send_verdict({**verdict, "replay": self._stamp}, record, ticket, headers + self._headers)

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._inner.send_dead_letter({**letter, "replay": self._stamp}, record, ticket, headers + self._headers)

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
    record. The file is replaced whole. Returns how many lines were dropped.
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
    with replacing(path) as out:
        out.writelines(kept)
    return dropped
