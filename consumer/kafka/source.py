"""The source: owns "polling never stops, and what is in flight stays bounded".

A confluent-kafka consumer is polled on its own thread, so a slow classifier can never let
`max.poll.interval.ms` expire. Each record is registered with the offset tracker before it
is handed on. The intake limit (`pipeline.max_in_flight_*`) counts records consumed and not
yet committed, the delivered ones too: a crash redoes them all, so the limit bounds the
duplicates a crash can cause. When it is reached (records or bytes), the poll thread first
waits up to `PAUSE_AFTER_S` for room, since pausing has a price: librdkafka drops
what it prefetched and takes a fetch round trip (hundreds of milliseconds) to resume. A
limit still reached after that means a slow classifier: every assigned partition is paused;
polling goes on (serving rebalances and keeping the membership alive) and the partitions
resume once half the limit has drained. While a dependency is down (`hold`: the reasoner fleet,
a schema registry) every assigned partition is paused the same way, until it is back. Commits also happen on this thread, of the
positions the tracker allows: every `commit_interval_s` and whenever half the limit is
committable, asynchronously, so a slow broker round trip never holds up polling (their
results come back within `consume`); on revoke, on close and while the limit is reached
synchronously (no `consume` serves a result then).

Rebalances use cooperative-sticky assignment. On revoke, the revoked partitions' in-flight
records get up to `revoke_drain_s` to finish, what completed is committed, and the rest is
forgotten (the new owner reads it again). On assign, reading starts from committed offsets.

The poll thread's lifecycle (start, stop accepting, close, the loop) is `PollingSource`'s
(`consumer.kafka.poll`), shared with the replay's source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.kafka.client_logs import BrokerLink, client_options
from consumer.kafka.offsets import OffsetTracker, TopicPartitionKey
from consumer.kafka.poll import POLL_BATCH, POLL_TIMEOUT_S, PollingSource
from consumer.kafka.roles import Committer, KafkaConsumerLike, Received, SourceOptions, SourceWiring

log = logging.getLogger(__name__)

CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    # librdkafka prefetches up to this much per consumer (default 64 MiB); the intake limit
    # already bounds the work ahead, so a smaller prefetch bounds memory without costing speed.
    "queued.max.messages.kbytes": 16384,
}
# What at-least-once rests on; user options cannot override these.
CONSUMER_REQUIRED: dict[str, Any] = {"enable.auto.commit": False, "enable.auto.offset.store": False}

# How long a full intake limit may hold the poll thread (rebalance callbacks wait as long) before
# the partitions are paused instead.
PAUSE_AFTER_S = 0.5


class OffsetCommitter:
    """At-least-once: commits the positions of delivered records to the consumer group, every
    interval and whenever `commit_at` delivered records wait (half the window)."""

    def __init__(self, tracker: OffsetTracker, commit_at: int):
        self._tracker = tracker
        self._commit_at = commit_at
        self._committing = False  # an asynchronous commit awaits its result

    def commit(self, consumer: KafkaConsumerLike, partitions: list[TopicPartitionKey] | None, wait: bool = True) -> None:
        positions = self._tracker.commit_positions(partitions)
        if not positions:
            return
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]
        try:
            # Asynchronous: the outcome reaches `committed` (librdkafka's commit callback).
            consumer.commit(offsets=offsets, asynchronous=not wait)
            if not wait:
                self._committing = True
                return
        except KafkaException as exc:
            # Not fatal: the positions stay pending and the next commit retries them.
            log.warning("commit failed, will retry: %s", exc.args[0] if exc.args else exc)
            return
        self._tracker.mark_committed(positions)

    def committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (served within `consume`): what the broker accepted."""
        self._committing = False
        if error is not None:
            log.warning("commit failed, will retry: %s", error.str())  # the positions stay pending
            return
        self._tracker.mark_committed({(tp.topic, tp.partition): tp.offset for tp in partitions if tp.error is None})

    def forget(self, partitions: list[TopicPartitionKey]) -> None:
        self._tracker.forget(partitions)

    def due(self) -> bool:
        return not self._committing and self._tracker.committable() >= self._commit_at


class Source(PollingSource):
    """Reads the input topics as a member of the consumer group (`RecordSource`); commits
    through its `Committer`: the group's offsets (at-least-once) or a transaction (exactly-once)."""

    def __init__(
        self,
        consumer: KafkaConsumerLike,
        topics: list[str],
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        commit_interval_s: float,
        revoke_drain_s: float,
        committer: Committer | None = None,
        on_assigned: Callable[[KafkaConsumerLike, list[TopicPartition]], None] | None = None,
    ):
        """`on_assigned` runs on the poll thread after an assignment, before any of its records
        are handed on (state rebuilds)."""
        super().__init__(consumer, tracker, deliver, on_fatal, max_in_flight_events, max_in_flight_bytes,
                         persist_interval_s=commit_interval_s, thread_name="source-poll")  # fmt: skip
        self._committer = committer or OffsetCommitter(tracker, commit_at=max(1, max_in_flight_events // 2))
        self._on_assigned = on_assigned
        self._topics = topics
        self._revoke_drain_s = revoke_drain_s
        self._paused = False
        self._full_since: float | None = None
        self.rebalances = 0  # `lag` comes from librdkafka statistics, when enabled
        self.link: BrokerLink | None = None  # the brokers' reachability, when the wiring has one

    @classmethod
    def connect(cls, options: SourceOptions, wiring: SourceWiring) -> Source:
        """A `SourceFactory`: a source on a new confluent-kafka consumer in `options.group_id`.
        The client's logs go through the structured logger; `wiring.link` hears its connection
        failures and signs of life."""
        config = {**CONSUMER_DEFAULTS, **options.client, **CONSUMER_REQUIRED}
        config.update({"bootstrap.servers": options.bootstrap_servers, "group.id": options.group_id})
        config.update(client_options("consumer", wiring.link))
        holder: list[Source] = []
        config["on_commit"] = lambda error, partitions: holder[0].on_commit(error, partitions) if holder else None
        if options.statistics_interval_ms:
            config["statistics.interval.ms"] = options.statistics_interval_ms
            config["stats_cb"] = lambda stats: holder[0].on_statistics(stats) if holder else None
        source = cls(
            Consumer(config), list(options.topics), wiring.tracker, wiring.deliver, wiring.on_fatal,
            options.max_in_flight_events, options.max_in_flight_bytes, options.commit_interval_s,
            options.revoke_drain_s, wiring.committer, wiring.on_assigned,
        )  # fmt: skip
        source.link = wiring.link
        holder.append(source)
        return source

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._committer.committed(error, partitions)

    def on_statistics(self, stats_json: str) -> None:
        """librdkafka's statistics: keep the consumer lag of each assigned partition."""
        stats = orjson.loads(stats_json)
        if self.link is not None:
            self.link.on_statistics(stats)
        lag = {}
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, p in topic_stats.get("partitions", {}).items():
                key = (topic, int(partition))
                if key in self.assigned and p.get("consumer_lag", -1) >= 0:
                    lag[key] = p["consumer_lag"]
        self.lag = lag

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was delivered and leave the group; call after the sink has flushed."""
        self._revoke_drain_s = 0.0  # leaving: nothing more will complete
        super().close(timeout)

    # -- the poll thread -------------------------------------------------------------------

    def _begin(self) -> None:
        self._consumer.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _step(self) -> Received:
        if self._apply_backpressure():
            return self._poll_once()
        if self._tracker.committable():
            self._commit()  # delivered records hold the full intake limit: free it, waiting
        self._tracker.wait_for_room(self._max_events, self._max_bytes, 0.01)
        return []

    def _due(self) -> bool:
        return self._committer.due()

    def _persist(self, final: bool) -> None:
        # Periodic commits do not wait: a slow broker round trip never holds up polling.
        self._commit(wait=final)

    def _poll_once(self) -> Received:
        received: Received = []
        # Never ask for more than the intake limit has room for, so it holds exactly (paused or not).
        room = max(1, min(POLL_BATCH, self._max_events - self._tracker.uncommitted()))
        # Wait for the first record only, then take what is already fetched: a trickle of
        # records is handed on at once instead of waiting out the timeout for a full batch.
        messages = self._consumer.consume(num_messages=1, timeout=POLL_TIMEOUT_S)
        if messages and room > 1:
            messages += self._consumer.consume(num_messages=room - 1, timeout=0)
        kept, coordinates = [], []
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
                continue
            if not self._accepting:
                continue  # never tracked, so never committed: read again after a restart
            value = message.value()
            kept.append(message)
            coordinates.append((message.topic(), message.partition(), message.offset(), len(value) if value else 0))
        if kept:  # one lock for the poll batch, not one per record
            received = list(zip(kept, self._tracker.track_many(coordinates)))
        return received

    def _on_message_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        # Bad credentials or certificates do not heal by retrying: stop with the reason.
        if error.fatal() or error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            raise KafkaException(error)
        log.warning("consumer: %s", error.str())

    def _apply_backpressure(self) -> bool:
        """Pause or resume the assigned partitions by the intake limit and the hold (a dependency
        down: `hold`); False: the limit is reached but
        not yet for `PAUSE_AFTER_S`, so wait for room before polling again."""
        events, size = self._tracker.uncommitted(), self._tracker.in_flight_bytes
        full = events >= self._max_events or size >= self._max_bytes
        if not full:
            self._full_since = None
        elif self._accepting and not self._paused:
            now = time.monotonic()
            if self._full_since is None:
                self._full_since = now
            if now - self._full_since < PAUSE_AFTER_S:
                return False
        if not self._accepting or full or self._held:
            if not self._paused:
                self._consumer.pause(self._consumer.assignment())
                self._paused = True
        elif self._paused and events <= self._max_events // 2 and size <= self._max_bytes // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
        return True

    def _commit(self, partitions: list[TopicPartitionKey] | None = None, wait: bool = True) -> None:
        self._committer.commit(self._consumer, partitions, wait)

    # -- rebalance callbacks (run on the poll thread, inside consume) ------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalances += 1
        consumer.incremental_assign(partitions)
        if self._paused and partitions:
            consumer.pause(partitions)
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned %s", _names(partitions))
        if self._on_assigned is not None and partitions:
            try:
                self._on_assigned(consumer, partitions)
            except Exception:  # noqa: BLE001 - a failed rebuild costs context, never records
                log.exception("rebuilding state for %s failed; continuing without it", _names(partitions))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalances += 1
        keys = [(tp.topic, tp.partition) for tp in partitions]
        if keys and not self._tracker.wait_until_drained(self._revoke_drain_s, keys):
            log.warning("revoked %s with records still in flight; the new owner re-reads them", _names(partitions))
        self._commit(keys)
        self._committer.forget(keys)
        self.assigned.difference_update(keys)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._committer.forget(keys)
        self.assigned.difference_update(keys)
        log.warning("lost %s; uncommitted records will be read again by their new owner", _names(partitions))


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"

