"""librdkafka's own logs through the structured logger, and the brokers' reachability.

librdkafka logs a connection failure every time it retries (every ~50 ms against a refused
port), on stderr in its own format. Every client here is given a `ClientLogger` instead
(confluent-kafka's `logger` option): its lines go to the `consumer.kafka.librdkafka` logger,
so they come out as JSON like ours, each distinct line at most once per `window_s` (repeats
are counted and the count is reported with the next occurrence), and at most `max_lines` per
window in all.

`BrokerLink` owns "one WARNING per state change": it hears connection failures (the
clients' error callbacks and FAIL lines) and signs of life (statistics, received records),
logs the change from reachable to unreachable and back once each, and tells `/readyz`. A change
stands for `OUTAGE_SETTLE_S`: signs of the state before it, sooner than that, are its stragglers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from confluent_kafka import KafkaError

log = logging.getLogger("consumer.kafka.librdkafka")
link_log = logging.getLogger("consumer.kafka.brokers")

# Digits vary between repeats of the same line ("after 0ms", "#consumer-2"): not a new line.
_DIGITS = re.compile(r"\d+")
# librdkafka's connection failures: the link's state change says it once, at WARNING.
_CONNECTION_FACILITIES = frozenset({"FAIL", "BROKERFAIL", "ERROR"})
_DOWN_CODES = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})
# Each change of the link's state has stragglers of the state before it. A broker shutting down
# closes a connection and may still take a new one, or answer a metadata probe, for a moment;
# statistics taken before a failure arrive after it; a client's failed attempt to connect made just
# before the broker listened again is logged just after another client found it back. Counted,
# each logs one more "back" or "unreachable" for a single outage (both seen in CI). So a change
# stands for `OUTAGE_SETTLE_S` before the next one counts; /readyz follows that much later.
OUTAGE_SETTLE_S = 5.0


class BrokerLink:
    """Whether the brokers are reachable, as far as the clients can tell; thread-safe."""

    def __init__(
        self, addresses: str, logger: logging.Logger = link_log, settle_s: float = OUTAGE_SETTLE_S,
        clock: Any = time.monotonic,
    ):  # fmt: skip
        self.addresses = addresses
        self._log = logger
        self._settle_s = settle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._up = True  # until a client says otherwise: the start-up check saw them
        self._changed_at = float("-inf")
        self.reason = ""
        self.changes = 0

    @property
    def up(self) -> bool:
        return self._up

    def down(self, reason: str) -> None:
        """A connection failure; an outage unless the link came back less than `settle_s` ago
        (then it is a straggler of the outage: a genuine one goes on failing, and counts then)."""
        with self._lock:
            now = self._clock()
            if not self._up or now - self._changed_at < self._settle_s:
                return
            self._up, self._changed_at, self.reason = False, now, reason
            self.changes += 1
        self._log.warning("brokers unreachable (%s): %s; retrying", self.addresses, reason)

    def alive(self) -> None:
        """A sign of life; a recovery once the outage has lasted `settle_s` (the signs before are
        ignored: the next statistics, record or probe says it again)."""
        if self._up:  # the common case, without the lock
            return
        with self._lock:
            now = self._clock()
            down_for = now - self._changed_at
            if self._up or down_for < self._settle_s:
                return
            self._up, self._changed_at = True, now
            self.changes += 1
        self._log.warning("brokers reachable again (%s) after %.0f s", self.addresses, down_for)

    def on_error(self, error: KafkaError) -> None:
        """A client's `error_cb`."""
        if error.code() in _DOWN_CODES:
            self.down(error.str())

    def on_statistics(self, stats: dict[str, Any]) -> None:
        """librdkafka statistics: any broker UP means the link is back."""
        if any(b.get("state") == "UP" for b in stats.get("brokers", {}).values()):
            self.alive()


class ClientLogger:
    """What confluent-kafka's `logger` option calls (`log(level, fmt, *args)`): de-duplicated,
    rate-limited lines on the structured logger."""

    def __init__(
        self,
        role: str,
        link: BrokerLink | None = None,
        failure_level: int = logging.WARNING,
        window_s: float = 60.0,
        max_lines: int = 20,
        logger: logging.Logger = log,
        clock: Any = time.monotonic,
    ):
        self.role = role
        self._link = link
        self._failure_level = failure_level
        self._window_s = window_s
        self._max_lines = max_lines
        self._log = logger
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (window start, suppressed)
        self._window_start = clock()
        self._lines_in_window = 0
        self._dropped_in_window = 0
        self.suppressed = 0

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # confluent-kafka passes ("%s [%s] %s", facility, client name, text).
        facility, text = (str(args[0]), str(args[2])) if len(args) == 3 else ("", fmt % args if args else fmt)
        text = re.sub(r"^\[thrd:[^\]]*\]: ", "", text)
        if facility in _CONNECTION_FACILITIES:
            if self._link is not None:
                self._link.down(text)
                level = min(level, logging.INFO)  # the link's WARNING says it once
            else:
                level = min(level, self._failure_level)
        if not self._log.isEnabledFor(level):
            return
        message = self._admit(facility, text)
        if message is not None:
            self._log.log(level, "librdkafka %s %s: %s", self.role, facility, message)

    def _admit(self, facility: str, text: str) -> str | None:
        """The line to log (with a count of its suppressed repeats), or None to drop it."""
        now = self._clock()
        key = (facility, _DIGITS.sub("#", text))
        with self._lock:
            if now - self._window_start >= self._window_s:
                if self._dropped_in_window:
                    self._log.warning("librdkafka %s: %d log lines dropped in the last %.0f s (rate limit)",
                                      self.role, self._dropped_in_window, self._window_s)  # fmt: skip
                self._window_start, self._lines_in_window, self._dropped_in_window = now, 0, 0
            first, repeats = self._seen.get(key, (None, 0))
            if first is not None and now - first < self._window_s:
                self._seen[key] = (first, repeats + 1)
                self.suppressed += 1
                return None
            if self._lines_in_window >= self._max_lines:
                self._dropped_in_window += 1
                self.suppressed += 1
                return None
            self._lines_in_window += 1
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # bounded: forget the oldest
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                    del self._seen[old]
        return text + (f" (and {repeats} times like it in the last {self._window_s:.0f} s)" if repeats else "")


def client_options(role: str, link: BrokerLink | None = None, failure_level: int = logging.WARNING) -> dict[str, Any]:
    """The options that route a client's logs and errors here. Without a link, connection
    failures are logged at `failure_level`: DEBUG for the pre-flight, whose one error line
    says it, WARNING for a client that meets an outage on its own."""
    options: dict[str, Any] = {"logger": ClientLogger(role, link, failure_level)}
    if link is not None:
        options["error_cb"] = link.on_error
    return options
