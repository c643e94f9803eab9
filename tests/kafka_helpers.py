"""Small helpers around the real broker: topics, producing, reading back, committed offsets."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.kafka.devkafka import create_topics  # noqa: F401 - re-exported for the tests


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    count = 0
    key_iter = iter(keys) if keys is not None else None
    for value in values:
        key = next(key_iter) if key_iter is not None else None
        kwargs = {"partition": partition} if partition is not None else {}
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
    assert producer.flush(30) == 0
    producer.close()
    return count


def event_json(i: int, content: str | None = None, **fields: object) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "content": content or f"message number {i}", **fields})


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0, read_committed: bool = False) -> list:
    """Read a topic from the start until `expected` records arrived (or timeout); returns messages."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
        # A short extra read catches records beyond the expected count (duplicates).
        for message in consumer.consume(500, timeout=1.0):
            if message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def decoded(messages: list) -> list[dict]:
    return [orjson.loads(m.value()) for m in messages]


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import KafkaException

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        for attempt in range(5):
            try:
                found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
                return {tp.partition: tp.offset for tp in found}
            except KafkaException:
                if attempt == 4:  # e.g. NOT_COORDINATOR right after a topic deletion or a broker restart
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def commits_reach(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> bool:
    """True when the group's commits are at `ends` (`end_offsets`) on every partition that has
    records. An empty partition has nothing to commit: records produced without a key can all
    land in one partition (the sticky partitioner fills a batch at a time)."""
    committed = committed_offsets(bootstrap, group, topic, len(ends))
    return all(committed[partition] == end for partition, end in ends.items() if end > 0)


def wait_for(condition, timeout: float, interval: float = 0.2, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Collector:
    """Keeps reading topics from the start; `collect()` returns everything read so far."""

    def __init__(self, bootstrap: str, *topics: str, read_committed: bool = False):
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("collector"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            }
        )
        self._consumer.subscribe(list(topics))
        self.messages: list = []

    def collect(self, wait: float = 0.2) -> list:
        for message in self._consumer.consume(1000, timeout=wait):
            if message.error() is None:
                self.messages.append(message)
        return self.messages

    def until(self, count: int, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            self.collect()
        return self.messages

    def close(self) -> None:
        self._consumer.close()


def covered_offsets(messages: list) -> list[tuple[int, int]]:
    """(partition, offset) of the input record behind each verdict or dead letter."""
    return [(d["source"]["partition"], d["source"]["offset"]) for d in decoded(messages)]


def create_topic(bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
    """One topic with topic-level settings (e.g. max.message.bytes), visible when this returns."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    admin.create_topics([topic])[name].result(30)
    wait_for(lambda: len(admin.list_topics(name, timeout=5).topics[name].partitions) == partitions, timeout=30,
             message=f"topic {name} visible")  # fmt: skip


def set_topic_config(bootstrap: str, name: str, **settings: str) -> None:
    """Change topic-level settings of an existing topic (incremental: the others stay)."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    entries = [ConfigEntry(k.replace("_", "."), v, incremental_operation=AlterConfigOpType.SET) for k, v in settings.items()]
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept until the futures resolve
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET http://127.0.0.1:port/path (the consumer's /metrics, /healthz, /readyz)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
