"""The offset tracker: owns "an offset is committed only after its output was delivered".

Every consumed record is `track`ed; when the broker acknowledges the record's verdict or
dead letter, it is marked `done`. Classification finishes out of order, so the commit
position of a partition is one past the highest offset below which every record is done.
The tracker also counts what is in flight (records and bytes), which is the window the
source pauses on.

Thread-safe: the poll thread tracks and commits, the producer's delivery thread marks done.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    epoch: int
    pending: deque[int] = field(default_factory=deque)  # tracked offsets, in consumption order
    done: set[int] = field(default_factory=set)
    sizes: dict[int, int] = field(default_factory=dict)
    position: int | None = None  # next offset to commit (last done contiguous + 1)
    committed: int | None = None


@dataclass(frozen=True)
class Ticket:
    """Identifies one tracked record; a ticket from before a revoke is ignored after it."""

    topic: str
    partition: int
    offset: int
    epoch: int


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._epochs = 0
        self._events = 0
        self._bytes = 0
        self._idle = threading.Condition(self._lock)

    def track(self, topic: str, partition: int, offset: int, size: int) -> Ticket:
        with self._lock:
            state = self._partitions.get((topic, partition))
            if state is None:
                self._epochs += 1
                state = self._partitions[(topic, partition)] = _PartitionState(epoch=self._epochs)
            state.pending.append(offset)
            state.sizes[offset] = size
            self._events += 1
            self._bytes += size
            return Ticket(topic, partition, offset, state.epoch)

    def done(self, ticket: Ticket) -> None:
        with self._lock:
            state = self._partitions.get((ticket.topic, ticket.partition))
            if state is None or state.epoch != ticket.epoch or ticket.offset not in state.sizes:
                return  # the partition was revoked meanwhile; the new owner redoes the record
            if ticket.offset in state.done:
                return
            state.done.add(ticket.offset)
            self._events -= 1
            self._bytes -= state.sizes[ticket.offset]
            while state.pending and state.pending[0] in state.done:
                offset = state.pending.popleft()
                state.done.discard(offset)
                del state.sizes[offset]
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
                unfinished = [o for o in state.pending if o not in state.done]
                self._events -= len(unfinished)
                self._bytes -= sum(state.sizes[o] for o in unfinished)
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
                if state is not None:
                    state.committed = position

    def in_flight(self, partitions: list[TopicPartitionKey] | None = None) -> int:
        with self._lock:
            return self._count_locked(partitions)

    @property
    def in_flight_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def wait_until_drained(self, timeout: float, partitions: list[TopicPartitionKey] | None = None) -> bool:
        """Block until nothing (of `partitions`) is in flight or `timeout` passes; True if drained."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count_locked(partitions) == 0, timeout=timeout)

    def _count_locked(self, partitions: list[TopicPartitionKey] | None) -> int:
        if partitions is None:
            return self._events
        return sum(len(s.pending) - len(s.done) for k in partitions if (s := self._partitions.get(k)) is not None)
