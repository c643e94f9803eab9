"""The outage stage: owns "an outage is never a record's fault".

A stage that raises `consumer.errors.Unavailable` for a record (the reasoner whose endpoints
all fail, a schema registry that does not answer) hands the record here instead of to a dead
letter. Guarantees:

- **Kept, not failed.** The record waits (`wait`) and its stage is asked again; its offset is
  not committed meanwhile, because the record is not done.
- **Intake held.** While any dependency is down the source is told to hold (it pauses its
  partitions and keeps polling, so the group membership holds); intake resumes when the last
  one is back.
- **Said once per change.** One WARNING when a dependency goes down, one when it is back;
  `/readyz` fails with the reason meanwhile (`problem`); `safeguard.dependency.up` (1 or 0 per
  dependency) and `safeguard.dependency.outages` count them.
- **Back when it answers.** Where the stage can probe its dependency (`ProbesDependency`: the
  remote reasoner asks its endpoints' /models), the waiting records are retried once the probe
  succeeds; otherwise they are retried at the stage's `retry_after_s` hint (back-off doubling up
  to `RETRY_MAX_S`) and the first one answered marks the dependency back.
- **Bounded if asked.** With `pipeline.outage_timeout_s` set, a dependency down longer than
  that stops the run (exit 1), committing nothing past what was delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from consumer.errors import Unavailable

log = logging.getLogger(__name__)

# The first wait before waiting records are retried (or the dependency probed) when the stage
# gives no hint, and the longest: long enough not to hammer a restarting server, short enough
# that a rolling restart costs seconds, not minutes, once it is over.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0

Probe = Callable[[str], Awaitable[bool | None]]


@dataclass
class _Down:
    reason: str
    since: float
    retry_after_s: float
    release: asyncio.Future[None]
    watcher: asyncio.Task[None] | None = None


class Outage:
    """Which dependencies are down, since when, and when the work waiting for them goes on."""

    def __init__(
        self,
        hold: Callable[[bool], None],
        fail: Callable[[str], None],
        timeout_s: float | None,
        probe: Probe | None = None,
        expected: Iterable[str] = (),
        meter: Meter | None = None,
    ):
        """`hold(True)` pauses intake, `hold(False)` resumes it; `fail(reason)` stops the run;
        `probe(dependency)`: True once it answers, False while not, None if it cannot tell;
        `expected`: dependencies shown as up in the metric before any outage."""
        self._hold = hold
        self._fail = fail
        self._timeout_s = timeout_s
        self._probe = probe
        self._down: dict[str, _Down] = {}
        self._down_since: float | None = None  # while any dependency is down
        self._downtime_s = 0.0  # of the outages over
        self._known = dict.fromkeys(expected, 0)  # dependency -> outages so far
        if meter is not None:
            meter.create_observable_gauge(
                "safeguard.dependency.up", [self._observe_up], description="1 while the dependency answers, 0 if down"
            )
            meter.create_observable_counter(
                "safeguard.dependency.outages", [self._observe_outages], description="outages seen, per dependency"
            )

    def problem(self) -> str | None:
        """Why the consumer is not ready, while a dependency is down (for `/readyz`)."""
        if not self._down:
            return None
        now = time.monotonic()
        return "; ".join(
            f"{name} unavailable for {now - down.since:.0f}s: {down.reason} (intake paused, offsets kept)"
            for name, down in self._down.items()
        )

    def downtime_s(self) -> float:
        """Seconds with some dependency down since the start, the current outage included: a
        request during which it grew lost time to an outage."""
        ongoing = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        return self._downtime_s + ongoing

    def report(self, exc: Unavailable) -> None:
        """A stage found `exc.dependency` down: the first report of an outage logs, holds intake, and
        starts watching it; later ones only refresh the reason."""
        down = self._down.get(exc.dependency)
        if down is not None:
            down.reason = exc.reason
            return
        loop = asyncio.get_running_loop()
        hint = exc.retry_after_s if exc.retry_after_s is not None else RETRY_FIRST_S
        down = _Down(exc.reason, time.monotonic(), min(RETRY_MAX_S, max(0.05, hint)), loop.create_future())
        self._down[exc.dependency] = down
        self._known[exc.dependency] = self._known.get(exc.dependency, 0) + 1
        log.warning("%s unavailable: %s; intake paused, records kept and retried, offsets uncommitted",
                    exc.dependency, exc.reason)  # fmt: skip
        if len(self._down) == 1:
            self._down_since = down.since
            self._hold(True)
        down.watcher = loop.create_task(self._watch(exc.dependency, down), name=f"outage-{exc.dependency}")

    async def wait(self, dependency: str | None = None) -> None:
        """Until the work that needs `dependency` (None: whatever is down) is worth trying again
        (at once when it is up)."""
        for name in [dependency] if dependency is not None else list(self._down):
            down = self._down.get(name)
            if down is not None:
                await asyncio.shield(down.release)

    def answered(self, dependency: str) -> None:
        """The stage answered for `dependency` again: it is back."""
        down = self._down.pop(dependency, None)
        if down is None:
            return
        log.warning("%s back after %.1f s; intake resumes", dependency, time.monotonic() - down.since)
        if down.watcher is not None and down.watcher is not asyncio.current_task():
            down.watcher.cancel()
        if not down.release.done():
            down.release.set_result(None)
        if not self._down:
            if self._down_since is not None:
                self._downtime_s += time.monotonic() - self._down_since
                self._down_since = None
            self._hold(False)

    async def close(self) -> None:
        watchers = [d.watcher for d in self._down.values() if d.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, dependency: str, down: _Down) -> None:
        """While `dependency` is down: every interval, stop the run past the bound, else probe it
        (back: release everyone) or, without a probe, let the waiting records try again."""
        interval = down.retry_after_s
        while self._down.get(dependency) is down:
            await asyncio.sleep(interval)
            if self._timeout_s is not None and time.monotonic() - down.since > self._timeout_s:
                self._fail(f"{dependency} unavailable for more than {self._timeout_s:g} s "
                           f"(pipeline.outage_timeout_s): {down.reason}")  # fmt: skip
                return
            answers = None
            if self._probe is not None:
                try:
                    answers = await self._probe(dependency)
                except Exception as exc:  # noqa: BLE001 - a failing probe means "not yet"
                    log.debug("probing %s failed: %s", dependency, exc)
                    answers = False
            if answers:
                self.answered(dependency)
                return
            if answers is None:
                # Nobody can ask the dependency itself: the waiting records are the probe.
                release, down.release = down.release, asyncio.get_running_loop().create_future()
                release.set_result(None)
            interval = min(RETRY_MAX_S, interval * 2)

    def _observe_up(self, _: CallbackOptions) -> Iterable[Observation]:
        for dependency in self._known:
            yield Observation(0 if dependency in self._down else 1, {"dependency": dependency})

    def _observe_outages(self, _: CallbackOptions) -> Iterable[Observation]:
        for dependency, outages in self._known.items():
            yield Observation(outages, {"dependency": dependency})
