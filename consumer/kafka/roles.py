"""The roles around the pipeline: who reads records, who writes outputs, who makes offsets durable.

Contracts only: Protocols and the plain options they are built from; no implementation is
imported here. The implementations:

- `RecordSource`: `consumer.kafka.source.Source` (a consumer group) and
  `consumer.replay.source.ReplaySource` (assigned partitions, a fixed offset range);
- `OutputSink`: `consumer.kafka.sink.Sink` (at-least-once), `consumer.kafka.sink.TransactionalSink`
  (exactly-once), `consumer.replay.outputs.JsonlSink` (a file) and
  `consumer.replay.outputs.ReplayOutput` (stamps a replay's outputs for an inner sink);
- `Committer`: `consumer.kafka.source.OffsetCommitter` and `TransactionalSink`.

`Pipeline` builds a `SourceOptions` and a `SinkOptions` from the settings and passes them,
with what it wires the stage to, to its source and sink factories (`SourceFactory`,
`SinkFactory`), so that a replacement (the replay's) takes one typed object, not a mirror of
the pipeline's keyword list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import KafkaError, Message, TopicPartition

from consumer.events import Document, Headers

if TYPE_CHECKING:
    from consumer.kafka.budget import OutputBudget
    from consumer.kafka.client_logs import BrokerLink
    from consumer.kafka.offsets import OffsetTracker, Ticket, TopicPartitionKey

# A poll batch handed to the pipeline: each record with its offset tracker ticket.
Received = list[tuple[Message, "Ticket"]]


class KafkaConsumerLike(Protocol):
    """The part of confluent_kafka.Consumer the group source uses; tests may pass a real one or a double."""

    def subscribe(self, topics: list[str], on_assign: Any = ..., on_revoke: Any = ..., on_lost: Any = ...) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...
    def assignment(self) -> list[TopicPartition]: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def commit(self, offsets: list[TopicPartition], asynchronous: bool = ...) -> Any: ...
    def consumer_group_metadata(self) -> Any: ...
    def close(self) -> None: ...


class Committer(Protocol):
    """Makes the tracker's positions durable; runs on the poll thread."""

    def commit(self, consumer: KafkaConsumerLike, partitions: list[TopicPartitionKey] | None, wait: bool = True) -> None:
        """`wait` False: the commit may complete later (a periodic commit)."""
        ...

    def committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback, served within `consume`, for a commit that did not wait."""
        ...

    def forget(self, partitions: list[TopicPartitionKey]) -> None: ...

    def due(self) -> bool:
        """True when a commit should happen before the next interval (a size bound)."""
        ...


class RecordSource(Protocol):
    """Hands the pipeline records from its own poll thread, each registered with the offset
    tracker first, never more in flight than the intake limit; makes delivered positions durable."""

    assigned: set[TopicPartitionKey]  # the partitions being read (readiness)
    lag: dict[TopicPartitionKey, int]  # records left to read, per partition, where known

    def start(self) -> None:
        """Begin reading (subscribe or assign) and start the poll thread."""
        ...

    def stop_accepting(self) -> None:
        """Stop handing on new records (shutdown); positions keep becoming durable until `close`."""
        ...

    def hold(self, held: bool) -> None:
        """While held (a dependency is down), take no new records: the records in flight wait,
        positions stay where delivery left them; safe to call from any thread."""
        ...

    def close(self, timeout: float = 30.0) -> None:
        """Make the last delivered positions durable and release the client; after the sink flushed."""
        ...


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


@dataclass(frozen=True)
class SourceOptions:
    """What a record source is asked to read and how, from the settings (`kafka`, `pipeline`)."""

    bootstrap_servers: str
    group_id: str
    client: dict[str, Any]  # librdkafka consumer options from the configuration
    topics: tuple[str, ...]
    max_in_flight_events: int
    max_in_flight_bytes: int
    commit_interval_s: float  # how often delivered positions are made durable
    revoke_drain_s: float
    statistics_interval_ms: int = 0


@dataclass(frozen=True)
class SourceWiring:
    """What the pipeline connects a record source to."""

    tracker: OffsetTracker
    deliver: Callable[[Received], None]  # called on the poll thread with each poll batch
    on_fatal: Callable[[str], None]
    committer: Committer | None = None  # None: commit the tracker's positions to the group
    on_assigned: Callable[[Any, list[TopicPartition]], None] | None = None  # state rebuilds on assignment
    link: BrokerLink | None = None  # hears the client's connection failures and signs of life


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


SourceFactory = Callable[[SourceOptions, SourceWiring], RecordSource]
SinkFactory = Callable[[SinkOptions, SinkWiring], OutputSink]
