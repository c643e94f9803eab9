"""Leases: one review item in front of one reviewer at a time.

`Leases` owns "two sessions never hold the same review at the same time". A session that is
shown an item holds a lease on it for `review.console.lease_s` from the last time it looked
(every view renews it); a lease that ran out is free for the next session that asks. A
session holds one lease at a time: asking for another item gives up the one it had.

It also owns "one decision per review": a decision needs the review's lease, and
`begin_decision` checks that nobody decided it and marks it in flight in one step under the
lock, so of two concurrent decisions on one review (two reviewers, or one double-click) one is
written and the other is told "decided already" before anything is written. A lead's overturn
of a decided review takes the same mark (`begin_overturn`), checked against the answer the lead
saw: of two leads overturning at once, the second is told the answer changed.

What holds, and where: the leases live in the memory of one console process (it serves hundreds
of reviewers: each request is a few dictionary look-ups). Several console processes share a
review topic as replicas (`review.console.replicas`/`replica`): each holds the items of its own
partitions only (`consumer.console.feed`), so no item has leases in two processes. Two consoles
on the same topics configured as the same replica (or without replicas) do not see each other's
leases and may show one item to two people; the decisions topic still settles it (the first
decision read for a review counts; a second with another answer becomes a
`conflicting_decision` dead letter). A restart forgets the leases: items shown then are free
again, which costs at most one lease period of double work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Lease:
    review_id: str
    session_id: str
    reviewer_id: str
    expires_at: float


class Leases:
    """Thread-safe; `clock` is monotonic seconds (injected by the tests)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_review: dict[str, Lease] = {}
        self._by_session: dict[str, str] = {}
        self._deciding: set[str] = set()

    def holder(self, review_id: str) -> Lease | None:
        """The live lease on a review, if any."""
        with self._lock:
            return self._live(review_id, self._clock())

    def claim(self, review_id: str, session_id: str, reviewer_id: str) -> bool:
        """Take or renew the lease for this session; False if another session holds it."""
        with self._lock:
            now = self._clock()
            current = self._live(review_id, now)
            if current is not None and current.session_id != session_id:
                return False
            previous = self._by_session.get(session_id)
            if previous is not None and previous != review_id:
                self._drop(previous, session_id)
            self._by_review[review_id] = Lease(review_id, session_id, reviewer_id, now + self.lease_s)
            self._by_session[session_id] = review_id
            return True

    def claim_first(self, review_ids: Iterable[str], session_id: str, reviewer_id: str) -> str | None:
        """The first of `review_ids` (in their order) no other session holds, now leased to this one."""
        for review_id in review_ids:
            if self.claim(review_id, session_id, reviewer_id):
                return review_id
        return None

    def release(self, review_id: str, session_id: str) -> None:
        """Give the review back (decided or skipped); a lease held by another session stays."""
        with self._lock:
            self._drop(review_id, session_id)

    def begin_decision(self, review_id: str, session_id: str,
                       decided: Callable[[], bool]) -> Literal["decided", "not held"] | None:  # fmt: skip
        """None: this session may write its decision now, and until `end_decision` no other may.
        "decided": `decided()` says so or another decision is in flight; "not held": the session
        has no live lease on the review."""
        with self._lock:
            if review_id in self._deciding or decided():
                return "decided"
            lease = self._live(review_id, self._clock())
            if lease is None or lease.session_id != session_id:
                return "not held"
            self._deciding.add(review_id)
            return None

    def begin_overturn(self, review_id: str, changed: Callable[[], bool]) -> Literal["changed"] | None:
        """None: this session may write its overturn now, and until `end_decision` nobody else may
        write on the review. "changed": `changed()` says the answer in force is not the one the lead
        saw, or another decision or overturn is in flight. No lease: a decided item is in nobody's queue."""
        with self._lock:
            if review_id in self._deciding or changed():
                return "changed"
            self._deciding.add(review_id)
            return None

    def end_decision(self, review_id: str) -> None:
        """The decision (or overturn) begun by this session was written (and applied to the state) or failed."""
        with self._lock:
            self._deciding.discard(review_id)

    def held_by_others(self, session_id: str) -> set[str]:
        with self._lock:
            now = self._clock()
            return {rid for rid, lease in self._by_review.items() if lease.expires_at > now and lease.session_id != session_id}

    def live(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for lease in self._by_review.values() if lease.expires_at > now)

    def _live(self, review_id: str, now: float) -> Lease | None:
        lease = self._by_review.get(review_id)
        if lease is None:
            return None
        if lease.expires_at <= now:
            self._drop(review_id, lease.session_id)
            return None
        return lease

    def _drop(self, review_id: str, session_id: str) -> None:
        lease = self._by_review.get(review_id)
        if lease is not None and lease.session_id == session_id:
            del self._by_review[review_id]
        if self._by_session.get(session_id) == review_id:
            del self._by_session[session_id]
