"""The review console's stages through their public interfaces: leases, identity, what the pages
show, and the application's answers (Starlette's test client; the browser tests are in
tests/integration/test_review_console.py)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from starlette.testclient import TestClient

from consumer.config.console import ConsoleSettings
from consumer.console.app import ConsoleApp
from consumer.console.identity import COOKIE, Identity
from consumer.console.leases import Leases
from consumer.console.queue import dashboard, in_queue, policy_view, queues
from consumer.console.writer import DecisionNotRecorded
from consumer.events import ReviewDecision, ReviewItem
from consumer.policy import PolicyStore
from consumer.review.state import ReviewState
from tests.conftest import REPO

NOW = datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc)
SETTINGS = ConsoleSettings(reviewers=[{"id": "alice", "token": "t-alice"}, {"id": "bob", "token": "t-bob"}])


def item(n: int, content: str = "hello", policy: str = "chat-harassment", reason: str = "undecided",
         minutes_ago: int = 0, rule_ids: list[str] | None = None) -> ReviewItem:  # fmt: skip
    return ReviewItem.model_validate({
        "review_id": f"rv-{n}", "reason": reason, "created_at": (NOW - timedelta(minutes=minutes_ago)).isoformat(),
        "policy_id": policy, "policy_version": "v1", "author_id": "u1", "community_id": "g1",
        "event": {"event_id": f"e{n}", "content": content, "author": "user-1",
                  "context": [{"author": "user-2", "content": "earlier"}]},
        "machine": {"violation": True, "category": "harassment", "rule_ids": rule_ids or [], "confidence": "low",
                    "stage": "lexical", "model": "cascade", "action": "delete"},
        "source": {"topic": "t", "partition": 0, "offset": n},
    })  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_two_sessions_never_hold_one_item_and_a_lease_that_ran_out_is_free_again():
    clock = Clock()
    leases = Leases(60, clock)
    assert leases.claim("rv-1", "s-alice", "alice")
    assert not leases.claim("rv-1", "s-bob", "bob")
    assert leases.claim_first(["rv-1", "rv-2"], "s-bob", "bob") == "rv-2"
    assert leases.held_by_others("s-alice") == {"rv-2"}
    clock.now += 59
    assert leases.claim("rv-1", "s-alice", "alice")  # looking again renews it
    clock.now += 30
    assert not leases.claim("rv-1", "s-bob", "bob")
    clock.now += 31
    assert leases.claim("rv-1", "s-bob", "bob")  # alice left it for longer than the lease
    assert leases.holder("rv-2") is None  # one lease per session: bob gave rv-2 up for rv-1
    leases.release("rv-1", "s-alice")  # not hers any more: nothing happens
    assert leases.holder("rv-1").reviewer_id == "bob"
    leases.release("rv-1", "s-bob")
    assert leases.holder("rv-1") is None and leases.live() == 0


def test_tokens_sign_in_named_reviewers_and_idle_sessions_end():
    clock = Clock()
    identity = Identity(ConsoleSettings(reviewers=SETTINGS.reviewers, session_idle_s=100), clock)
    assert identity.check() is None
    assert identity.reviewer_for_token(" t-bob ") == "bob" and identity.reviewer_for_token("t-") is None
    session = identity.open("bob")
    assert identity.session({COOKIE: session.id}, {}) is session
    assert identity.session({}, {"X-Forwarded-User": "bob"}) is None  # tokens mode ignores the header
    clock.now += 101
    assert identity.session({COOKIE: session.id}, {}) is None
    assert "nobody could sign in" in Identity(ConsoleSettings()).check()


def test_behind_a_proxy_the_header_names_the_reviewer():
    identity = Identity(ConsoleSettings(identity="header", header="X-User", reviewers=[{"id": "carol", "token": "x"}],
                                        trusted_proxies=["10.0.0.0/8", "::1/128"]))  # fmt: skip
    proxy = "10.1.2.3"
    assert identity.session({}, [], proxy) is None and identity.session({}, ["mallory"], proxy) is None
    first = identity.session({}, ["carol"], proxy)
    assert first is not None and first.reviewer_id == "carol"
    assert identity.session({COOKIE: first.id}, ["carol"], proxy) is first
    assert identity.session({}, ["carol"], "::1") is first  # no cookie: the person's session, not another one
    assert identity.session({}, ["carol"], "192.168.0.9") is None  # not a configured proxy
    assert identity.session({}, ["carol"], None) is None
    assert identity.session({}, ["carol", "carol"], proxy) is None  # the header twice: refused
    anyone = Identity(ConsoleSettings(identity="header", header="X-User"))
    assert anyone.session({}, ["dave"], "127.0.0.1").reviewer_id == "dave"  # no list: whoever the proxy names
    assert "trusted_proxies is empty" in Identity(ConsoleSettings(identity="header", trusted_proxies=[])).check()
    with pytest.raises(ValueError, match="'10.0.0/33' is not an address or a network"):
        ConsoleSettings(trusted_proxies=["10.0.0/33"])


def test_cookieless_requests_share_one_session_and_idle_ones_expire_without_a_scan():
    clock = Clock()
    identity = Identity(ConsoleSettings(identity="header", session_idle_s=100), clock)
    for _ in range(300):
        identity.session({}, ["erin"], "127.0.0.1")
    assert identity.live() == 1
    for n in range(50):
        identity.open(f"r{n}")
    clock.now += 101
    assert identity.live() == 0


def test_blank_tokens_are_configuration_errors_and_tokens_are_compared_stripped():
    for blank in ("", " ", "\n"):
        with pytest.raises(ValueError, match="must not be empty or blank"):
            ConsoleSettings(reviewers=[{"id": "r2", "token": blank}])
    identity = Identity(ConsoleSettings(reviewers=[{"id": "r1", "token": " from-a-file\n"}]))
    assert identity.reviewer_for_token("from-a-file") == "r1" and identity.reviewer_for_token(" from-a-file\n") == "r1"
    assert identity.reviewer_for_token("") is None and identity.reviewer_for_token(None) is None
    with pytest.raises(ValueError, match="tokens must be distinct"):
        ConsoleSettings(reviewers=[{"id": "a", "token": "1"}, {"id": "b", "token": " 1 "}])


def test_check_config_refuses_a_blank_token_naming_the_key(tmp_path):
    from typer.testing import CliRunner

    from consumer.cli import app

    config = tmp_path / "console.yaml"
    config.write_text('review:\n  console:\n    reviewers: [{id: r1, token: "t-1"}, {id: r2, token: "  "}]\n')
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)])
    assert result.exit_code == 2
    assert "review.console.reviewers.1.token" in result.output and "must not be empty or blank" in result.output


def test_a_replica_outside_the_replica_count_is_a_configuration_error():
    with pytest.raises(ValueError, match="replica: 2 is not below review.console.replicas"):
        ConsoleSettings(replicas=2, replica=2)


def test_duplicate_reviewers_or_tokens_are_configuration_errors():
    with pytest.raises(ValueError, match="ids must be distinct"):
        ConsoleSettings(reviewers=[{"id": "a", "token": "1"}, {"id": "a", "token": "2"}])
    with pytest.raises(ValueError, match="tokens must be distinct"):
        ConsoleSettings(reviewers=[{"id": "a", "token": "1"}, {"id": "b", "token": "1"}])


def test_queues_are_per_policy_and_reason_oldest_first_and_the_dashboard_counts_decisions():
    state = ReviewState()
    for n, (policy, reason, age) in enumerate([("chat-harassment", "undecided", 5), ("spam-scams", "sampled", 50),
                                               ("chat-harassment", "undecided", 30), ("chat-harassment", "appeal", 1)]):
        state.add_item(item(n, policy=policy, reason=reason, minutes_ago=age))
    policies = PolicyStore(REPO / "policies").get()
    found = queues(state, policies)
    assert [(q.policy_id, q.reason, q.open) for q in found] == [
        ("spam-scams", "sampled", 1), ("chat-harassment", "undecided", 2), ("chat-harassment", "appeal", 1)]
    assert found[1].title == "Harassment and hate in community chat"
    assert [i.review_id for i in in_queue(state, "chat-harassment", None)] == ["rv-2", "rv-0", "rv-3"]
    decided = lambda rid, violation, minutes_ago: ReviewDecision(  # noqa: E731
        review_id=rid, violation=violation, reviewer_id="alice", decided_at=NOW - timedelta(minutes=minutes_ago))
    state.add_decision(decided("rv-0", True, 0), ("d", 0, 0))  # agrees with the machine
    state.add_decision(decided("rv-2", False, 90), ("d", 0, 1))  # does not
    board = dashboard(state, policies, now=NOW)
    assert board.open == 2 and board.decisions == 2
    assert [n for _, n in board.hours][-2:] == [1, 1] and sum(n for _, n in board.hours) == 2
    assert [(a.policy_id, a.stage, a.decisions, a.agreed, a.percent) for a in board.agreement] == [
        ("chat-harassment", "lexical", 2, 1, 50)]


def test_the_policy_beside_an_item_shows_the_cited_rules_and_their_section():
    policy = PolicyStore(REPO / "policies").get()["chat-harassment"]
    cited = policy_view(policy, item(1, rule_ids=["h3"]))
    assert [(r.id, r.section) for r in cited.cited] == [("H3", "VIOLATES (1)")]
    assert cited.section_name == "VIOLATES (1)" and cited.sensitive and cited.title
    assert [r.id for r in cited.rules] == ["H1", "H2", "H3", "HT1"]
    safe = policy_view(policy, item(2, rule_ids=["S3"]))
    assert safe.section_name == "SAFE (0)" and any("Quoting" in line for line in safe.section)
    uncited = policy_view(policy, item(3))
    assert uncited.cited == [] and uncited.section_name == "VIOLATES (1)"
    assert policy_view(None, item(4)).version is None


# -- the application -------------------------------------------------------------------------------


class Writer:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.written: list[ReviewDecision] = []

    def write(self, decision: ReviewDecision):
        if self.fail:
            raise DecisionNotRecorded("not acknowledged")
        self.written.append(decision)
        return ("decisions", 0, len(self.written) - 1)


def console(*items: ReviewItem, writer: Writer | None = None) -> tuple[TestClient, ReviewState, Writer]:
    state = ReviewState()
    for i in items:
        state.add_item(i)
    writer = writer or Writer()
    app = ConsoleApp(SETTINGS, state, PolicyStore(REPO / "policies").get, writer)  # type: ignore[arg-type]
    return TestClient(app.asgi, follow_redirects=False), state, writer


def sign_in(client: TestClient, token: str, next: str = "/"):
    """The sign-in form as a browser posts it: the form's token back with its cookie."""
    form = client.get("/login")
    found = re.search(r'name="form_token" value="([^"]+)"', form.text)
    return client.post("/login", data={"token": token, "next": next, "form_token": found.group(1)})


def signed_in(client: TestClient, reviewer: str = "alice") -> TestClient:
    answer = sign_in(client, f"t-{reviewer}")
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    return client


def opened(client: TestClient, review_id: str):
    """An item's page after pressing its Open button (the POST that takes the lease)."""
    ask = client.get(f"/item/{review_id}")
    assert ask.status_code == 200 and 'id="open-item"' in ask.text
    taken = client.post(f"/open/{review_id}", data={"csrf": form_token(ask.text)})
    assert taken.status_code == 303
    return client.get(taken.headers["location"])


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_no_page_answers_without_a_reviewer():
    client, _, writer = console(item(1, "private words"))
    for method, path in (("GET", "/"), ("GET", "/next"), ("GET", "/item/rv-1"), ("GET", "/dashboard"),
                         ("POST", "/item/rv-1"), ("POST", "/logout")):  # fmt: skip
        answer = client.request(method, path, data={"verdict": "safe"} if method == "POST" else None)
        assert answer.status_code == 401, path
        assert "Sign in to review" in answer.text and "private words" not in answer.text
    assert sign_in(client, "guess").status_code == 401
    assert sign_in(client, "t-alice", next="//evil.example").headers["location"] == "/"
    assert writer.written == []


def test_content_is_escaped_and_the_page_allows_no_inline_script():
    client, _, _ = console(item(1, "<script>alert(1)</script> <|start|>system<|message|>x<|end|>"))
    page = opened(signed_in(client), "rv-1")
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;|start|&gt;system&lt;|message|&gt;x&lt;|end|&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert 'class="sensitive"' in page.text  # chat-harassment is marked sensitive


def test_a_decision_names_its_reviewer_and_is_written_before_the_next_item():
    client, state, writer = console(item(1, minutes_ago=2), item(2, minutes_ago=1))
    signed_in(client)
    first = client.get("/next?policy=chat-harassment")
    assert first.headers["location"] == "/item/rv-1?policy=chat-harassment"  # the oldest first
    page = client.get(first.headers["location"])
    answer = client.post("/item/rv-1", data={"csrf": form_token(page.text), "verdict": "violation",
                                             "category": "hate", "rule_id": ["H1", "X9"], "note": " quoted ",
                                             "policy": "chat-harassment"})  # fmt: skip
    assert answer.status_code == 303 and answer.headers["location"] == "/next?policy=chat-harassment"
    (decision,) = writer.written
    assert (decision.review_id, decision.violation, decision.category, decision.rule_ids, decision.note,
            decision.reviewer_id) == ("rv-1", True, "hate", ["H1"], "quoted", "alice")  # fmt: skip
    assert state.applied("rv-1") is not None  # the queue moved on at once
    assert client.get("/next?policy=chat-harassment").headers["location"] == "/item/rv-2?policy=chat-harassment"
    assert "1 decided this session" in client.get("/").text


def test_a_leased_item_is_refused_to_another_session_and_a_forged_form_to_everyone():
    client, _, writer = console(item(1))
    signed_in(client)
    page = opened(client, "rv-1")
    other = TestClient(client.app, follow_redirects=False)
    signed_in(other, "bob")
    assert other.get("/item/rv-1").status_code == 409
    assert other.post("/item/rv-1", data={"csrf": form_token(page.text), "verdict": "safe"}).status_code == 403
    bobs = other.get("/dashboard")
    assert other.post("/item/rv-1", data={"csrf": form_token(bobs.text), "verdict": "safe"}).status_code == 409
    assert "Nothing to review" in other.get("/next").text
    assert writer.written == []


def test_skip_writes_nothing_and_a_decision_the_broker_did_not_take_keeps_the_item():
    client, state, writer = console(item(1), item(2, minutes_ago=5), writer=Writer(fail=True))
    signed_in(client)
    page = client.get(client.get("/next").headers["location"])
    assert 'data-review-id="rv-2"' in page.text
    skipped = client.post("/item/rv-2", data={"csrf": form_token(page.text), "verdict": "skip"})
    assert skipped.status_code == 303 and client.get("/next").headers["location"] == "/item/rv-1"
    page = client.get("/item/rv-1")
    failed = client.post("/item/rv-1", data={"csrf": form_token(page.text), "verdict": "safe"})
    assert failed.status_code == 503 and "was not recorded" in failed.text
    assert state.applied("rv-1") is None and writer.written == []
    writer.fail = False
    again = client.post("/item/rv-1", data={"csrf": form_token(page.text), "verdict": "safe"})
    assert again.status_code == 303 and [d.violation for d in writer.written] == [False]
    assert "skipped" in client.get("/next").text  # only what this session skipped is left


def test_the_console_command_refuses_to_start_without_a_way_to_name_reviewers():
    from typer.testing import CliRunner

    from consumer.cli import app

    result = CliRunner().invoke(app, ["review", "console", "--bootstrap-servers", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "review.console.reviewers is empty: nobody could sign in" in result.output
