"""Review state: the review items and the first decision of each, as the two topics hold them.

Owns "a decision is applied once per review_id". The state is a view of the review topic
(every item) and the decisions topic (every decision), read from the earliest retained
offsets at start and followed from then on (`consumer.review.loop`); nothing else stores
it, so a restart rebuilds the same state. The first decision read for a review id is the
one that counts: decisions are keyed by review_id, so all decisions of one review sit in one
partition, in order. A later one with the same answer is a duplicate (changes nothing), one
with another answer a conflict (a dead letter).

Two more kinds of record share the decisions topic. An overturn (`ReviewDecision.kind
"overturn"`, a lead's) counts when the review is decided and its answer differs from the one
that stands: the answers in force form a chain, first decision then overturns in topic order,
and each overturn knows the answer it replaced (its corrected verdict supersedes that one's).
Notes (`ReviewNote`: escalations and comments) are no decisions: the state keeps them, in
order, for the console (an escalated item waits in the lead queue) and the audit trail.

Also counts what the metrics show: open reviews per policy and reason, decisions, how often
people agree with the machine per policy and stage, which side a disagreement review
proved right, and decision latency.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

from consumer.events import ReviewDecision, ReviewItem, ReviewNote, ReviewReason

# Where a record sits: (topic, partition, offset).
Coordinates = tuple[str, int, int]
LATENCY_BUCKETS_S = (60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)


@dataclass(frozen=True)
class Applied:
    """The decision that counts for a review, and where it sits on the decisions topic."""

    decision: ReviewDecision
    at: Coordinates


@dataclass(frozen=True)
class Noted:
    """An escalation or comment on a review, and where it sits on the decisions topic."""

    note: ReviewNote
    at: Coordinates


@dataclass(frozen=True)
class Decided:
    """A review that got its decision (or an overturn) while the state was being read: teach the classifier."""

    item: ReviewItem
    decision: ReviewDecision
    replaces: Applied | None = None  # an overturn: the answer in force before it


class ReviewState:
    """Thread-safe: the review loop's thread writes, the metrics read."""

    def __init__(self, max_items: int = 1_000_000):
        self._max_items = max_items
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ReviewItem] = OrderedDict()
        self._decided: dict[str, Applied] = {}
        self._overturns: dict[str, list[Applied]] = {}  # review id -> overturns that counted, in topic order
        self._notes: OrderedDict[str, list[Noted]] = OrderedDict()  # review id -> escalations and comments
        self._orphans: dict[str, list[Applied]] = {}  # decisions read before their item
        self._keys: dict[str, bytes | None] = {}  # review id -> the item's record key (the input's)
        self.decisions = 0
        self.overturns = 0
        self.agreement: Counter[tuple[str, str, bool]] = Counter()  # (policy key, machine stage, agreed)
        self.disagreement_right: Counter[tuple[str, str, str]] = Counter()  # (policy, cheap stage, cheap|reasoner)
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0

    # -- reading the topics --------------------------------------------------------------------

    def add_item(self, item: ReviewItem, key: bytes | None = None) -> list[Decided]:
        """An item read from the review topic; returns the decisions that waited for it."""
        with self._lock:
            if item.review_id in self._items or item.review_id in self._decided:
                return []  # the same review opened again (a record read twice)
            self._items[item.review_id] = item
            self._keys[item.review_id] = key
            while len(self._items) > self._max_items:
                evicted, _ = self._items.popitem(last=False)
                self._keys.pop(evicted, None)
                self._overturns.pop(evicted, None)
                self._notes.pop(evicted, None)
            waiting = self._orphans.pop(item.review_id, [])
        return [d for applied in waiting if (d := self._decide(item, applied)) is not None]

    def add_decision(self, decision: ReviewDecision, at: Coordinates) -> Decided | None:
        """A decision read from the decisions topic; returns it with its item when it is the
        first for a known review (then it counts), else None."""
        with self._lock:
            item = self._items.get(decision.review_id)
            if item is None:
                if decision.review_id not in self._decided:
                    self._orphans.setdefault(decision.review_id, []).append(Applied(decision, at))
                return None
        return self._decide(item, Applied(decision, at))

    def add_record(self, record: ReviewDecision | ReviewNote, at: Coordinates) -> Decided | None:
        """Any record of the decisions topic: a decision or overturn (see `add_decision`), or a note."""
        if isinstance(record, ReviewNote):
            self.add_note(record, at)
            return None
        return self.add_decision(record, at)

    def add_note(self, note: ReviewNote, at: Coordinates) -> None:
        """An escalation or comment read from the decisions topic (or just written there)."""
        with self._lock:
            notes = self._notes.setdefault(note.review_id, [])
            if all(n.at != at for n in notes):
                notes.append(Noted(note, at))
                notes.sort(key=lambda n: n.at)
            # Notes may come before their item (two topics read side by side); bounded like the items.
            while len(self._notes) > self._max_items:
                self._notes.popitem(last=False)

    def _decide(self, item: ReviewItem, applied: Applied) -> Decided | None:
        decision = applied.decision
        if decision.kind == "overturn":
            return self._overturn(item, applied)
        with self._lock:
            if decision.review_id in self._decided:
                return None
            self._decided[decision.review_id] = applied
            self.decisions += 1
            agreed = decision.violation == item.machine.violation
            self.agreement[(item.policy_key, item.machine.stage or "unknown", agreed)] += 1
            if item.reason == ReviewReason.DISAGREEMENT:
                side = "cheap" if agreed else "reasoner"
                self.disagreement_right[(item.policy_key, item.machine.stage or "unknown", side)] += 1
            latency = max(0.0, (decision.decided_at - item.created_at).total_seconds())
            self.latency_sum_s += latency
            self.latency_buckets[sum(1 for b in LATENCY_BUCKETS_S if latency > b)] += 1
        return Decided(item, decision)

    def _overturn(self, item: ReviewItem, applied: Applied) -> Decided | None:
        """An overturn counts on a decided review when it changes the answer in force."""
        overturn = applied.decision
        with self._lock:
            first = self._decided.get(overturn.review_id)
            if first is None:
                return None  # nothing to overturn yet: the applier dead-letters it
            chain = self._overturns.setdefault(overturn.review_id, [])
            if first.at == applied.at or any(a.at == applied.at for a in chain):
                return None  # read twice
            standing = chain[-1] if chain else first
            if (standing.decision.violation, standing.decision.category) == (overturn.violation, overturn.category):
                return None  # changes nothing
            chain.append(applied)
            self.overturns += 1
        return Decided(item, overturn, replaces=standing)

    # -- questions -----------------------------------------------------------------------------

    def item(self, review_id: str) -> ReviewItem | None:
        with self._lock:
            return self._items.get(review_id)

    def key(self, review_id: str) -> bytes | None:
        """The item's record key: the input record's, so the corrected verdict is keyed alike."""
        with self._lock:
            return self._keys.get(review_id)

    def known(self, review_id: str) -> bool:
        with self._lock:
            return review_id in self._items or review_id in self._decided

    def drop_orphan(self, review_id: str, at: Coordinates) -> None:
        """A decision for an unknown review was dead-lettered: it must not count if the item comes later."""
        with self._lock:
            left = [a for a in self._orphans.get(review_id, []) if a.at != at]
            if left:
                self._orphans[review_id] = left
            else:
                self._orphans.pop(review_id, None)

    def applied(self, review_id: str) -> Applied | None:
        """The decision that counts for this review, if one was read."""
        with self._lock:
            return self._decided.get(review_id)

    def standing(self, review_id: str) -> Applied | None:
        """The answer in force: the last overturn that counted, else the first decision."""
        with self._lock:
            chain = self._overturns.get(review_id)
            return chain[-1] if chain else self._decided.get(review_id)

    def replaced(self, review_id: str, at: Coordinates) -> Applied | None:
        """For the overturn at `at`: the answer it replaced; None when it did not count."""
        with self._lock:
            chain = self._overturns.get(review_id, [])
            for n, applied in enumerate(chain):
                if applied.at == at:
                    return chain[n - 1] if n else self._decided[review_id]
            return None

    def notes(self, review_id: str) -> list[Noted]:
        """Escalations and comments on a review, oldest first."""
        with self._lock:
            return list(self._notes.get(review_id, []))

    def escalation(self, review_id: str) -> Noted | None:
        """The latest escalation of a review, if any: it waits in the lead queue until decided."""
        with self._lock:
            return next((n for n in reversed(self._notes.get(review_id, [])) if n.note.kind == "escalation"), None)

    def actions(self, review_id: str) -> list[Applied | Noted]:
        """What people did on a review (decision, overturns, notes), in topic order."""
        with self._lock:
            return self._actions(review_id)

    def history(self) -> list[tuple[ReviewItem, list[Applied | Noted]]]:
        """Every held item with what people did on it, for the audit trail."""
        with self._lock:
            return [(item, done) for rid, item in self._items.items() if (done := self._actions(rid))]

    def _actions(self, review_id: str) -> list[Applied | Noted]:
        done: list[Applied | Noted] = [*self._notes.get(review_id, []), *self._overturns.get(review_id, [])]
        if review_id in self._decided:
            done.append(self._decided[review_id])
        return sorted(done, key=lambda d: d.at)

    def open_reviews(self) -> Counter[tuple[str, str]]:
        """Items without a decision, by (policy key, reason)."""
        with self._lock:
            return Counter(
                (item.policy_key, item.reason.value) for rid, item in self._items.items() if rid not in self._decided
            )

    def pending(self) -> list[ReviewItem]:
        with self._lock:
            return [item for rid, item in self._items.items() if rid not in self._decided]

    def decided_items(self) -> list[Decided]:
        """Every decided review whose item is known, in the order the items were read."""
        with self._lock:
            return [Decided(item, self._decided[rid].decision) for rid, item in self._items.items() if rid in self._decided]
