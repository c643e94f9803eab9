"""Liveness and readiness: what `/healthz` and `/readyz` answer (served by `http.py`).

- alive: the event loop beats every second (a wedged loop is restarted by the orchestrator),
  no fatal error is being handled, and the classifier reports no problem (an engine whose
  core died): asked every `telemetry.engine_health_interval_s` where it can tell;
- ready: the classifier has started, the brokers answer (after an outage: asked every few
  seconds until they do), nothing the records need is down (the reasoner fleet, ...: the
  outage stage's reason), and the consumer has partitions assigned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from consumer.classify import Classifier, ReportsHealth
from consumer.kafka.client_logs import BrokerLink

log = logging.getLogger(__name__)

LINK_PROBE_INTERVAL_S = 5.0
LINK_PROBE_TIMEOUT_S = 2.0


class Health:
    """The pipeline's liveness and readiness, as `(ok, reason)` pairs for the HTTP probes."""

    def __init__(
        self,
        classifier: Classifier,
        heartbeat_timeout_s: float,
        engine_health_interval_s: float,
        fatal: Callable[[], str | None],
        assigned: Callable[[], int | None],
        link: BrokerLink,
        unavailable: Callable[[], str | None] = lambda: None,
    ):
        """`fatal`: the fatal error being handled, if any; `assigned`: partitions assigned, None
        before the source exists; `link`: whether the brokers answer; `unavailable`: why a
        dependency of the records is down, None while none is."""
        self.classifier = classifier
        self.classifier_ready = False  # set by the pipeline once the classifier started
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._interval_s = engine_health_interval_s
        self._fatal = fatal
        self._assigned = assigned
        self._link = link
        self._unavailable = unavailable
        self._heartbeat = time.monotonic()
        self._engine_problem: str | None = None
        # Set by the pipeline once its sink exists: asks the brokers directly (blocking).
        self.ask_brokers: Callable[[float], bool] | None = None

    async def beat(self) -> None:
        """Marks the loop alive every second and asks the classifier for its health every
        `engine_health_interval_s`; runs until cancelled. While the brokers are unreachable it
        asks them too, every `LINK_PROBE_INTERVAL_S`: the clients' statistics say when they
        are back, but with statistics off only a record would, and none comes to a consumer
        that is not ready."""
        classifier = self.classifier
        check_health = classifier.check_health if isinstance(classifier, ReportsHealth) else None
        next_check = time.monotonic() + self._interval_s
        next_probe = 0.0
        while True:
            self._heartbeat = time.monotonic()
            if not self._link.up and self.ask_brokers is not None and self._heartbeat >= next_probe:
                next_probe = self._heartbeat + LINK_PROBE_INTERVAL_S
                if await asyncio.to_thread(self.ask_brokers, LINK_PROBE_TIMEOUT_S):
                    self._link.alive()
            if check_health is not None and self.classifier_ready and self._heartbeat >= next_check:
                next_check = self._heartbeat + self._interval_s
                try:
                    await check_health()
                    self._engine_problem = None
                except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
                    self._engine_problem = f"classifier {classifier.name} unhealthy: {type(exc).__name__}: {exc}"
                    log.error("%s", self._engine_problem)
            await asyncio.sleep(1.0)

    def alive(self) -> tuple[bool, str]:
        if not self.classifier_ready:
            return True, "starting"  # loading a model may hold the loop; the startup probe covers it
        stalled = time.monotonic() - self._heartbeat
        if stalled > self._heartbeat_timeout_s:
            return False, f"event loop unresponsive for {stalled:.0f}s"
        fatal = self._fatal()
        if fatal:
            return False, f"stopping after a fatal error: {fatal}"
        if self._engine_problem:
            return False, self._engine_problem
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.classifier_ready:
            return False, f"classifier {self.classifier.name} starting"
        if not self._link.up:
            return False, f"brokers unreachable: {self._link.reason}"
        outage = self._unavailable()
        if outage:
            return False, outage
        assigned = self._assigned()
        if not assigned:
            return False, "waiting for a partition assignment"
        return True, f"ok: {assigned} partitions assigned"
