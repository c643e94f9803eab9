"""The outage stage through its public interface: one WARNING per change, intake held while any
dependency is down, the probe (or the waiting records) deciding when it is back, the bound."""

from __future__ import annotations

import asyncio
import logging

import pytest

from consumer.errors import Unavailable
from consumer.pipeline.outage import Outage


class Calls:
    def __init__(self) -> None:
        self.holds: list[bool] = []
        self.failures: list[str] = []


def outage(calls: Calls, timeout_s: float | None = None, probe=None) -> Outage:
    return Outage(calls.holds.append, calls.failures.append, timeout_s, probe)


def test_an_outage_holds_intake_once_says_why_and_a_probe_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="consumer.pipeline.outage")
    calls = Calls()
    answers = [False, True]
    probed: list[str] = []

    async def probe(dependency: str) -> bool:
        probed.append(dependency)
        return answers.pop(0)

    async def scenario() -> tuple[str | None, str | None]:
        stage = outage(calls, probe=probe)
        for _ in range(3):  # three records find it down: one outage
            stage.report(Unavailable("reasoner", "connection refused", retry_after_s=0.05))
        during = stage.problem()
        await asyncio.wait_for(stage.wait("reasoner"), timeout=5)
        return during, stage.problem()

    during, after = asyncio.run(scenario())
    assert during is not None and "reasoner unavailable" in during and "connection refused" in during
    assert after is None
    assert calls.holds == [True, False]
    assert probed == ["reasoner", "reasoner"]  # not back at the first probe, back at the second
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and warnings[0].startswith("reasoner unavailable") and "back after" in warnings[1]


def test_without_a_probe_the_waiting_records_try_again_and_the_first_answer_ends_it() -> None:
    calls = Calls()

    async def scenario() -> tuple[bool, str | None]:
        stage = outage(calls)
        stage.report(Unavailable("schema registry", "503", retry_after_s=0.05))
        await asyncio.wait_for(stage.wait("schema registry"), timeout=5)  # released to try again
        still_down = stage.problem() is not None
        stage.answered("schema registry")
        return still_down, stage.problem()

    still_down, after = asyncio.run(scenario())
    assert still_down and after is None
    assert calls.holds == [True, False]


def test_intake_resumes_only_when_every_dependency_is_back() -> None:
    calls = Calls()

    async def scenario() -> None:
        stage = outage(calls)
        stage.report(Unavailable("reasoner", "down", retry_after_s=1))
        stage.report(Unavailable("schema registry", "down", retry_after_s=1))
        stage.answered("reasoner")
        assert calls.holds == [True]
        stage.answered("schema registry")
        await stage.close()

    asyncio.run(scenario())
    assert calls.holds == [True, False]


def test_a_dependency_down_past_the_bound_stops_the_run() -> None:
    calls = Calls()

    async def never(dependency: str) -> bool:
        return False

    async def scenario() -> None:
        stage = outage(calls, timeout_s=0.2, probe=never)
        stage.report(Unavailable("reasoner", "connection refused", retry_after_s=0.05))
        for _ in range(100):
            if calls.failures:
                break
            await asyncio.sleep(0.05)
        await stage.close()

    asyncio.run(scenario())
    (reason,) = calls.failures
    assert reason.startswith("reasoner unavailable for more than 0.2 s (pipeline.outage_timeout_s)")


def test_downtime_grows_only_while_something_is_down() -> None:
    calls = Calls()

    async def scenario() -> tuple[float, float, float, float]:
        stage = outage(calls)
        before = stage.downtime_s()
        stage.report(Unavailable("reasoner", "down", retry_after_s=1))
        await asyncio.sleep(0.1)
        during = stage.downtime_s()
        stage.answered("reasoner")
        after = stage.downtime_s()
        await asyncio.sleep(0.1)
        return before, during, after, stage.downtime_s()

    before, during, after, later = asyncio.run(scenario())
    assert before == 0 and 0.1 <= during <= after < 1.0
    assert later == after  # nothing down: a request failing now lost no time to an outage
