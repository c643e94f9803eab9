"""Route: which policies apply to an event, by input topic and event fields.

Routes are tried in order. With `match: first` the first matching route decides; with
`match: all` the policies of every matching route apply (each once, in route order). When
nothing matches, the default policy applies if there is one. Routes choose among the platform's
policies (no `community`): the baseline. Then an event with a `community_id` gets every live
policy of its community as well, whatever the routes say (`consumer.policy.communities`, O(1)
per event). An event that gets no policy at all becomes a `no_policy` dead letter. A shadow
candidate (`shadow_of`) is never routed: it runs beside its live policy
(`consumer.pipeline.shadow`); nor is a community policy named in a route: its community selects it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from consumer.config import PolicySettings, Route
from consumer.events import ContentEvent
from consumer.policy import Policy
from consumer.policy.communities import Community, CommunityIndex
from consumer.policy.exceptions import RoutingError


@dataclass(frozen=True)
class _CompiledRoute:
    topic_match: Callable[[str], bool]
    field_match: Callable[[ContentEvent], bool]
    policy_ids: tuple[str, ...]


class Router:
    """Maps (topic, event) to the policies that apply; reads policies through `get_policies`.

    `get_policies` is called per event, so a policy reload takes effect for the next event.
    """

    def __init__(self, settings: PolicySettings, get_policies: Callable[[], Mapping[str, Policy]]):
        self._get_policies = get_policies
        self._first_only = settings.match == "first"
        self._default = settings.default
        self._routes = [_compile(route) for route in settings.routes]
        self.communities = CommunityIndex(get_policies)
        self.check(get_policies())

    def community(self, community_id: str | None) -> Community | None:
        """What the community's own policies add to its events (policies, overrides), or None."""
        return self.communities.get(community_id)

    def check(self, policies: Mapping[str, Policy]) -> None:
        """Raise RoutingError if a route or the default names a policy that is not loaded."""
        named = {pid for route in self._routes for pid in route.policy_ids}
        if self._default:
            named.add(self._default)
        missing = sorted(named - set(policies))
        if missing:
            raise RoutingError(f"policies.routes/default name unknown policies: {', '.join(missing)}")
        candidates = sorted(f"{pid} (shadow_of {policies[pid].shadow_of})" for pid in named if policies[pid].shadow_of)
        if candidates:
            raise RoutingError(f"policies.routes/default name shadow candidates, which never decide a verdict: "
                               f"{', '.join(candidates)}; route the live policy")  # fmt: skip
        owned = sorted(pid for pid in named if policies[pid].community is not None)
        if owned:
            raise RoutingError(f"policies.routes/default name community policies: {', '.join(owned)}; a community's "
                               "policies apply to its events (community_id) without a route")  # fmt: skip

    def policies_for(self, topic: str, event: ContentEvent) -> list[Policy]:
        """The baseline the routes choose, then the event's community's own policies."""
        chosen = self._baseline(topic, event)
        if event.community_id is not None:
            community = self.communities.get(event.community_id)
            if community is not None:
                chosen.extend(community.policies)
        return chosen

    def _baseline(self, topic: str, event: ContentEvent) -> list[Policy]:
        policies = self._get_policies()
        if not self._routes:  # the default alone, asked of every event
            default = policies.get(self._default) if self._default else None
            return [default] if default is not None and default.shadow_of is None else []
        chosen: dict[str, Policy] = {}
        for route in self._routes:
            if route.topic_match(topic) and route.field_match(event):
                for pid in route.policy_ids:
                    policy = policies.get(pid)
                    # A shadow candidate (an edit may make one of a routed policy) never decides a verdict.
                    if policy is not None and policy.shadow_of is None:
                        chosen.setdefault(pid, policy)
                if self._first_only:
                    break
        default = policies.get(self._default) if not chosen and self._default else None
        if default is not None and default.shadow_of is None:
            chosen[self._default] = default
        return list(chosen.values())


def _compile(route: Route) -> _CompiledRoute:
    return _CompiledRoute(_topic_matcher(route.topics), _field_matcher(route.where), tuple(route.policies))


def _topic_matcher(topics: list[str]) -> Callable[[str], bool]:
    if not topics:
        return lambda topic: True
    names = {t for t in topics if not t.startswith("^")}
    patterns = [re.compile(t) for t in topics if t.startswith("^")]
    return lambda topic: topic in names or any(p.match(topic) for p in patterns)


def _field_matcher(where: dict[str, str | list[str]]) -> Callable[[ContentEvent], bool]:
    wanted = {field: {v} if isinstance(v, str) else set(v) for field, v in where.items()}

    def matches(event: ContentEvent) -> bool:
        for field, values in wanted.items():
            if field.startswith("metadata."):
                actual = event.metadata.get(field[len("metadata.") :])
            else:
                actual = getattr(event, field, None)
            if actual is None or str(actual) not in values:
                return False
        return True

    return matches
