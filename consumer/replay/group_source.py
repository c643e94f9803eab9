"""The source of one worker of a replay run: the plan's offset ranges, shared out by the run's
consumer group. Owns "a partition's committed offset in the run group says how far the run got".

Every worker of run NAME subscribes to the topic as a member of `safeguard-replay-NAME` (never
the live group), so Kafka's group protocol spreads the partitions over the workers and moves a
dead worker's partitions to the living ones (after its session timeout). On assignment each
partition starts at its committed offset in that group, or at its planned START when none was
committed. Records at or past END are never handed on; a partition that reached END is paused.

Commits follow the live path's rule (the `OffsetCommitter` of `consumer.kafka.source`): only the
positions of delivered outputs, every `commit_interval_s` and whenever half the intake limit is
committable, so a killed worker leaves at most `pipeline.max_in_flight_events` records to be
redone. Once a partition reached END and none of its records is in flight, END itself is
committed (past transaction markers and compacted gaps), so that "every committed offset at END"
is the run's completion. A worker whose own partitions are all at END asks the group's
committed offsets every `COMPLETION_CHECK_S`; when every planned partition is at END, the run is
complete and `on_finished` is called. Until then it stays in the group: a rebalance may give it
a dead worker's partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from consumer.kafka.client import Consumer, KafkaError, KafkaException, TopicPartition
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.poll import POLL_BATCH, POLL_TIMEOUT_S, PollingSource
from consumer.kafka.roles import Received, SourceOptions, SourceWiring
from consumer.kafka.source import OffsetCommitter
from consumer.replay.bounds import TokenBucket
from consumer.replay.runs import RunPlan, worker_id
from consumer.replay.source import GROUP_OPTIONS

log = logging.getLogger(__name__)

COMPLETION_CHECK_S = 1.0
COMMITTED_TIMEOUT_S = 30.0
RUN_CONSUMER_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,  # END may sit behind a transaction marker: EOF says we are past it
    "auto.offset.reset": "earliest",  # a START deleted by retention meanwhile: the oldest record left
    "partition.assignment.strategy": "cooperative-sticky",  # a joining worker moves only what it takes
}


def run_consumer_config(options: SourceOptions) -> dict[str, Any]:
    # The live consumer's group options are dropped (static membership would hand a worker the live
    # consumer's identity); the run's group uses the classic protocol, cooperative-sticky.
    config = {k: v for k, v in options.client.items() if k not in GROUP_OPTIONS}
    config.setdefault("client.id", f"replay-{worker_id()}")  # `replay status` names the holders by it
    where = {"bootstrap.servers": options.bootstrap_servers, "group.id": options.group_id}
    return config | RUN_CONSUMER_REQUIRED | where


class RunSource(PollingSource):
    """Reads this worker's share of a run's plan for a `Pipeline` (a `RecordSource`).

    Guarantees:
    - records outside the plan (before START, at or past END, partitions not planned) are never
      handed on;
    - each partition starts at the run group's committed offset, which only ever covers
      delivered outputs: a record of the plan is lost by no crash, and redone at most once per
      crash that left it uncommitted;
    - no more than the intake limit (records, bytes) is uncommitted, and no more than the token
      bucket's rate is handed on;
    - `on_finished` is called once, when every planned partition's committed offset reached END.
    """

    role = "replay run source"

    def __init__(
        self,
        consumer: Any,
        plan: RunPlan,
        tracker: OffsetTracker,
        deliver: Callable[[Received], None],
        on_fatal: Callable[[str], None],
        on_finished: Callable[[], None],
        max_in_flight_events: int,
        max_in_flight_bytes: int,
        commit_interval_s: float,
        revoke_drain_s: float,
        limiter: TokenBucket | None = None,
    ):
        super().__init__(consumer, tracker, deliver, on_fatal, max_in_flight_events, max_in_flight_bytes,
                         persist_interval_s=commit_interval_s, thread_name="replay-run-poll")  # fmt: skip
        self._committer = OffsetCommitter(tracker, commit_at=max(1, max_in_flight_events // 2))
        self._topic = plan.topic
        self._ends = {p: r.end for p, r in plan.ranges.items()}
        self._starts = {p: r.start for p, r in plan.ranges.items()}
        self._revoke_drain_s = revoke_drain_s
        self._limiter = limiter
        self._open: set[int] = set()  # held, before END
        self._at_end: set[int] = set()  # held, at END, END not yet committed
        self._paused = False
        self._next_check = 0.0
        self._on_finished = on_finished
        self.finished = False

    @classmethod
    def connect(
        cls,
        options: SourceOptions,
        wiring: SourceWiring,
        plan: RunPlan,
        on_finished: Callable[[], None],
        limiter: TokenBucket | None = None,
    ) -> RunSource:
        """A run source on a new consumer in `options.group_id` (the run's group). `wiring.on_assigned`
        does not apply: chat state is not rebuilt from before START."""
        if wiring.committer is not None:
            raise ValueError("a replay run commits its group's offsets: it cannot take a committer (exactly-once)")
        config = run_consumer_config(options)
        holder: list[RunSource] = []
        # Asynchronous commits report here (within `consume`): what the broker accepted frees the intake limit.
        config["on_commit"] = lambda error, partitions: holder[0].on_commit(error, partitions) if holder else None
        source = cls(
            Consumer(config), plan, wiring.tracker, wiring.deliver, wiring.on_fatal,
            on_finished, options.max_in_flight_events, options.max_in_flight_bytes, options.commit_interval_s,
            options.revoke_drain_s, limiter,
        )  # fmt: skip
        holder.append(source)
        return source

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._committer.committed(error, partitions)

    def close(self, timeout: float = 30.0) -> None:
        self._revoke_drain_s = 0.0  # leaving: nothing more will complete
        super().close(timeout)

    # -- the poll thread -------------------------------------------------------------------

    def _begin(self) -> None:
        self._consumer.subscribe([self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)  # fmt: skip

    def _step(self) -> Received:
        received = self._poll_once()
        self._commit_ends()
        if not self._open and not self._at_end and not self.finished and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + COMPLETION_CHECK_S
            if self._run_complete():
                self.finished = True
                self._on_finished()
        return received

    def _due(self) -> bool:
        return self._committer.due()

    def _persist(self, final: bool) -> None:
        # Periodic commits do not wait: a slow broker round trip never holds up polling.
        self._committer.commit(self._consumer, None, wait=final)
        if final:
            self._commit_ends()

    def _poll_once(self) -> Received:
        uncommitted, size = self._tracker.uncommitted(), self._tracker.in_flight_bytes
        full = uncommitted >= self._max_events or size >= self._max_bytes
        if full or self._held or not self._accepting:
            self._pause(True)
            if full and self._tracker.committable():
                self._committer.commit(self._consumer, None, wait=True)  # delivered records hold the limit: free it
        elif self._paused and uncommitted <= self._max_events // 2 and size <= self._max_bytes // 2:
            self._pause(False)
        room = max(1, min(POLL_BATCH, self._max_events - uncommitted))
        granted = self._limiter.take(room, POLL_TIMEOUT_S) if self._limiter and not self._paused else room
        if not granted:
            return []
        # Paused, this only serves rebalances and keeps the membership alive: paused partitions yield nothing.
        messages = self._consumer.consume(num_messages=1 if self._paused else granted, timeout=POLL_TIMEOUT_S)
        kept, coordinates = [], []
        for message in messages:
            partition, offset, error = message.partition(), message.offset(), message.error()
            if error is not None:
                self._on_message_error(error, partition, offset)
                continue
            if partition not in self._open:
                continue  # fetched before its partition reached END, or not planned
            if offset >= self._ends[partition]:
                self._reached_end(partition)
                continue
            if not self._accepting:
                continue  # never tracked, so never committed: read again by whoever holds it next
            value = message.value()
            kept.append(message)
            coordinates.append((self._topic, partition, offset, len(value) if value else 0))
        if self._limiter and not self._paused:
            self._limiter.refund(granted - len(kept))
        if self._open:
            # By position, not by the last offset seen: transaction markers occupy offsets too.
            for tp in self._consumer.position([TopicPartition(self._topic, p) for p in sorted(self._open)]):
                end = self._ends[tp.partition]
                if tp.offset >= 0:
                    self.lag[(self._topic, tp.partition)] = max(0, end - tp.offset)
                if tp.offset >= end:
                    self._reached_end(tp.partition)
        return list(zip(kept, self._tracker.track_many(coordinates))) if kept else []

    def _on_message_error(self, error: KafkaError, partition: int, offset: int) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            if partition in self._open and offset >= self._ends[partition]:
                self._reached_end(partition)
            return
        if error.fatal() or error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            raise KafkaException(error)
        log.warning("consumer: %s", error.str())

    def _pause(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        partitions = [TopicPartition(self._topic, p) for p in sorted(self._open)]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)

    def _reached_end(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self._at_end.add(partition)
            self.assigned.discard((self._topic, partition))
            self.lag[(self._topic, partition)] = 0
            self._consumer.pause([TopicPartition(self._topic, partition)])

    def _commit_ends(self, partitions: set[int] | None = None) -> None:
        """Commit END for the partitions at END whose records were all delivered, and stop tracking
        them: every record before END was read (reading is in order) and tracked, so none is skipped."""
        for partition in sorted(self._at_end if partitions is None else self._at_end & partitions):
            key = (self._topic, partition)
            if self._tracker.in_flight([key]):
                continue
            try:
                self._consumer.commit(offsets=[TopicPartition(self._topic, partition, self._ends[partition])],
                                      asynchronous=False)  # fmt: skip
            except KafkaException as exc:
                log.warning("commit of END failed, will retry: %s", exc.args[0] if exc.args else exc)
                continue
            self._committer.forget([key])
            self._at_end.discard(partition)
            log.info("%s[%d] reached END (%d) and is committed there", self._topic, partition, self._ends[partition])

    def _run_complete(self) -> bool:
        planned = [TopicPartition(self._topic, p) for p in sorted(self._ends)]
        try:
            found = self._consumer.committed(planned, timeout=COMMITTED_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("cannot read the run's committed offsets, will retry: %s", exc.args[0] if exc.args else exc)
            return False
        return all(tp.offset >= self._ends[tp.partition] for tp in found)

    # -- rebalance callbacks (run on the poll thread, inside consume) ------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        planned = [TopicPartition(self._topic, tp.partition) for tp in partitions if tp.partition in self._ends]
        found = consumer.committed(planned, timeout=COMMITTED_TIMEOUT_S) if planned else []
        committed = {tp.partition: tp.offset for tp in found}
        starts = {p: max(self._starts[p], committed.get(p, -1)) for p in (tp.partition for tp in planned)}
        consumer.incremental_assign([TopicPartition(self._topic, p, at) for p, at in starts.items()]
                                    + [tp for tp in partitions if tp.partition not in self._ends])  # fmt: skip
        idle = [tp for tp in partitions if starts.get(tp.partition, self._ends.get(tp.partition, 0)) >=
                self._ends.get(tp.partition, 0)]  # fmt: skip
        for p, at in starts.items():
            if at >= self._ends[p]:
                self._at_end.add(p)  # committed there already, or an empty range: END is (re)committed
            else:
                self._open.add(p)
                self.assigned.add((self._topic, p))
                self.lag[(self._topic, p)] = self._ends[p] - at
        if idle or self._paused:
            consumer.pause(idle + ([TopicPartition(self._topic, p) for p in starts if p in self._open]
                                   if self._paused else []))  # fmt: skip
        log.info("assigned %s", _names(self._topic, starts, self._ends))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.partition in self._ends}
        keys = [(self._topic, p) for p in sorted(revoked)]
        if keys and not self._tracker.wait_until_drained(self._revoke_drain_s, keys):
            log.warning("revoked %s with records still in flight; the new owner re-reads them",
                        ", ".join(f"{self._topic}[{p}]" for p in sorted(revoked)))  # fmt: skip
        self._commit_ends(revoked)
        self._committer.commit(consumer, keys, wait=True)
        self._drop(revoked)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.partition in self._ends}
        self._drop(lost)
        log.warning("lost %s; uncommitted records will be read again by their new owner",
                    ", ".join(f"{self._topic}[{p}]" for p in sorted(lost)) or "nothing")  # fmt: skip

    def _drop(self, partitions: set[int]) -> None:
        keys = [(self._topic, p) for p in sorted(partitions)]
        self._committer.forget(keys)
        self._open.difference_update(partitions)
        self._at_end.difference_update(partitions)
        self.assigned.difference_update(keys)
        for key in keys:
            self.lag.pop(key, None)


def _names(topic: str, starts: dict[int, int], ends: dict[int, int]) -> str:
    return ", ".join(f"{topic}[{p}] from {at} to {ends[p]}" for p, at in sorted(starts.items())) or "nothing planned"
