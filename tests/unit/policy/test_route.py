"""Routing picks policies by topic and event fields; unmatched events fall back to the default."""

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
