"""The Kafka sink's delivery reports against the real broker. Its producer reports failures only
(`delivery.report.only.error`) and a delivered output is told by its report's release
(`consumer.sinks.kafka._Report`): each delivered output must be handed on once, and a failed one
never, though its report is released too."""

from __future__ import annotations

import time

import pytest

from consumer.kafka.client import Message
from consumer.kafka.offsets import Ticket
from consumer.sinks.kafka import KafkaSink
from tests.kafka_helpers import create_topics, read_all, unique

pytestmark = pytest.mark.kafka


def served_until_idle(sink: KafkaSink, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sink.awaiting_reports() and time.monotonic() < deadline:
        sink.serve()
        time.sleep(0.01)
    sink.serve()


def record(offset: int) -> Message:
    return Message(topic="in", partition=0, offset=offset, key=b"k%d" % offset, value=b"{}")


def test_every_delivered_output_is_handed_on_once_and_counted(kafka):
    verdicts, dead_letters = unique("reports"), unique("reports-dlq")
    create_topics(kafka, verdicts, dead_letters, partitions=3)
    delivered: list[Ticket] = []
    fatal: list[str] = []
    sink = KafkaSink({"bootstrap.servers": kafka}, verdicts, dead_letters, delivered.extend, fatal.append)
    tickets = [Ticket("in", 0, offset, 1) for offset in range(300)]
    for ticket in tickets[:250]:
        sink.send_verdict({"event_id": str(ticket.offset)}, record(ticket.offset), ticket, [])
    for ticket in tickets[250:]:
        sink.send_dead_letter({"event_id": str(ticket.offset)}, record(ticket.offset), ticket, [])
    served_until_idle(sink, timeout=30)
    sink.close()

    assert fatal == []
    assert sorted(delivered) == tickets  # each once
    assert (sink.verdicts_delivered, sink.dead_letters_delivered) == (250, 50)
    assert len(read_all(kafka, verdicts, expected=250)) == 250
    assert len(read_all(kafka, dead_letters, expected=50)) == 50


def test_a_failed_delivery_is_never_handed_on_though_its_report_is_released(kafka):
    """The dead letter topic does not exist (the broker creates none): its delivery times out and
    stops the sink; the verdicts beside it are delivered and counted, the dead letter is not."""
    verdicts, missing = unique("reports"), unique("reports-missing")
    create_topics(kafka, verdicts, partitions=1)
    delivered: list[Ticket] = []
    fatal: list[str] = []
    sink = KafkaSink({"bootstrap.servers": kafka, "message.timeout.ms": 2000}, verdicts, missing,
                     delivered.extend, fatal.append, delivery_retries=0)  # fmt: skip
    tickets = [Ticket("in", 0, offset, 1) for offset in range(21)]
    for ticket in tickets[:20]:
        sink.send_verdict({"event_id": str(ticket.offset)}, record(ticket.offset), ticket, [])
    sink.send_dead_letter({"event_id": "20"}, record(20), tickets[20], [])
    served_until_idle(sink, timeout=30)
    sink.close()

    assert len(fatal) == 1 and repr(missing) in fatal[0]
    assert sorted(delivered) == tickets[:20]
    assert (sink.verdicts_delivered, sink.dead_letters_delivered) == (20, 0)
