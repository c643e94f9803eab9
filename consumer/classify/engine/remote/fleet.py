"""The fleet: owns "each endpoint gets at most what it can run without queuing".

Guarantees:
- **Least outstanding requests.** `acquire` hands out the endpoint with the fewest of this
  consumer's requests outstanding, among those that are up and below their limit; endpoints
  the request already failed on come last. When none has room, the caller waits (inside the
  consumer, where the deadline still applies) rather than queuing inside the server.
- **Learned concurrency.** Each endpoint's limit starts at its `max_concurrency` ceiling and
  is learned from the server when it reports its load (vLLM's /metrics): requests waiting in
  the server's queue, or KV-cache use above `kv_cache_high`, cut the limit by a quarter (once
  per reading); a server with an empty queue and room in its KV cache, while this consumer
  uses its whole limit, raises it by an eighth (at least one). An endpoint without /metrics
  follows its latency (AIMD, `latency_target_ms`) or keeps its ceiling, and the batcher's
  AIMD then bounds the total. The limit never leaves [1, ceiling].
- **Back-off.** An endpoint that fails (connection refused or reset, timeout, 429, 5xx, a
  rejected key) is paused for an exponentially growing, jittered time (tenacity's wait
  strategy), reset by its next success (or a probe it answers); requests meanwhile go to the
  others. When the last attempt on every endpoint failed, the fleet is down (`down_for`): an
  outage, not a fault of the requests that found it so. (Pauses alone cannot tell: a jittered
  pause may be over before the next request looks.)
- **Priorities.** Low traffic (`priority: low`) uses `low_priority_share` of each limit,
  unless the endpoint schedules by priority, where the server itself runs live traffic first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tenacity import RetryCallState, wait_random_exponential

from consumer.classify.engine.remote.settings import EndpointSettings, RemoteSettings

log = logging.getLogger(__name__)

DECREASE = 0.75
INCREASE = 0.125


class NoEndpoint(Exception):
    """No endpoint could take the request before its deadline, or the fleet is closing."""


@dataclass(frozen=True)
class ServerLoad:
    """One reading of a vLLM server's /metrics, summed over its engines."""

    running: float
    waiting: float
    kv_cache_usage: float  # 0..1
    prefix_cache_queries: float | None = None  # tokens, since the server started
    prefix_cache_hits: float | None = None


class Endpoint:
    """One server's state as this consumer sees it: outstanding requests, limit, health."""

    def __init__(self, settings: EndpointSettings, fleet: RemoteSettings) -> None:
        self.settings = settings
        self.name = settings.label
        self.ceiling = settings.max_concurrency
        self.limit = float(settings.max_concurrency)
        self.outstanding = 0
        self.sends_priority = settings.priority_scheduling
        self.max_model_len: int | None = None
        self.load: ServerLoad | None = None
        self.down_until = 0.0
        self.failures_in_a_row = 0
        # Figures.
        self.completed = 0
        self.failed = 0
        self.peak_outstanding = 0
        self._latency_target_s = fleet.latency_target_ms / 1000 if fleet.latency_target_ms else None
        self._kv_high = fleet.kv_cache_high
        self._completions_since_decrease = 0
        self._backoff = wait_random_exponential(multiplier=fleet.endpoint_backoff_s, max=fleet.endpoint_backoff_max_s)

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def room(self, share: float) -> int:
        """Requests this consumer may still start here; `share` of the limit for low traffic."""
        return max(1, int(self.limit * share)) - self.outstanding

    def succeeded(self, latency_s: float) -> None:
        self.completed += 1
        self.answered()
        if self._latency_target_s is not None and self.load is None:
            self._completions_since_decrease += 1
            if latency_s > self._latency_target_s:
                if self._completions_since_decrease >= self.limit:
                    self.limit = max(1.0, self.limit * 0.5)
                    self._completions_since_decrease = 0
            else:
                self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)

    def answered(self) -> None:
        """It answered (a request or a probe): up again, its back-off starts over."""
        self.failures_in_a_row = 0
        self.down_until = 0.0

    def fail(self, now: float, reason: str) -> float:
        """Pause the endpoint after a failure; returns the pause in seconds."""
        self.failed += 1
        self.failures_in_a_row += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.failures_in_a_row
        pause = self._backoff(state)
        self.down_until = now + pause
        # The reason names an error type or status, never a header or a body (keys, content).
        log.warning("endpoint %s failed (%s); paused for %.2f s", self.name, reason, pause)
        return pause

    def observe(self, load: ServerLoad) -> None:
        """Steer the limit by the server's own report of its queue and KV cache."""
        self.load = load
        if load.waiting > 0 or load.kv_cache_usage >= self._kv_high:
            self.limit = max(1.0, min(self.limit, float(max(self.outstanding, 1))) * DECREASE)
        elif self.outstanding >= int(self.limit):
            self.limit = min(float(self.ceiling), self.limit + max(1.0, self.limit * INCREASE))


class Fleet:
    """The endpoints of one remote classifier and the requests waiting for one of them."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.endpoints = [Endpoint(e, settings) for e in settings.endpoints]
        self._low = settings.priority == "low"
        self._low_share = settings.low_priority_share
        self._changed = asyncio.Event()
        self._closing = False

    def share(self, endpoint: Endpoint) -> float:
        return self._low_share if self._low and not endpoint.sends_priority else 1.0

    def capacity(self) -> int:
        """Most requests this consumer ever has outstanding on the fleet: the ceilings, shared."""
        return sum(max(1, int(e.ceiling * self.share(e))) for e in self.endpoints)

    async def acquire(self, avoid: set[str], deadline: float | None, exclude: frozenset[str] = frozenset()) -> Endpoint:
        """An endpoint with room, counted as used until `release`; raises NoEndpoint at the deadline.
        `avoid`: taken only when nothing else has room; `exclude`: never taken (endpoints that were
        failing), and NoEndpoint once every endpoint is failing (the fleet is down)."""
        while True:
            if self._closing:
                raise NoEndpoint("the remote classifier is closing")
            now = time.monotonic()
            if exclude and self.down_for(now) is not None:
                raise NoEndpoint("every endpoint is failing")
            chosen = self._pick(now, avoid, exclude)
            if chosen is not None:
                chosen.outstanding += 1
                chosen.peak_outstanding = max(chosen.peak_outstanding, chosen.outstanding)
                return chosen
            wake = [e.down_until for e in self.endpoints if not e.up(now)]
            timeout = (min(wake) - now) if wake else None
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    raise NoEndpoint("no endpoint had room before the request's deadline")
                timeout = left if timeout is None else min(timeout, left)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def down_for(self, now: float) -> float | None:
        """None while some endpoint's last answer was a success (or it was not tried yet); else the
        fleet is down, and this is the seconds until the first pause ends (0 when one has)."""
        if any(e.failures_in_a_row == 0 for e in self.endpoints):
            return None
        return max(0.0, min(e.down_until for e in self.endpoints) - now)

    def release(self, endpoint: Endpoint) -> None:
        endpoint.outstanding -= 1
        self._changed.set()

    def changed(self) -> None:
        """A limit or a pause changed: waiters look again."""
        self._changed.set()

    def close(self) -> None:
        self._closing = True
        self._changed.set()

    def _pick(self, now: float, avoid: set[str], exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        best: tuple[bool, int, float] | None = None
        chosen = None
        for endpoint in self.endpoints:
            if endpoint.name in exclude or not endpoint.up(now) or endpoint.room(self.share(endpoint)) <= 0:
                continue
            # Fresh endpoints first, then least outstanding, then the emptier relative to its limit.
            key = (endpoint.name in avoid, endpoint.outstanding, endpoint.outstanding / endpoint.limit)
            if best is None or key < best:
                best, chosen = key, endpoint
        return chosen
