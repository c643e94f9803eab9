"""Per-community policy sets: what a community's own policies add to its events.

An event whose `community_id` is C gets, beside the platform's policies (community None, routed
by `policies.routes`), every live policy of community C (`community: C`, no `shadow_of`). A
community's policies may also override, for that community's events only, a platform policy's
actions (`baseline_actions`) and the repeat-offender thresholds (`offender_thresholds`).

`CommunityIndex` answers "what does community C add" in O(1) per event: it keeps community ->
`Community`, built again only when the mapping of the policies in force is another object (a
reload or a policy-topic batch replaces it whole, `consumer.policy.store`), never per event.
Where several policies of one community override the same thing, the most severe action wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from consumer.policy.actions import rank
from consumer.policy.parse import Policy


@dataclass(frozen=True)
class Community:
    """What one community's live policies add to its events."""

    policies: tuple[Policy, ...]  # by id
    # platform policy id -> its actions map with this community's entries laid over it
    actions: dict[str, dict[str, str]] = field(default_factory=dict)
    # (violations, action) by rising count, replacing chat.offender_thresholds; None: the configured ones
    offender_thresholds: tuple[tuple[int, str], ...] | None = None


class CommunityIndex:
    """community id -> `Community`, from the policies `get_policies` returns; thread-safe to read
    (a rebuild replaces the index whole)."""

    def __init__(self, get_policies: Callable[[], Mapping[str, Policy]]):
        self._get_policies = get_policies
        self._seen: Mapping[str, Policy] | None = None
        self._index: dict[str, Community] = {}
        self.rebuilds = 0

    def get(self, community_id: str | None) -> Community | None:
        """The community's additions, or None when it has no policy of its own."""
        policies = self._get_policies()
        if policies is not self._seen:
            self._index = build(policies)
            self._seen = policies
            self.rebuilds += 1
        return self._index.get(community_id) if community_id is not None else None


def build(policies: Mapping[str, Policy]) -> dict[str, Community]:
    by_community: dict[str, list[Policy]] = {}
    for policy in policies.values():
        if policy.community is not None and policy.shadow_of is None:
            by_community.setdefault(policy.community, []).append(policy)
    return {community: _community(sorted(own, key=lambda p: p.id), policies) for community, own in by_community.items()}


def _community(own: list[Policy], policies: Mapping[str, Policy]) -> Community:
    overrides: dict[str, dict[str, str]] = {}
    thresholds: dict[int, str] | None = None
    for policy in own:
        for platform_id, actions in policy.baseline_actions.items():
            laid = overrides.setdefault(platform_id, {})
            for result, action in actions.items():
                laid[result] = _severer(laid.get(result), action)
        if policy.offender_thresholds is not None:
            thresholds = thresholds if thresholds is not None else {}
            for count, action in policy.offender_thresholds:
                thresholds[count] = _severer(thresholds.get(count), action)
    actions = {}
    for platform_id, laid in overrides.items():
        platform = policies.get(platform_id)
        # A platform policy not in force (or a community key) has nothing to override.
        if platform is not None and platform.community is None:
            actions[platform_id] = {**platform.actions, **laid}
    return Community(
        tuple(own), actions, None if thresholds is None else tuple(sorted(thresholds.items()))
    )


def _severer(current: str | None, action: str) -> str:
    return action if current is None or rank(action) > rank(current) else current
