"""The offset tracker: owns "an offset is committed only after its output was delivered".

Every consumed record is tracked (`track`) as the poll thread hands it on; when the broker
acknowledges the record's verdict or dead letter, it is marked done (`done_many`, one batch
of delivery reports at a time: one lock per batch, not per record). Classification finishes
out of order, so the commit position of a partition is one past the highest offset below
which every record is done.
The tracker also counts the intake limit (`pipeline.max_in_flight_*`) that the source pauses
on: records tracked but not yet committed (`uncommitted`), the undone ones and the done ones
alike, since a crash redoes both; and the bytes of the undone ones, which the process still
holds.

Thread-safe: the poll thread tracks and commits; the event loop marks done as it serves the
producer's delivery reports (a replay's file sink, from its sync thread).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    epoch: int
    pending: deque[int] = field(default_factory=deque)  # tracked offsets not yet committable, in order
    undone: dict[int, int] = field(default_factory=dict)  # offset -> size, of records not yet done
    committable: deque[int] = field(default_factory=deque)  # done, below `position`, not yet committed
    position: int | None = None  # next offset to commit (last done contiguous + 1)
    committed: int | None = None


class Ticket(NamedTuple):
    """Identifies one tracked record; a ticket from before a revoke is ignored after it.

    A tuple, not a dataclass: one is made per record on the hot path."""

    topic: str
    partition: int
    offset: int
    epoch: int


# A NamedTuple's own __new__ is a Python function: a frame per record. The tuple's is not.
_new_ticket = functools.partial(tuple.__new__, Ticket)


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._epochs = 0
        self._events = 0
        self._bytes = 0
        self._uncommitted = 0  # tracked records not yet committed: what the intake limit counts
        self._committable = 0  # of those, the done ones below their partition's position
        self._idle = threading.Condition(self._lock)

    def track(self, topic: str, partition: int, offset: int, size: int) -> Ticket:
        return self.track_many([(topic, partition, offset, size)])[0]

    def track_many(self, records: Iterable[tuple[str, int, int, int]]) -> list[Ticket]:
        """Track (topic, partition, offset, size) records in consumption order; one ticket each."""
        tickets = []
        with self._lock:
            partitions = self._partitions
            for topic, partition, offset, size in records:
                state = partitions.get((topic, partition))
                if state is None:
                    self._epochs += 1
                    state = partitions[(topic, partition)] = _PartitionState(epoch=self._epochs)
                state.pending.append(offset)
                state.undone[offset] = size
                self._events += 1
                self._bytes += size
                tickets.append(_new_ticket((topic, partition, offset, state.epoch)))
            self._uncommitted += len(tickets)
        return tickets

    def done(self, ticket: Ticket) -> None:
        self.done_many((ticket,))

    def done_many(self, tickets: Iterable[Ticket]) -> None:
        """Mark records delivered; tickets of revoked partitions and repeats are ignored."""
        with self._lock:
            partitions = self._partitions
            for topic, partition, offset, epoch in tickets:
                state = partitions.get((topic, partition))
                if state is None or state.epoch != epoch:
                    continue  # the partition was revoked meanwhile; the new owner redoes the record
                size = state.undone.pop(offset, None)
                if size is None:
                    continue  # done already
                self._events -= 1
                self._bytes -= size
                pending, undone = state.pending, state.undone
                while pending and pending[0] not in undone:
                    offset = pending.popleft()
                    state.committable.append(offset)
                    self._committable += 1
                    state.position = offset + 1
            self._idle.notify_all()

    def is_current(self, ticket: Ticket) -> bool:
        """False for a ticket whose partition was revoked (or re-assigned) since it was issued."""
        with self._lock:
            state = self._partitions.get((ticket.topic, ticket.partition))
            return state is not None and state.epoch == ticket.epoch

    def forget(self, partitions: list[TopicPartitionKey]) -> None:
        """Drop revoked partitions: their unfinished records no longer count or commit."""
        with self._lock:
            for key in partitions:
                state = self._partitions.pop(key, None)
                if state is None:
                    continue
                self._events -= len(state.undone)
                self._bytes -= sum(state.undone.values())
                self._uncommitted -= len(state.pending) + len(state.committable)
                self._committable -= len(state.committable)
            self._idle.notify_all()

    def commit_positions(self, partitions: list[TopicPartitionKey] | None = None) -> dict[TopicPartitionKey, int]:
        """Positions that advanced since the last `mark_committed`, as {(topic, partition): next offset}."""
        with self._lock:
            keys = self._partitions.keys() if partitions is None else partitions
            result = {}
            for key in keys:
                state = self._partitions.get(key)
                if state and state.position is not None and state.position != state.committed:
                    result[key] = state.position
            return result

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        with self._lock:
            for key, position in positions.items():
                state = self._partitions.get(key)
                if state is None:
                    continue
                state.committed = position
                committable = state.committable
                while committable and committable[0] < position:
                    committable.popleft()
                    self._uncommitted -= 1
                    self._committable -= 1
            self._idle.notify_all()

    def in_flight(self, partitions: list[TopicPartitionKey] | None = None) -> int:
        with self._lock:
            return self._count_locked(partitions)

    @property
    def in_flight_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def uncommitted(self) -> int:
        """Records tracked and not yet committed, done or not: what a crash now would redo."""
        return self._uncommitted  # one int, read without the lock: the intake limit is a heuristic between polls

    def committable(self) -> int:
        """Records done and below their partition's commit position, not yet committed."""
        return self._committable

    def wait_for_room(self, max_events: int, max_bytes: int, timeout: float) -> bool:
        """Block until fewer than `max_events` records are uncommitted and fewer than `max_bytes`
        in flight, or `timeout` passes."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self._uncommitted < max_events and self._bytes < max_bytes, timeout=timeout
            )

    def wait_until_drained(self, timeout: float, partitions: list[TopicPartitionKey] | None = None) -> bool:
        """Block until nothing (of `partitions`) is in flight or `timeout` passes; True if drained."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count_locked(partitions) == 0, timeout=timeout)

    def _count_locked(self, partitions: list[TopicPartitionKey] | None) -> int:
        if partitions is None:
            return self._events
        return sum(len(s.undone) for k in partitions if (s := self._partitions.get(k)) is not None)


class OutputJoin:
    """A record with several outputs (a verdict and its review items) is done when the last of
    them is delivered: `expect` says how many before they are sent; `done_many` (the sink's
    delivery reports) passes a ticket on to the tracker only then. Records with one output go
    straight through."""

    def __init__(self, done_many: Callable[[Iterable[Ticket]], None]):
        self._done_many = done_many
        self._waiting: dict[Ticket, int] = {}
        self._lock = threading.Lock()

    def expect(self, ticket: Ticket, outputs: int) -> None:
        if outputs > 1:
            with self._lock:
                self._waiting[ticket] = self._waiting.get(ticket, 1) + outputs - 1

    def done_many(self, tickets: Iterable[Ticket]) -> None:
        if not self._waiting:
            self._done_many(tickets)
            return
        ready = []
        with self._lock:
            for ticket in tickets:
                left = self._waiting.get(ticket)
                if left is None:
                    ready.append(ticket)
                elif left <= 1:
                    del self._waiting[ticket]
                    ready.append(ticket)
                else:
                    self._waiting[ticket] = left - 1
        if ready:
            self._done_many(ready)
