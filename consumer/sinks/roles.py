"""The sink role: what the pipeline hands its outputs to, and the abilities a sink may add.

Contracts only: Protocols and the plain options they are built from; no implementation is
imported here. The implementations:

- `OutputSink`: `consumer.sinks.kafka.KafkaSink` (at-least-once), `consumer.sinks.kafka.TransactionalSink`
  (exactly-once), `consumer.sinks.file.JsonlSink` (a file), `consumer.sinks.fan_out.FanOutSink`
  (several destinations, done when all are) and `consumer.replay.outputs.ReplayOutput` (stamps a
  replay's outputs for an inner sink);
- `CarriesReviewItems`: the two Kafka sinks, the file sink, and a fan-out whose destinations take them;
- `AsksBrokers`: the two Kafka sinks, and a fan-out with one of them among its destinations.

Callers check an ability with `isinstance(sink, CarriesReviewItems)`, never a concrete class,
so a new sink gets review or a broker health probe by having the method, nothing else.

`Pipeline` builds a `SinkOptions` from the settings and passes it, with what it wires the sink
to (`SinkWiring`), to its sink factory (`SinkFactory`), so that a replacement (the replay's)
takes one typed object, not a mirror of the pipeline's keyword list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from consumer.config.sinks import OUTPUT_KINDS, OutputKind
from consumer.events import Document, Headers
from consumer.kafka.client import Message

if TYPE_CHECKING:
    from consumer.kafka.budget import OutputBudget
    from consumer.kafka.offsets import Ticket

__all__ = ["OUTPUT_KINDS", "AsksBrokers", "CarriesReviewItems", "OutputKind", "OutputSink", "SinkFactory",
           "SinkOptions", "SinkWiring"]  # fmt: skip


class OutputSink(Protocol):
    """Takes verdicts and dead letters from the event loop without blocking; a record's ticket
    is marked done only once its output is delivered (or, exactly-once, held for the transaction)."""

    held_back: int  # outputs that had to wait for room (a full producer queue)
    verdicts_delivered: int  # acknowledged by the broker (exactly-once: in committed transactions)
    dead_letters_delivered: int

    def start(self) -> None: ...

    def send_verdict(self, verdict: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """The verdict of the input `record` (keyed like it; a dead letter of it if it cannot fit)."""
        ...

    def send_dead_letter(self, letter: Document, record: Message, ticket: Ticket, headers: Headers) -> None: ...

    def awaiting_reports(self) -> bool:
        """True while outputs wait for delivery reports that `serve` would hand on."""
        ...

    def serve(self) -> None:
        """On the event loop: hand on delivery reports, send what waited."""
        ...

    def flush(self, timeout: float) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        ...

    def close(self) -> None:
        """Release the client; after `flush`."""
        ...


@runtime_checkable
class CarriesReviewItems(Protocol):
    """A sink that also delivers review items; the review desk is enabled only with one."""

    def send_review_item(self, topic: str, item: Document, record: Message, ticket: Ticket, headers: Headers) -> None:
        """Another output of `record` under the same ticket and the same guarantee (`topic`: the
        review topic, for a sink that writes to topics)."""
        ...


@runtime_checkable
class AsksBrokers(Protocol):
    """A sink that can ask the brokers whether they answer (the health beat does, after an outage)."""

    def brokers_answer(self, timeout: float) -> bool:
        """True when a broker answered within `timeout`. Blocking: call it off the loop."""
        ...


@dataclass(frozen=True)
class SinkOptions:
    """Where an output sink writes, from the settings (`kafka`, `pipeline`)."""

    producer_config: dict[str, Any]  # librdkafka producer options, bootstrap servers included
    verdict_topic: str
    dead_letter_topic: str
    delivery_retries: int


@dataclass(frozen=True)
class SinkWiring:
    """What the pipeline connects an output sink to."""

    on_delivered: Callable[[list[Ticket]], None]  # tickets of delivered outputs, a batch at a time
    on_fatal: Callable[[str], None]
    budget: OutputBudget  # what fits each output topic; cuts what does not


SinkFactory = Callable[[SinkOptions, SinkWiring], OutputSink]
