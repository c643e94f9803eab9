"""Each sink plays the `OutputSink` role, and has exactly the abilities it claims: Protocols of
`consumer.sinks.roles`, checked on instances, never on classes."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from consumer.events import ReplayInfo
from consumer.kafka.budget import OutputBudget
from consumer.kafka.offsets import OffsetTracker
from consumer.replay.outputs import ReplayOutput
from consumer.sinks.fan_out import Destination, FanOutSink
from consumer.sinks.file import JsonlSink
from consumer.sinks.kafka import KafkaSink, TransactionalSink
from consumer.sinks.roles import AsksBrokers, CarriesReviewItems, OutputSink, SinkWiring
from tests.protocols import protocol_members, role_problems

# Never contacted: librdkafka connects only when something is produced.
PRODUCER = {"bootstrap.servers": "127.0.0.1:9"}
# Kafka's default limits, never read from a broker (there is none at PRODUCER's address).
UNREAD = OutputBudget(PRODUCER, "verdicts", "dlq")
WIRING = SinkWiring(on_delivered=lambda _tickets: None, on_fatal=lambda _reason: None, budget=UNREAD)
EVERY_KIND = frozenset({"verdict", "dead_letter", "review_item"})


def ignore(*_args: object) -> None:
    return None


def kafka_sink(wiring: SinkWiring) -> KafkaSink:
    return KafkaSink(PRODUCER, "verdicts", "dlq", wiring.on_delivered, wiring.on_fatal, budget=wiring.budget)


def test_every_sink_plays_the_output_sink_role(tmp_path):
    sink = kafka_sink(WIRING)
    transactional = TransactionalSink(PRODUCER, "verdicts", "dlq", OffsetTracker(), "tx", ignore, budget=UNREAD)
    jsonl = JsonlSink(tmp_path / "out.jsonl", ignore, ignore)
    stamped = ReplayOutput(jsonl, ReplayInfo(run_id="r", started_at=datetime.now(timezone.utc), policies=[]))
    fan = FanOutSink([Destination(kafka_sink, EVERY_KIND)], WIRING)
    try:
        for output in (sink, transactional, jsonl, stamped, fan):
            assert role_problems(output, OutputSink) == [], type(output).__name__
    finally:
        for closing in (sink, transactional, jsonl, fan):
            closing.close()


def test_each_sink_has_the_abilities_it_can_honour(tmp_path):
    sink = kafka_sink(WIRING)
    transactional = TransactionalSink(PRODUCER, "verdicts", "dlq", OffsetTracker(), "tx", ignore, budget=UNREAD)
    jsonl = JsonlSink(tmp_path / "out.jsonl", ignore, ignore)
    stamped = ReplayOutput(jsonl, ReplayInfo(run_id="r", started_at=datetime.now(timezone.utc), policies=[]))
    try:
        abilities = {
            type(s).__name__: (isinstance(s, CarriesReviewItems), isinstance(s, AsksBrokers))
            for s in (sink, transactional, jsonl, stamped)
        }
        assert abilities == {
            "KafkaSink": (True, True),
            "TransactionalSink": (True, True),  # review items join the verdict's transaction
            "JsonlSink": (True, False),
            "ReplayOutput": (False, False),  # a replay opens no reviews
        }
        for carrier in (sink, transactional, jsonl):
            assert role_problems(carrier, CarriesReviewItems) == [], type(carrier).__name__
        assert role_problems(transactional, AsksBrokers) == []
    finally:
        for closing in (sink, transactional, jsonl):
            closing.close()


def test_a_fan_out_has_the_abilities_of_its_destinations(tmp_path):
    def file_at(name: str):
        return lambda wiring: JsonlSink(tmp_path / name, wiring.on_delivered, wiring.on_fatal)

    with_kafka = FanOutSink([Destination(kafka_sink, EVERY_KIND), Destination(file_at("a"), EVERY_KIND)], WIRING)
    files_with_reviews = FanOutSink([Destination(file_at("b"), EVERY_KIND)], WIRING)
    files_without = FanOutSink([Destination(file_at("c"), frozenset({"verdict", "dead_letter"}))], WIRING)
    try:
        assert isinstance(with_kafka, CarriesReviewItems) and isinstance(with_kafka, AsksBrokers)
        assert isinstance(files_with_reviews, CarriesReviewItems) and not isinstance(files_with_reviews, AsksBrokers)
        assert not isinstance(files_without, CarriesReviewItems) and not isinstance(files_without, AsksBrokers)
    finally:
        for fan in (with_kafka, files_with_reviews, files_without):
            fan.close()


class Incomplete:
    held_back = 0

    def start(self, timeout: float) -> None:  # a required parameter the role does not pass
        return None


def test_the_check_finds_what_is_missing_or_called_differently():
    problems = role_problems(Incomplete(), OutputSink)
    assert any(p.startswith("start") for p in problems)
    assert "no method flush" in problems and "no method send_verdict" in problems
    assert not any("held_back" in p for p in problems)


@pytest.mark.parametrize("role", [OutputSink, CarriesReviewItems, AsksBrokers])
def test_the_roles_module_declares_members_to_check(role):
    _attributes, methods = protocol_members(role)
    assert methods  # an empty Protocol would make every check above pass
