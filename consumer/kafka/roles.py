"""The roles on the reading side of the pipeline: who reads records, who makes offsets durable.

Contracts only: Protocols and the plain options they are built from; no implementation is
imported here. The implementations:

- `RecordSource`: `consumer.kafka.source.Source` (a consumer group) and
  `consumer.replay.source.ReplaySource` (assigned partitions, a fixed offset range);
- `Committer`: `consumer.kafka.source.OffsetCommitter` and `consumer.sinks.kafka.TransactionalSink`.

The writing side, the `OutputSink` role, is `consumer.sinks.roles`.

`Pipeline` builds a `SourceOptions` from the settings and passes it, with what it wires the
source to, to its source factory (`SourceFactory`), so that a replacement (the replay's) takes
one typed object, not a mirror of the pipeline's keyword list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import KafkaError, Message, TopicPartition

if TYPE_CHECKING:
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


SourceFactory = Callable[[SourceOptions, SourceWiring], RecordSource]
