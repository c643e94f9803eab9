"""The fan-out sink: each output to every destination that takes its kind; delivered (so its
offset may be committed) only when all of them delivered it. Also where the pipeline's own
sink is put together from the settings (`configured`): the Kafka topics, and `sinks.files`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

from consumer.config.sinks import FileSinkSettings
from consumer.events import Document, Headers
from consumer.kafka.client import Message
from consumer.kafka.offsets import Ticket
from consumer.sinks.file import JsonlSink
from consumer.sinks.roles import (
    OUTPUT_KINDS,
    AsksBrokers,
    CarriesReviewItems,
    OutputKind,
    OutputSink,
    SinkFactory,
    SinkOptions,
    SinkWiring,
)


@dataclass(frozen=True)
class Destination:
    """One destination of a fan-out: how to open it (wired by the fan-out) and what it takes."""

    open: Callable[[SinkWiring], OutputSink]
    outputs: frozenset[OutputKind]


class _Pending:
    """A record's outputs sent and not yet delivered by every destination."""

    __slots__ = ("deliveries", "outputs", "verdicts", "dead_letters")

    def __init__(self) -> None:
        self.deliveries = 0  # delivery reports still awaited, all destinations together
        self.outputs = 0  # outputs sent under the ticket (the output join counts each)
        self.verdicts = 0
        self.dead_letters = 0


class FanOutSink:
    """Sends each output to every destination that takes its kind (an `OutputSink`).

    Owns "an output is delivered when every destination delivered it": each destination
    reports to the fan-out, and the fan-out hands a ticket on (`on_delivered`) only when no
    destination still owes a report for it, once per output sent under it, so a verdict with
    review items still counts as several outputs downstream. A destination that fails calls
    the wiring's `on_fatal` itself: a fatal error in any destination stops the consumer, and the
    record it concerns is never reported delivered. Reports arrive on whichever thread each
    destination serves them (the event loop for Kafka, a file's sync thread), hence the lock.

    The optional abilities follow the destinations': the fan-out carries review items when a
    destination taking them does, and asks the brokers when a destination can (all of those
    must answer). They are set on the instance, so `isinstance(sink, CarriesReviewItems)` tells
    the truth about this fan-out, not about the class.
    """

    def __init__(self, destinations: Sequence[Destination], wiring: SinkWiring):
        for kind in ("verdict", "dead_letter"):
            if not any(kind in d.outputs for d in destinations):
                raise ValueError(f"no destination takes the {kind.replace('_', ' ')}s: they would be lost")
        self._on_delivered = wiring.on_delivered
        self._lock = threading.Lock()
        self._pending: dict[Ticket, _Pending] = {}
        self._sinks = [d.open(replace(wiring, on_delivered=self._delivered)) for d in destinations]
        self._takes: dict[OutputKind, list[OutputSink]] = {
            kind: [s for s, d in zip(self._sinks, destinations) if kind in d.outputs] for kind in OUTPUT_KINDS
        }
        # Counted as sent: a verdict a topic could only take as its dead letter still counts as a verdict.
        self.verdicts_delivered = 0  # by every destination that takes verdicts
        self.dead_letters_delivered = 0
        reviews = self._takes["review_item"]
        if any(not isinstance(s, CarriesReviewItems) for s in reviews):
            raise ValueError("a destination that takes review items cannot carry them")
        if reviews:
            self.send_review_item = self._send_review_item
        if any(isinstance(s, AsksBrokers) for s in self._sinks):
            self.brokers_answer = self._brokers_answer

    @property
    def held_back(self) -> int:
        return sum(s.held_back for s in self._sinks)

    def start(self) -> None:
        for sink in self._sinks:
            sink.start()

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        for sink in self._expect(ticket, "verdict"):
            sink.send_verdict(verdict, record, ticket, headers)

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        for sink in self._expect(ticket, "dead_letter"):
            sink.send_dead_letter(letter, record, ticket, headers)

    def _send_review_item(self, topic: str, item: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        for sink in self._expect(ticket, "review_item"):
            sink.send_review_item(topic, item, record, ticket, headers)  # type: ignore[attr-defined]

    def _expect(self, ticket: Ticket, kind: OutputKind) -> list[OutputSink]:
        """The destinations of one output, counted before it is sent: a fast destination's
        report must not find the ticket complete while a slower one has not been handed it."""
        targets = self._takes[kind]
        with self._lock:
            pending = self._pending.get(ticket)
            if pending is None:
                pending = self._pending[ticket] = _Pending()
            pending.deliveries += len(targets)
            pending.outputs += 1
            if kind == "verdict":
                pending.verdicts += 1
            elif kind == "dead_letter":
                pending.dead_letters += 1
        return targets

    def _delivered(self, tickets: list[Ticket]) -> None:
        ready: list[Ticket] = []
        with self._lock:
            for ticket in tickets:
                pending = self._pending[ticket]
                pending.deliveries -= 1
                if pending.deliveries == 0:
                    del self._pending[ticket]
                    ready.extend([ticket] * pending.outputs)
                    self.verdicts_delivered += pending.verdicts
                    self.dead_letters_delivered += pending.dead_letters
        if ready:
            self._on_delivered(ready)

    def awaiting_reports(self) -> bool:
        return any(s.awaiting_reports() for s in self._sinks)

    def serve(self) -> None:
        for sink in self._sinks:
            sink.serve()

    def flush(self, timeout: float) -> int:
        """Flush every destination within `timeout` in all; returns how many outputs some
        destination has not delivered."""
        deadline = time.monotonic() + timeout
        for sink in self._sinks:
            sink.flush(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return sum(p.outputs for p in self._pending.values())

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def _brokers_answer(self, timeout: float) -> bool:
        return all(s.brokers_answer(timeout) for s in self._sinks if isinstance(s, AsksBrokers))


def configured(primary: SinkFactory, files: Sequence[FileSinkSettings]) -> SinkFactory:
    """The pipeline's own sink: `primary` (the Kafka topics) alone, or, with `sinks.files`, a
    fan-out to it (every output kind) and to each file (the kinds it lists)."""
    if not files:
        return primary

    def open_fan_out(options: SinkOptions, wiring: SinkWiring) -> FanOutSink:
        destinations = [Destination(partial(primary, options), frozenset(OUTPUT_KINDS))]
        destinations += [Destination(partial(JsonlSink.open, f), frozenset(f.outputs)) for f in files]
        return FanOutSink(destinations, wiring)

    return open_fan_out
