"""Drift watch: which communities get a metric label of their own, so that a platform with
thousands of communities exports a bounded number of series per policy version.

The rule: every `rank_interval_s` (default 60 s) the communities are ranked by the events
decided for them since the previous ranking; the top `top` (default 20) are labelled with their
own id, every other community (and an event with no community) counts under `other`. A
community already labelled keeps its label on a tie, so the set changes only when a community
really outranks one (a raid, a new large server), not at every ranking. So at most `top + 1`
community values exist per policy version, stage and outcome.

Cost per record: one dict increment for the volume, one comparison of the clock, one dict
lookup for the label; ranking runs once per interval, on the event loop, like the counting.
A community that loses its label has its series folded away (`PipelineMetrics.evict`): its
counts stay in the totals, its own series stops being exported, so the cardinality stays
bounded over a long run.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

OTHER = "other"


class CommunityLabels:
    """The community label each verdict and dead letter is counted under."""

    def __init__(self, top: int = 20, rank_interval_s: float = 60.0, evicted: Callable[[set[str]], None] | None = None):
        """`evicted`: called with the communities that lost their label at a ranking."""
        self.top = top
        self.rank_interval_s = rank_interval_s
        self._evicted = evicted
        self._labelled: dict[str, str] = {}  # community id -> its label (its id); only the top ones
        self._volume: dict[str, int] = {}  # events per community since the last ranking
        self._next_rank: float | None = None

    def count(self, community: str | None, now: float) -> str:
        """The label of one decided event of `community` at `now` (monotonic seconds), counted
        towards the next ranking."""
        if community is None:
            return OTHER
        volume = self._volume
        volume[community] = volume.get(community, 0) + 1
        if self._next_rank is None:  # the first ranking comes one interval after the first event
            self._next_rank = now + self.rank_interval_s
        elif now >= self._next_rank:
            self.rank(now)
        return self._labelled.get(community, OTHER)

    def label(self, community: str | None) -> str:
        """The label `community` is counted under now, without counting it (a dead letter)."""
        return OTHER if community is None else self._labelled.get(community, OTHER)

    def policy_series(self, policy_key: str, policy_community: str | None) -> str:
        """The policy label a result is counted under: a platform policy's id; a community's own
        policy's key (`community/id`) while that community is labelled, else `other`, so a
        thousand communities' policies stay a bounded number of series."""
        if policy_community is None or policy_community in self._labelled:
            return policy_key
        return OTHER

    def rank(self, now: float) -> None:
        """Label the top communities by volume since the last ranking; incumbents win ties."""
        labelled = self._labelled
        top = heapq.nlargest(self.top, self._volume.items(), key=lambda item: (item[1], item[0] in labelled))
        chosen = {community for community, _ in top}
        lost = set(labelled) - chosen
        self._labelled = {community: community for community in chosen}
        self._volume = {}
        self._next_rank = now + self.rank_interval_s
        if lost and self._evicted is not None:
            self._evicted(lost)

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)
