"""The fan-out: an output is delivered when every destination that takes it delivered it; a fatal
error in any destination is fatal. Destinations are real files (`JsonlSink`), synced by hand."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from consumer.config.sinks import FileSinkSettings
from consumer.kafka.budget import OutputBudget
from consumer.kafka.offsets import Ticket
from consumer.sinks.fan_out import Destination, FanOutSink, configured
from consumer.sinks.file import JsonlSink
from consumer.sinks.roles import SinkOptions, SinkWiring

# Outputs to files only: the budget is never asked (no broker behind it).
BUDGET = OutputBudget({"bootstrap.servers": "127.0.0.1:9"}, "verdicts", "dlq")
RECORD = object()  # the input record: a file sink never reads it
VERDICTS_AND_LETTERS = frozenset({"verdict", "dead_letter"})


class Wired:
    """What the pipeline would be: the delivered tickets and the fatal reasons, as they come."""

    def __init__(self) -> None:
        self.delivered: list[Ticket] = []
        self.fatal: list[str] = []
        self.wiring = SinkWiring(on_delivered=self.delivered.extend, on_fatal=self.fatal.append, budget=BUDGET)


def files(tmp_path: Path, *takes: frozenset[str]) -> tuple[list[Destination], list[JsonlSink]]:
    """A destination per entry, each a file never synced until the test flushes it; the list
    fills as the fan-out opens them."""
    opened: list[JsonlSink] = []

    def opener(path: Path):
        def open_file(wiring: SinkWiring) -> JsonlSink:
            sink = JsonlSink(path, wiring.on_delivered, wiring.on_fatal, sync_interval_s=3600)
            opened.append(sink)
            return sink

        return open_file

    return [Destination(opener(tmp_path / f"{i}.jsonl"), kinds) for i, kinds in enumerate(takes)], opened


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_an_output_is_delivered_only_when_every_destination_has_it(tmp_path):
    wired = Wired()
    destinations, opened = files(tmp_path, VERDICTS_AND_LETTERS, VERDICTS_AND_LETTERS)
    fan = FanOutSink(destinations, wired.wiring)
    first, second = opened
    tickets = [Ticket("chat", 0, offset, 0) for offset in range(3)]
    for ticket in tickets[:2]:
        fan.send_verdict({"offset": ticket.offset}, RECORD, ticket, [])
    fan.send_dead_letter({"offset": 2}, RECORD, tickets[2], [])

    assert first.flush(0) == 0 and len(lines(first.path)) == 3
    assert wired.delivered == []  # the second file does not have them yet
    assert fan.flush(1.0) == 0
    assert wired.delivered == tickets
    assert [line["offset"] for line in lines(second.path)] == [0, 1, 2]
    assert (fan.verdicts_delivered, fan.dead_letters_delivered) == (2, 1)
    fan.close()


def test_each_output_goes_only_where_its_kind_is_taken_and_counts_once_per_output(tmp_path):
    wired = Wired()
    every = frozenset({"verdict", "dead_letter", "review_item"})
    destinations, opened = files(tmp_path, every, frozenset({"verdict", "dead_letter"}))
    fan = FanOutSink(destinations, wired.wiring)
    everything, verdicts_only = opened
    ticket = Ticket("chat", 0, 7, 0)
    fan.send_review_item("reviews", {"item": 1}, RECORD, ticket, [])
    fan.send_review_item("reviews", {"item": 2}, RECORD, ticket, [])
    fan.send_verdict({"verdict": 1}, RECORD, ticket, [])

    verdicts_only.flush(0)
    assert wired.delivered == []
    everything.flush(0)
    # Three outputs under one ticket: the output join downstream counts each of them.
    assert wired.delivered == [ticket, ticket, ticket]
    assert lines(verdicts_only.path) == [{"verdict": 1}]
    assert len(lines(everything.path)) == 3
    assert (fan.verdicts_delivered, fan.dead_letters_delivered) == (1, 0)
    fan.close()


def test_a_failing_destination_is_fatal_and_its_outputs_are_never_delivered(tmp_path):
    wired = Wired()
    destinations, opened = files(tmp_path, VERDICTS_AND_LETTERS)

    def device_full(wiring: SinkWiring) -> JsonlSink:  # every write reaches the disk as ENOSPC
        return JsonlSink(Path("/dev/full"), wiring.on_delivered, wiring.on_fatal, sync_interval_s=3600)

    fan = FanOutSink([*destinations, Destination(device_full, VERDICTS_AND_LETTERS)], wired.wiring)
    (healthy,) = opened
    ticket = Ticket("chat", 0, 0, 0)
    fan.send_verdict({"verdict": 1}, RECORD, ticket, [])

    assert fan.flush(1.0) == 1  # the full device never synced it
    assert len(wired.fatal) == 1 and "/dev/full" in wired.fatal[0]
    assert wired.delivered == []  # the healthy file has it, and that is not enough
    assert len(lines(healthy.path)) == 1
    fan.close()


@pytest.mark.parametrize("missing", ["verdict", "dead_letter"])
def test_a_fan_out_where_an_output_kind_has_no_destination_is_refused(tmp_path, missing):
    destinations, _ = files(tmp_path, VERDICTS_AND_LETTERS - {missing})
    with pytest.raises(ValueError, match=missing.replace("_", " ")):
        FanOutSink(destinations, Wired().wiring)


def test_the_configured_sink_is_the_primary_alone_without_files_and_a_fan_out_with_them(tmp_path):
    wired = Wired()
    opened: list[JsonlSink] = []

    def primary(options: SinkOptions, wiring: SinkWiring) -> JsonlSink:
        opened.append(JsonlSink(tmp_path / "primary.jsonl", wiring.on_delivered, wiring.on_fatal, sync_interval_s=3600))
        return opened[-1]

    assert configured(primary, []) is primary
    extra = FileSinkSettings(path=tmp_path / "letters.jsonl", outputs=["dead_letter"], sync_interval_s=3600)
    sink = configured(primary, [extra])(SinkOptions({}, "verdicts", "dlq", 3), wired.wiring)
    ticket, letter = Ticket("chat", 0, 0, 0), Ticket("chat", 0, 1, 0)
    sink.send_verdict({"verdict": 1}, RECORD, ticket, [])
    sink.send_dead_letter({"letter": 1}, RECORD, letter, [])
    opened[0].flush(0)
    assert wired.delivered == [ticket]  # the verdict goes to the primary only; the letter waits for the file
    assert sink.flush(1.0) == 0
    assert wired.delivered == [ticket, letter]
    assert lines(extra.path) == [{"letter": 1}]
    sink.close()
