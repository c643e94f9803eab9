"""The poll thread: one lifecycle for every record source.

A source's consumer is polled on a thread of its own, so a slow classifier never holds up
polling. `PollingSource` owns that thread's lifecycle, the same for the group source
(`consumer.kafka.source.Source`) and the replay source (`consumer.replay.source.ReplaySource`):

- `start` begins reading (the subclass subscribes or assigns) and starts the thread;
- the thread takes a step at a time (the subclass polls, or waits for room), hands what it
  received to `deliver`, and every `persist_interval_s` (or when `_due`) makes the delivered
  positions durable (the subclass commits, or saves a checkpoint);
- `stop_accepting` stops handing on records; `close` stops the thread, which makes the last
  positions durable and closes the consumer, always, whatever ended the loop;
- an exception on the thread is logged and reported through `on_fatal`, never lost.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from consumer.kafka.offsets import OffsetTracker, TopicPartitionKey
from consumer.kafka.roles import Received

log = logging.getLogger(__name__)

# Records a poll hands on at most. A batch's records and outputs are made, sent and freed together:
# at 64 they still fit in a core's L2 when they are freed (pymalloc then reuses warm memory), where
# 500 spilled it. Counted under callgrind with a 1 MiB L2 (docs/benchmark.md, issue 31's fifteenth
# round): keyword's L2 misses 320 -> 219 an event for 0.2% more instructions.
POLL_BATCH = 64
POLL_TIMEOUT_S = 0.1


class PollingSource(ABC):
    """Owns "the poll thread runs until closed, and closing makes delivered positions durable"."""

    role = "source"  # in the log and in the fatal reason

    def __init__(
        self,
        consumer: Any,
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        persist_interval_s: float,
        thread_name: str,
    ):
        self._consumer = consumer
        self._tracker = tracker
        self._deliver = deliver
        self._on_fatal = on_fatal
        self._max_events = max_in_flight_events
        self._max_bytes = max_in_flight_bytes
        self._persist_interval_s = persist_interval_s
        self._accepting = True
        self._held = False  # a dependency is down: no new records until it is back
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.assigned: set[TopicPartitionKey] = set()
        self.lag: dict[TopicPartitionKey, int] = {}

    def start(self) -> None:
        self._begin()
        self._thread.start()

    def stop_accepting(self) -> None:
        """Stop handing on new records (shutdown); polling and durable positions go on until `close`."""
        self._accepting = False

    def hold(self, held: bool) -> None:
        """Take no new records while `held` (the subclass pauses its partitions); polling goes on."""
        self._held = held

    def close(self, timeout: float = 30.0) -> None:
        """Stop the poll thread, which makes the last positions durable and closes the consumer;
        call after the sink has flushed."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_persist = time.monotonic() + self._persist_interval_s
        try:
            while not self._stop.is_set():
                received = self._step()
                if received:
                    self._deliver(received)
                if time.monotonic() >= next_persist or self._due():
                    self._persist(final=False)
                    next_persist = time.monotonic() + self._persist_interval_s
        except Exception as exc:  # noqa: BLE001 - the poll thread must report, never die silently
            log.exception("%s stopped", self.role)
            self._on_fatal(f"{self.role} failed: {exc}")
        finally:
            self._persist(final=True)
            close_consumer(self._consumer)

    @abstractmethod
    def _begin(self) -> None:
        """Before the thread starts: subscribe, or assign the partitions."""

    @abstractmethod
    def _step(self) -> Received:
        """One turn of the poll thread: the records to hand on (none while waiting for room)."""

    @abstractmethod
    def _persist(self, final: bool) -> None:
        """Make the tracker's delivered positions durable; `final`: the last time, wait for it."""

    def _due(self) -> bool:
        """True when positions should be made durable before the next interval."""
        return False


def close_consumer(consumer: Any) -> None:
    """Leave the group and release the client; a failure here is logged, never raised."""
    try:
        consumer.close()
    except (KafkaException, RuntimeError) as exc:
        log.warning("consumer close: %s", exc)
