"""Routing picks policies by topic and event fields; unmatched events fall back to the default."""

import pytest

from consumer.config import PolicySettings
from consumer.events import ContentEvent
from consumer.policy import Policy
from consumer.policy.route import Router, RoutingError

POLICIES = {pid: Policy(id=pid, version="v1", text="...") for pid in ("harassment", "spam", "reviews", "fallback")}


def event(**fields) -> ContentEvent:
    return ContentEvent(event_id="e", content="hi", **fields)


def router(**settings) -> Router:
    return Router(PolicySettings(**settings), lambda: POLICIES)


ROUTES = [
    {"topics": ["chat"], "policies": ["harassment", "spam"]},
    {"topics": ["^market\\..*"], "where": {"content_type": "review"}, "policies": ["reviews", "spam"]},
    {"where": {"metadata.priority": ["high", "urgent"]}, "policies": ["harassment"]},
]


def ids(policies) -> list[str]:
    return [p.id for p in policies]


def test_all_matching_routes_apply_each_policy_once():
    r = router(routes=ROUTES)
    assert ids(r.policies_for("chat", event())) == ["harassment", "spam"]
    assert ids(r.policies_for("market.eu", event(content_type="review", metadata={"priority": "urgent"}))) == [
        "reviews", "spam", "harassment",
    ]  # fmt: skip
    assert ids(r.policies_for("market.eu", event(content_type="listing"))) == []


def test_first_match_stops_at_the_first_route():
    r = router(routes=ROUTES, match="first")
    assert ids(r.policies_for("market.eu", event(content_type="review", metadata={"priority": "high"}))) == [
        "reviews", "spam",
    ]  # fmt: skip


def test_default_applies_only_when_nothing_matches():
    r = router(routes=ROUTES, default="fallback")
    assert ids(r.policies_for("other", event())) == ["fallback"]
    assert ids(r.policies_for("chat", event())) == ["harassment", "spam"]


def test_unknown_policy_names_are_reported():
    try:
        router(routes=[{"policies": ["nope"]}], default="missing")
    except RoutingError as exc:
        assert "missing" in str(exc) and "nope" in str(exc)
    else:
        raise AssertionError("expected RoutingError")


# -- per-community policy sets -------------------------------------------------------------------

PLATFORM = Policy(id="chat", version="p1", text="...", actions={"harassment": "delete"})


def community_policy(community: str, pid: str = "chat", **fields) -> Policy:
    return Policy(id=pid, version=f"{community}-1", text="...", community=community, **fields)


class Store:
    """A policies mapping replaced whole on change, as `PolicyStore` does."""

    def __init__(self, policies: list[Policy]):
        self.current = {p.key: p for p in policies}

    def get(self):
        return self.current


def keys(policies) -> list[str]:
    return [p.key for p in policies]


def test_an_event_gets_its_communitys_live_policies_beside_the_routed_baseline():
    own = [community_policy("c1"), community_policy("c1", "links"), community_policy("c2")]
    candidate = community_policy("c1", "chat-v2", shadow_of="chat")
    store = Store([PLATFORM, *own, candidate])
    r = Router(PolicySettings(routes=[{"topics": ["chat"], "policies": ["chat"]}]), store.get)
    assert keys(r.policies_for("chat", event(community_id="c1"))) == ["chat", "c1/chat", "c1/links"]
    assert keys(r.policies_for("chat", event(community_id="c2"))) == ["chat", "c2/chat"]
    assert keys(r.policies_for("chat", event(community_id="c3"))) == ["chat"]  # no policies of its own
    assert keys(r.policies_for("chat", event())) == ["chat"]
    # No route matches: the community's own policies still apply (and nothing else without a default).
    assert keys(r.policies_for("other", event(community_id="c2"))) == ["c2/chat"]
    assert keys(r.policies_for("other", event(community_id=7))) == []


def test_the_community_index_is_built_again_only_when_the_policies_change():
    store = Store([PLATFORM, community_policy("c1")])
    r = Router(PolicySettings(default="chat"), store.get)
    for _ in range(1000):
        r.policies_for("chat", event(community_id="c1"))
    assert r.communities.rebuilds == 1  # once, not per event
    store.current = {**store.current, "c1/links": community_policy("c1", "links")}  # a reload: a new mapping
    assert keys(r.policies_for("chat", event(community_id="c1"))) == ["chat", "c1/chat", "c1/links"]
    r.policies_for("chat", event(community_id="c1"))
    assert r.communities.rebuilds == 2


def test_routes_and_the_default_may_not_name_a_community_policy_or_a_candidate():
    store = Store([PLATFORM, community_policy("c1"), Policy(id="chat-v2", version="v", text="...", shadow_of="chat")])
    with pytest.raises(RoutingError, match=r"name community policies: c1/chat; a community's policies apply"):
        Router(PolicySettings(routes=[{"policies": ["chat", "c1/chat"]}]), store.get)
    with pytest.raises(RoutingError, match="c1/chat"):
        Router(PolicySettings(default="c1/chat"), store.get)
    with pytest.raises(RoutingError, match=r"shadow candidates.*chat-v2"):
        Router(PolicySettings(default="chat-v2"), store.get)


def test_a_communitys_overrides_lie_over_the_platform_policy_the_most_severe_winning():
    own = [
        community_policy("c1", offender_thresholds=((3, "timeout"),),
                         baseline_actions={"chat": {"harassment": "allow", "safe": "allow"}, "gone": {"x": "flag"}}),
        community_policy("c1", "links", baseline_actions={"chat": {"harassment": "flag"}},
                         offender_thresholds=((3, "escalate"), (1, "flag"))),
    ]  # fmt: skip
    r = Router(PolicySettings(default="chat"), Store([PLATFORM, *own, community_policy("c2")]).get)
    c1 = r.community("c1")
    assert c1 is not None
    # The platform's map with the community's entries laid over it; a policy not in force is left out.
    assert c1.actions == {"chat": {"harassment": "flag", "safe": "allow"}}
    assert c1.offender_thresholds == ((1, "flag"), (3, "escalate"))
    c2 = r.community("c2")
    assert c2 is not None and c2.actions == {} and c2.offender_thresholds is None
    assert r.community("c3") is None and r.community(None) is None
