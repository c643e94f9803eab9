"""BrokerLink: one WARNING each way per outage; each change stands for its settle time, so the
stragglers of the state before it do not count as one more change."""

from __future__ import annotations

import logging

import pytest

from consumer.kafka.client_logs import BrokerLink


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def link(clock: Clock) -> BrokerLink:
    return BrokerLink("127.0.0.1:9092", logger=logging.getLogger("test.brokers"), settle_s=5.0, clock=clock)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.brokers" and r.levelno == logging.WARNING]


def test_signs_of_life_in_the_first_seconds_of_an_outage_are_not_a_recovery(link, clock, caplog):
    """A broker shutting down answers once more after the first failure; stale statistics arrive."""
    caplog.set_level(logging.WARNING, "test.brokers")
    link.down("127.0.0.1:9092/1: Disconnected")
    clock.now += 0.3
    link.alive()  # the shutting-down broker took one more connection
    link.down("127.0.0.1:9092/bootstrap: Connection refused")
    clock.now += 4.0
    link.alive()
    assert not link.up and link.changes == 1
    assert link.reason == "127.0.0.1:9092/1: Disconnected"
    clock.now += 1.0  # 5.3 s after the first failure
    link.alive()
    assert link.up and link.changes == 2
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("brokers unreachable (127.0.0.1:9092): 127.0.0.1:9092/1: Disconnected")
    assert warnings[1] == "brokers reachable again (127.0.0.1:9092) after 5 s"


def test_a_failure_logged_just_after_the_recovery_is_not_a_new_outage(link, clock, caplog):
    """One client found the broker back; another's attempt, refused just before it listened, is logged after."""
    caplog.set_level(logging.WARNING, "test.brokers")
    link.down("1/1 brokers are down")
    clock.now += 8
    link.alive()
    clock.now += 0.06
    link.down("127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused")
    assert link.up and link.changes == 2
    clock.now += 5  # a genuine outage goes on failing: it counts once the recovery has stood
    link.down("127.0.0.1:9092/1: Disconnected")
    assert not link.up and link.reason == "127.0.0.1:9092/1: Disconnected"
    assert [w.split(" (")[0] for w in _warnings(caplog)] == ["brokers unreachable", "brokers reachable again",
                                                            "brokers unreachable"]  # fmt: skip


def test_each_outage_is_one_warning_each_way(link, clock, caplog):
    caplog.set_level(logging.WARNING, "test.brokers")
    for _ in range(2):
        link.down("1/1 brokers are down")
        link.down("1/1 brokers are down")
        clock.now += 10
        link.alive()
        link.alive()
        clock.now += 60
    assert link.up and link.changes == 4
    assert [w.split(" (")[0] for w in _warnings(caplog)] == ["brokers unreachable", "brokers reachable again"] * 2


def test_statistics_with_a_broker_up_are_a_sign_of_life(link, clock):
    link.down("1/1 brokers are down")
    clock.now += 6
    link.on_statistics({"brokers": {"127.0.0.1:9092/bootstrap": {"state": "INIT"}}})
    assert not link.up
    link.on_statistics({"brokers": {"127.0.0.1:9092/1": {"state": "UP"}}})
    assert link.up
