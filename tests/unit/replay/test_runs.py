"""A replay run shared by many workers, without a broker: what a refusal names, the fingerprint, the
run seen as a checkpoint, and the worker's source against a consumer double (records outside the
plan never handed on, END committed only after delivery, the run finished only when every planned
partition's committed offset is at END)."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import pytest

from consumer.config import load_settings
from consumer.kafka.client import KafkaError, TopicPartition
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.roles import RecordSource, SourceOptions
from consumer.replay import ReplayError
from consumer.replay.bounds import OffsetRange
from consumer.replay.group_source import RunSource, run_consumer_config
from consumer.replay.runs import RunPlan, RunRequest, as_checkpoint, check_run_name, classifier_fingerprint
from tests.kafka_helpers import wait_for
from tests.protocols import role_problems


def request(**changes: Any) -> RunRequest:
    fields = dict(topic="chat", start="earliest", end="now", partitions=None, output="topic:out",
                  policies=["chat-harassment@1"], classifier="keyword/none:abc")  # fmt: skip
    return RunRequest(**{**fields, **changes})


def plan(ranges: dict[int, tuple[int, int]]) -> RunPlan:
    return RunPlan(**request().model_dump(), name="week1", proposal="p1",
                   started_at=datetime(2025, 6, 1, tzinfo=timezone.utc),
                   ranges={p: OffsetRange(start=s, end=e, next=s) for p, (s, e) in ranges.items()})  # fmt: skip


def test_a_refusal_names_each_option_that_differs_with_both_values():
    assert request().differences(request()) == []
    assert request().differences(request(end="100", policies=["chat-harassment@2"])) == [
        "--to: 'now' in the plan, '100' here",
        "the policy versions: ['chat-harassment@1'] in the plan, ['chat-harassment@2'] here",
    ]


@pytest.mark.parametrize("name", ["week1", "chat-2025.06_a", "x" * 100])
def test_a_run_name_is_a_group_id_and_key_safe(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["", "-week", "a/b", "week 1", "x" * 101])
def test_other_run_names_are_refused(name):
    with pytest.raises(ReplayError, match="--run"):
        check_run_name(name)


def test_the_fingerprint_follows_what_decides_not_where_the_fleet_is():
    base = {"classifier.kind": "reasoner", "classifier.reasoner": "remote", "engine.model": "m",
            "engine.endpoints": [{"url": "http://a:8000/v1"}]}  # fmt: skip
    fingerprint = classifier_fingerprint(load_settings(None, base))
    assert fingerprint.startswith("reasoner/remote:")
    moved = {**base, "engine.endpoints": [{"url": "http://b:8000/v1"}]}
    assert classifier_fingerprint(load_settings(None, moved)) == fingerprint
    assert classifier_fingerprint(load_settings(None, {**base, "engine.model": "other"})) != fingerprint
    assert classifier_fingerprint(load_settings(None, {**base, "classifier.kind": "cascade"})) != fingerprint


def test_the_run_as_a_checkpoint_starts_at_committed_offsets_within_the_plan():
    checkpoint = as_checkpoint(plan({0: (10, 20), 1: (0, 5), 2: (3, 3)}), {0: 15, 1: -1001, 2: 7})
    assert {p: r.next for p, r in checkpoint.ranges.items()} == {0: 15, 1: 0, 2: 3}
    assert checkpoint.run_id == "week1" and checkpoint.output == "topic:out"
    checkpoint.finish()
    assert checkpoint.covers("chat", 0, 10) and not checkpoint.covers("chat", 0, 20)


# -- the worker's source against a consumer double ---------------------------------------------


class _Message:
    def __init__(self, partition: int, offset: int, eof: bool = False):
        self._partition, self._offset, self._eof = partition, offset, eof

    def topic(self) -> str:
        return "chat"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b"{}"

    def error(self) -> KafkaError | None:
        return KafkaError(KafkaError._PARTITION_EOF) if self._eof else None


class _GroupConsumer:
    """Holds `records` (partition -> count) and hands all partitions to the one member, as a group
    of one would; committed offsets are kept as the group coordinator keeps them."""

    def __init__(self, records: dict[int, int], committed: dict[int, int] | None = None):
        self.records = records
        self.committed_offsets: dict[int, int] = dict(committed or {})
        self.positions: dict[int, int] = {}
        self.paused: set[int] = set()
        self.commits: list[tuple[int, int]] = []
        self._on_assign: Any = None
        self._lock = threading.Lock()

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self._on_assign = on_assign

    def consume(self, num_messages: int = 1, timeout: float = 0.0) -> list[_Message]:
        if self._on_assign is not None:
            assign, self._on_assign = self._on_assign, None
            assign(self, [TopicPartition("chat", p) for p in sorted(self.records)])
        with self._lock:
            messages = []
            for partition, position in sorted(self.positions.items()):
                if partition in self.paused:
                    continue
                while position < self.records[partition] and len(messages) < num_messages:
                    messages.append(_Message(partition, position))
                    position += 1
                if position >= self.records[partition] and len(messages) < num_messages:
                    messages.append(_Message(partition, position, eof=True))
                self.positions[partition] = position
            return messages

    def committed(self, partitions: list[TopicPartition], timeout: float = 0.0) -> list[TopicPartition]:
        with self._lock:
            return [TopicPartition("chat", tp.partition, self.committed_offsets.get(tp.partition, -1001))
                    for tp in partitions]  # fmt: skip

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.positions[tp.partition] = max(tp.offset, 0)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.partition for tp in partitions)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("chat", tp.partition, self.positions[tp.partition]) for tp in partitions]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        with self._lock:
            for tp in offsets:
                self.committed_offsets[tp.partition] = tp.offset
                self.commits.append((tp.partition, tp.offset))

    def close(self) -> None:
        return None


def _run_source(consumer: _GroupConsumer, ranges: dict[int, tuple[int, int]]):
    tracker = OffsetTracker()
    delivered: list[tuple[int, int]] = []
    finished = threading.Event()
    tickets: list = []

    def deliver(received) -> None:
        for message, ticket in received:
            delivered.append((message.partition(), message.offset()))
            tickets.append(ticket)

    source = RunSource(consumer, plan(ranges), tracker, deliver, on_fatal=pytest.fail, on_finished=finished.set,
                       max_in_flight_events=100, max_in_flight_bytes=1 << 20, commit_interval_s=0.05,
                       revoke_drain_s=0.0)  # fmt: skip
    return source, tracker, delivered, tickets, finished


def test_a_worker_hands_on_only_the_plan_and_commits_end_only_after_delivery():
    # Partition 0 holds 10 records, planned [2, 6); partition 1 is planned from an offset its
    # group committed (3) to its end; partition 2 is not planned.
    consumer = _GroupConsumer({0: 10, 1: 5, 2: 4}, committed={1: 3})
    source, tracker, delivered, tickets, finished = _run_source(consumer, {0: (2, 6), 1: (0, 5)})
    source.start()
    try:
        wait_for(lambda: len(delivered) >= 6, timeout=10, interval=0.05, message="the planned records")
        assert sorted(delivered) == [(0, 2), (0, 3), (0, 4), (0, 5), (1, 3), (1, 4)]
        assert not finished.wait(0.3)
        assert consumer.committed_offsets.get(0, -1001) < 6 and consumer.committed_offsets[1] == 3  # none delivered
        tracker.done_many(tickets)
        assert finished.wait(10), "the run did not finish once every output was delivered"
        assert consumer.committed_offsets[0] == 6 and consumer.committed_offsets[1] == 5
        assert 2 not in consumer.committed_offsets
    finally:
        source.close()
    assert sorted(delivered) == [(0, 2), (0, 3), (0, 4), (0, 5), (1, 3), (1, 4)]


def test_a_worker_holding_finished_partitions_waits_for_the_others_before_finishing():
    # Its own partition is at END already; the other planned partition (held by nobody here) is not.
    consumer = _GroupConsumer({0: 3}, committed={0: 3, 1: 2})
    source, _, delivered, _, finished = _run_source(consumer, {0: (0, 3), 1: (0, 8)})
    source.start()
    try:
        assert not finished.wait(1.5)
        consumer.commit([TopicPartition("chat", 1, 8)])  # the other worker's last commit
        assert finished.wait(10)
    finally:
        source.close()
    assert delivered == []


def test_a_workers_source_plays_the_record_source_role():
    source, *_ = _run_source(_GroupConsumer({0: 1}), {0: (0, 1)})
    assert role_problems(source, RecordSource) == []


def test_a_worker_joins_the_runs_group_with_the_live_group_options_dropped():
    live = {"group.instance.id": "live-0", "group.protocol": "consumer", "partition.assignment.strategy": "range",
            "enable.auto.commit": True, "fetch.min.bytes": 1024}  # fmt: skip
    options = SourceOptions(bootstrap_servers="b:9092", group_id="safeguard-replay-week1", client=live,
                            topics=("chat",), max_in_flight_events=10, max_in_flight_bytes=1 << 20,
                            commit_interval_s=1.0, revoke_drain_s=1.0)  # fmt: skip
    config = run_consumer_config(options)
    assert "group.instance.id" not in config and "group.protocol" not in config
    assert config["partition.assignment.strategy"] == "cooperative-sticky" and config["enable.auto.commit"] is False
    assert config["group.id"] == "safeguard-replay-week1" and config["fetch.min.bytes"] == 1024
    assert config["client.id"].startswith("replay-")  # `replay status` names the holders by it
