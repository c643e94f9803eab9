"""The replay's source: a fixed offset range of one topic, read outside any consumer group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.kafka.client import Consumer, KafkaError, KafkaException, TopicPartition
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.poll import POLL_BATCH, POLL_TIMEOUT_S, PollingSource
from consumer.kafka.roles import Received, SourceOptions, SourceWiring
from consumer.replay.bounds import TokenBucket
from consumer.replay.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# A replay never joins the live group: these group options are dropped from the user's
# consumer options, and the rest below cannot be overridden.
GROUP_OPTIONS = ("group.instance.id", "group.protocol", "group.remote.assignor", "partition.assignment.strategy")
REPLAY_CONSUMER_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,  # END may sit behind a transaction marker: EOF says we are past it
    "auto.offset.reset": "earliest",  # a start deleted by retention meanwhile: the oldest record left
}


def replay_consumer_config(bootstrap_servers: str, group_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """The user's consumer options for a reader that never joins a group nor commits."""
    config = {k: v for k, v in options.items() if k not in GROUP_OPTIONS}
    return config | REPLAY_CONSUMER_REQUIRED | {"bootstrap.servers": bootstrap_servers, "group.id": group_id}


class ReplaySource(PollingSource):
    """Reads the offset ranges of one topic for a `Pipeline` (a `RecordSource`).

    Guarantees:
    - the live consumer group is never joined and no offset is ever committed: partitions
      are assigned under the replay's own group id with auto-commit off;
    - each record in [next, end) of each partition is handed on once; nothing at or past END,
      however fast producers keep writing;
    - no more than the intake limit (records, bytes) is outstanding, and no more than the
      token bucket's rate is handed on;
    - the checkpoint only moves to positions the offset tracker allows (delivered outputs);
    - once every partition reached END and every output was delivered, the checkpoint is
      marked complete and `on_finished` is called, once.
    """

    role = "replay source"

    def __init__(
        self,
        consumer: Any,
        checkpoint: Checkpoint,
        checkpoint_path: Path,
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        on_finished: Callable[[], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        save_interval_s: float,
        limiter: TokenBucket | None = None,
    ):
        super().__init__(consumer, tracker, deliver, on_fatal, max_in_flight_events, max_in_flight_bytes,
                         persist_interval_s=save_interval_s, thread_name="replay-poll")  # fmt: skip
        self._checkpoint = checkpoint
        self._path = checkpoint_path
        self._topic = checkpoint.topic
        self._on_finished = on_finished
        self._limiter = limiter
        self._open = {p for p, r in checkpoint.ranges.items() if r.next < r.end}
        # What Source reports too: the partitions being read, and records left in each (to END).
        self.assigned = {(self._topic, p) for p in self._open}
        self.lag = {(self._topic, p): r.end - r.next for p, r in checkpoint.ranges.items()}
        self.finished = False

    @classmethod
    def connect(
        cls,
        options: SourceOptions,
        wiring: SourceWiring,
        checkpoint: Checkpoint,
        checkpoint_path: Path,
        on_finished: Callable[[], None],
        limiter: TokenBucket | None = None,
    ) -> ReplaySource:
        """A replay source on a new consumer. `options.topics` and `revoke_drain_s` do not apply (the
        checkpoint names the topic; a replay assigns, it never subscribes), nor does
        `wiring.on_assigned`: chat state is not rebuilt from before START."""
        if wiring.committer is not None:
            # The pipeline refuses exactly-once with a replaced sink; this is the source's half of it.
            raise ValueError("a replay commits no offsets: it cannot take a committer (exactly-once)")
        return cls(
            Consumer(replay_consumer_config(options.bootstrap_servers, options.group_id, options.client)),
            checkpoint, checkpoint_path, wiring.tracker, wiring.deliver, wiring.on_fatal, on_finished,
            options.max_in_flight_events, options.max_in_flight_bytes, options.commit_interval_s, limiter,
        )  # fmt: skip

    # -- the poll thread -------------------------------------------------------------------

    def _begin(self) -> None:
        ranges = self._checkpoint.ranges
        if self._open:
            self._consumer.assign([TopicPartition(self._topic, p, ranges[p].next) for p in sorted(self._open)])

    def _step(self) -> Received:
        if self._open:
            return self._poll_once()
        if not self.finished and self._tracker.wait_until_drained(POLL_TIMEOUT_S):
            self._finish()
        else:
            self._stop.wait(POLL_TIMEOUT_S)
        return []

    def _persist(self, final: bool) -> None:
        self._save()

    def _poll_once(self) -> Received:
        room = min(POLL_BATCH, self._max_events - self._tracker.in_flight())
        if not self._accepting or self._held or room <= 0 or self._tracker.in_flight_bytes >= self._max_bytes:
            # No group membership to keep alive, so a full intake limit simply waits.
            self._stop.wait(POLL_TIMEOUT_S)
            return []
        granted = self._limiter.take(room, POLL_TIMEOUT_S) if self._limiter else room
        if not granted:
            return []
        ranges = self._checkpoint.ranges
        received: Received = []
        for message in self._consumer.consume(num_messages=granted, timeout=POLL_TIMEOUT_S):
            partition, offset = message.partition(), message.offset()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if offset >= ranges[partition].end:
                        self._close_partition(partition)
                elif error.fatal():
                    raise KafkaException(error)
                else:
                    log.warning("consumer: %s", error.str())
                continue
            if partition not in self._open:
                continue  # fetched before its partition reached END
            if offset >= ranges[partition].end:
                self._close_partition(partition)
                continue
            value = message.value()
            received.append((message, self._tracker.track(self._topic, partition, offset, len(value) if value else 0)))
        if self._limiter:
            self._limiter.refund(granted - len(received))
        if self._open:
            for tp in self._consumer.position([TopicPartition(self._topic, p) for p in sorted(self._open)]):
                end = ranges[tp.partition].end
                if tp.offset >= 0:
                    self.lag[(self._topic, tp.partition)] = max(0, end - tp.offset)
                if tp.offset >= end:
                    self._close_partition(tp.partition)
        return received

    def _close_partition(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self.assigned.discard((self._topic, partition))
            self.lag[(self._topic, partition)] = 0
            self._consumer.pause([TopicPartition(self._topic, partition)])

    def _finish(self) -> None:
        self.finished = True
        self._checkpoint.finish()
        self._save(changed=True)
        self._on_finished()

    def _save(self, changed: bool = False) -> None:
        positions = self._tracker.commit_positions()
        if not positions and not changed:
            return
        self._checkpoint.advance({partition: offset for (_, partition), offset in positions.items()})
        try:
            self._checkpoint.save(self._path)
        except OSError as exc:
            # Not fatal: the replay goes on, and the next save tries again.
            log.warning("cannot save the checkpoint %s: %s", self._path, exc.strerror)
            return
        self._tracker.mark_committed(positions)
