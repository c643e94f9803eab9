"""Where a replay's outputs go: a JSON Lines file (`consumer.sinks.file.JsonlSink`) or a topic
(`consumer.sinks.kafka.KafkaSink`), behind `ReplayOutput`, which stamps each output with the run
that produced it; and the trimming of a file before a resume."""

from __future__ import annotations

from pathlib import Path

import orjson

from consumer.durable import replacing
from consumer.events import Document, Headers, ReplayInfo
from consumer.kafka.client import Message
from consumer.kafka.offsets import Ticket
from consumer.replay.checkpoint import Checkpoint
from consumer.sinks.roles import OutputSink


class ReplayOutput:
    """The replay's `OutputSink`: stamps each output with the replay that produced it (the
    `replay` field, and `safeguard-replay*` headers on a topic) and hands it to the inner
    sink, which owns delivery. Counts the violations it sent. It carries no review items: a
    replay opens no reviews."""

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
