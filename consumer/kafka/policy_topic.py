"""The policy topic's Kafka side: read it whole, follow it, write one record to it.

What a record means (a policy, its version, whether it is acceptable) is the policy layer's
(`consumer.policy.topic`); this module only moves keys, values (None: a tombstone) and headers.
The reader is assigned every partition from the earliest offset, belongs to no group and commits
nothing: every instance reads the whole topic, which compaction keeps to about one record per
key, so there is no position worth keeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.errors import Unavailable
from consumer.kafka.poll import POLL_BATCH
from consumer.kafka.ranges import assign_from_earliest

log = logging.getLogger(__name__)

DEPENDENCY = "policy topic"  # the name an outage of it carries (`/readyz`, safeguard.dependency.up)
FOLLOW_POLL_S = 0.5  # how long the follower waits for records: also how long `close` may wait for it


@dataclass(frozen=True)
class TopicRecord:
    """One record of the policy topic as read: `value` None is a tombstone."""

    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    where: str  # topic[partition]@offset, for logs

    @classmethod
    def of(cls, message: Message) -> TopicRecord:
        headers = {name: raw.decode("utf-8", "replace") for name, raw in message.headers() or [] if raw is not None}
        where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        return cls(message.key(), message.value(), headers, where)


class PolicyTopicReader:
    """Reads the policy topic from its beginning (`catch_up`), then follows it on a thread of
    its own (`follow`), handing each batch of records to `on_records` in topic order per key."""

    def __init__(self, client: dict[str, Any], topic: str, on_records: Callable[[list[TopicRecord]], None]):
        """`client`: librdkafka options (bootstrap.servers and the security ones)."""
        self._client = {**client, "group.id": f"safeguard-policy-reader.{topic}", "enable.auto.commit": False,
                        "enable.partition.eof": False}  # fmt: skip
        self.topic = topic
        self._on_records = on_records
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def catch_up(self, timeout_s: float) -> int:
        """Read every record the topic holds now; returns how many. Raises `Unavailable` when the
        topic cannot be described or read to its end within `timeout_s` (tried afresh next time)."""
        consumer = Consumer(self._client)
        try:
            ends = assign_from_earliest(consumer, [self.topic])
            read = 0
            deadline = time.monotonic() + timeout_s
            while ends:
                if time.monotonic() > deadline:
                    raise Unavailable(DEPENDENCY, f"{self.topic!r} not read to its end within {timeout_s:g} s "
                                      f"({len(ends)} partitions left)")  # fmt: skip
                read += self._deliver(consumer.consume(POLL_BATCH, timeout=FOLLOW_POLL_S))
                # By position, not by the last offset seen: transaction markers take offsets too.
                for tp in consumer.position([TopicPartition(self.topic, p) for _, p in ends]):
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        del ends[(tp.topic, tp.partition)]
        except (RuntimeError, KafkaException) as exc:  # the topic could not be described, the brokers did not answer
            consumer.close()
            raise Unavailable(DEPENDENCY, f"{self.topic!r} cannot be read: {exc}") from None
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        return read

    def follow(self) -> None:
        """Hand on every record after those `catch_up` read, until `close`."""
        self._thread = threading.Thread(target=self._run, name="policy-topic", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(FOLLOW_POLL_S * 10)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _run(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                self._deliver(self._consumer.consume(POLL_BATCH, timeout=FOLLOW_POLL_S))
            except Exception:  # noqa: BLE001 - following must outlive a bad batch: the last good policies stay
                log.exception("following the policy topic %r failed for one batch", self.topic)

    def _deliver(self, messages: list[Message]) -> int:
        records = [TopicRecord.of(m) for m in messages if m.error() is None]
        if records:
            self._on_records(records)
        return len(records)


def read_policy_topic(client: dict[str, Any], topic: str, timeout_s: float) -> list[TopicRecord]:
    """Every record the topic holds now, in order per partition (`policy list`, `show`, `promote`)."""
    records: list[TopicRecord] = []
    reader = PolicyTopicReader(client, topic, records.extend)
    try:
        reader.catch_up(timeout_s)
    finally:
        reader.close()
    return records


def write_policy_record(
    producer: dict[str, Any], topic: str, key: str, value: bytes | None, headers: dict[str, str], timeout_s: float
) -> str:
    """Write one record (value None: a tombstone) and wait for the brokers' acknowledgement;
    returns where it landed. Raises `Unavailable` when it was not acknowledged in time."""
    client = Producer({**producer, "acks": "all", "enable.idempotence": True})
    outcome: list[KafkaError | Message] = []

    def report(error: KafkaError | None, message: Message) -> None:
        outcome.append(error if error is not None else message)

    try:
        client.produce(topic, value=value, key=key.encode(), headers=[(k, v.encode()) for k, v in headers.items()],
                       on_delivery=report)  # fmt: skip
        if client.flush(timeout_s):
            client.purge()  # not acknowledged in time: closing must not wait for it
        reported = list(outcome)  # a purged record's report, if closing serves one, is no answer from the brokers
    finally:
        client.close()
    if not reported:
        raise Unavailable(DEPENDENCY, f"no acknowledgement from the brokers within {timeout_s:g} s")
    if isinstance(reported[0], KafkaError):
        raise Unavailable(DEPENDENCY, f"the brokers refused the record: {reported[0].str()}")
    landed = reported[0]
    return f"{landed.topic()}[{landed.partition()}]@{landed.offset()}"
