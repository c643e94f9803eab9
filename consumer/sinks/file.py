"""The file sink: outputs as JSON Lines, one a line; owns "delivered means on disk"."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import orjson

from consumer.config import ConfigError
from consumer.config.sinks import FileSinkSettings
from consumer.events import Document, Headers
from consumer.kafka.client import Message
from consumer.kafka.offsets import Ticket
from consumer.sinks.roles import OutputKind, SinkWiring

log = logging.getLogger(__name__)


def check_writable(files: list[FileSinkSettings]) -> None:
    """The pre-flight of `sinks.files` (offline, nothing created): each file can be appended to.
    Raises `ConfigError` naming the entry's key."""
    for i, entry in enumerate(files):
        path = entry.path
        if path.is_dir():
            raise ConfigError(f"sinks.files.{i}.path: {path} is a folder, not a file")
        target = path if path.exists() else path.parent
        if not os.access(target, os.W_OK):
            raise ConfigError(f"sinks.files.{i}.path: {target} may not be written by this user")


class JsonlSink:
    """Writes outputs to a JSON Lines file (an `OutputSink` that `CarriesReviewItems`).

    Lines are appended as they come; every `sync_interval_s` the sink's thread flushes and
    fsyncs the file and only then reports the written outputs delivered. A write or sync
    error is fatal (`on_fatal`) and what was not synced is never reported delivered.
    Headers (trace context) have no place in a line and are not written.
    """

    def __init__(
        self,
        path: Path,
        on_delivered: Callable[[list[Ticket]], None],
        on_fatal: Callable[[str], None],
        sync_interval_s: float = 0.1,
    ):
        self.path = path
        self._file = open(path, "ab")
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._sync_interval_s = sync_interval_s
        self._lock = threading.Lock()
        self._written: list[tuple[Ticket, OutputKind]] = []
        self.verdicts_delivered = 0  # synced to disk
        self.dead_letters_delivered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="jsonl-sync", daemon=True)
        self.failed: str | None = None
        self.held_back = 0  # a file is never full

    @classmethod
    def open(cls, settings: FileSinkSettings, wiring: SinkWiring) -> JsonlSink:
        """The file of `sinks.files`, wired like any sink."""
        return cls(settings.path, wiring.on_delivered, wiring.on_fatal, settings.sync_interval_s)

    def start(self) -> None:
        self._thread.start()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._write(verdict, ticket, "verdict")

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        self._write(letter, ticket, "dead_letter")

    def send_review_item(self, topic: str, item: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """`topic`: the review topic a Kafka sink would write to; a file holds the item only."""
        self._write(item, ticket, "review_item")

    def _write(self, document: Document, ticket: Ticket, kind: OutputKind) -> None:
        line = orjson.dumps(document) + b"\n"
        with self._lock:
            if self.failed:
                return
            try:
                self._file.write(line)
            except OSError as exc:
                self._fail(f"cannot write {self.path}: {exc.strerror}")
                return
            self._written.append((ticket, kind))

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
        for _, kind in synced:
            if kind == "verdict":
                self.verdicts_delivered += 1
            elif kind == "dead_letter":
                self.dead_letters_delivered += 1
        self._on_delivered([ticket for ticket, _ in synced])

    def _fail(self, reason: str) -> None:
        self.failed = reason
        log.error("%s", reason)
        self._on_fatal(reason)

    def _serve(self) -> None:
        while not self._stop.wait(self._sync_interval_s):
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
        try:
            self._file.close()
        except OSError:
            # Closing flushes what is buffered: after a reported failure those lines were never
            # counted delivered, and the failure has stopped the run already.
            if not self.failed:
                raise
