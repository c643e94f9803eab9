"""The review team over real HTTP (the console app on uvicorn, a plain HTTP client; the decision
writer is the test's, the broker's is in tests/integration/test_review_team.py): roles checked
on every route, escalations and comments, a lead's overturn, the appeals queue, the audit trail."""

from __future__ import annotations

import csv
import io
import re

import orjson
import pytest

from consumer.config.console import ConsoleSettings
from consumer.events import ReviewDecision, ReviewNote
from tests.unit.console.test_console import Writer, item
from tests.unit.console.test_console_http import Served

TEAM = [{"id": "mia", "token": "t-mia"}, {"id": "leo", "token": "t-leo", "role": "lead"},
        {"id": "ana", "token": "t-ana", "role": "analyst"}, {"id": "ada", "token": "t-ada", "role": "admin"}]  # fmt: skip


@pytest.fixture
def team():
    made: list[Served] = []

    def make(*items, writer: Writer | None = None) -> Served:
        console = Served(ConsoleSettings(reviewers=TEAM), *items, writer=writer)
        made.append(console)
        for person in ("mia", "leo", "ana", "ada"):
            assert console.sign_in(person, f"t-{person}") == 303
        return console

    yield make
    for one in made:
        one.close()


def csrf(console: Served, jar: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', console.request("GET", "/dashboard", jar=jar)[2]).group(1)


def take(console: Served, jar: str, review_id: str) -> None:
    """Open an item as its page's Open button does (a POST with the form token)."""
    status, headers, _ = console.request("POST", f"/open/{review_id}", form={"csrf": csrf(console, jar)}, jar=jar)
    assert status == 303 and console.app.leases.holder(review_id).reviewer_id == jar


def test_an_analyst_reads_the_dashboard_and_audit_and_can_take_or_decide_nothing(team):
    console = team(item(1))
    token = csrf(console, "ana")
    status, headers, _ = console.request("GET", "/", jar="ana")
    assert status == 303 and headers["location"] == ["/dashboard"]
    for path in ("/dashboard", "/audit", "/audit.csv", "/audit.jsonl"):
        assert console.request("GET", path, jar="ana")[0] == 200, path
    for path in ("/next", "/item/rv-1", "/next?lane=lead"):
        assert console.request("GET", path, jar="ana")[0] == 403, path
    for path, form in (("/item/rv-1", {"verdict": "violation"}), ("/open/rv-1", {}), ("/escalate/rv-1", {"text": "x"}),
                       ("/comment/rv-1", {"text": "x"}), ("/overturn/rv-1", {"verdict": "safe", "note": "x"})):  # fmt: skip
        status, _, page = console.request("POST", path, form={"csrf": token, **form}, jar="ana")
        assert status == 403 and "Not for your role" in page, path
    assert console.writer.written == [] and console.app.leases.live() == 0
    assert console.state.applied("rv-1") is None and console.state.notes("rv-1") == []


def test_a_moderator_decides_but_neither_overturns_nor_reads_the_audit_and_the_lead_and_admin_do_both(team):
    console = team(item(1), item(2))
    for path in ("/audit", "/audit.csv", "/audit.jsonl", "/next?lane=lead"):
        assert console.request("GET", path, jar="mia")[0] == 403, path
        assert console.request("GET", path, jar="leo")[0] in (200, 303), path
        assert console.request("GET", path, jar="ada")[0] in (200, 303), path
    take(console, "mia", "rv-1")
    status, _, _ = console.request("POST", "/item/rv-1", form={"csrf": csrf(console, "mia"), "verdict": "safe"}, jar="mia")
    assert status == 303 and len(console.writer.written) == 1
    status, _, _ = console.request("POST", "/overturn/rv-1", jar="mia",
                                   form={"csrf": csrf(console, "mia"), "verdict": "violation", "note": "no"})  # fmt: skip
    assert status == 403 and len(console.writer.written) == 1
    status, _, page = console.request("GET", "/item/rv-1", jar="mia")
    assert status == 409 and "Decided already" in page  # a moderator sees no overturn form
    status, _, page = console.request("GET", "/item/rv-1", jar="ada")
    assert status == 200 and 'id="overturn"' in page  # an admin may overturn


def test_an_escalated_item_leaves_the_moderators_queue_for_the_lead_queue_with_its_reason_and_comments(team):
    console = team(item(1, minutes_ago=5), item(2))
    take(console, "mia", "rv-1")
    token = csrf(console, "mia")
    assert console.request("POST", "/escalate/rv-1", form={"csrf": token, "text": " "}, jar="mia")[0] == 400
    assert console.request("POST", "/comment/rv-1", form={"csrf": token, "text": "the link is new"}, jar="mia")[0] == 303
    status, headers, _ = console.request("POST", "/escalate/rv-1", jar="mia",
                                         form={"csrf": token, "text": "could be a threat: a lead should decide"})  # fmt: skip
    assert status == 303 and headers["location"] == ["/next"]
    comment, escalation = console.writer.written
    assert isinstance(comment, ReviewNote) and (comment.kind, comment.reviewer_id) == ("comment", "mia")
    assert isinstance(escalation, ReviewNote) and escalation.kind == "escalation"
    # Out of the moderators' queue: the next item for mia is rv-2, and rv-1's page is for leads.
    status, headers, _ = console.request("GET", "/next", jar="mia")
    assert headers["location"] == ["/item/rv-2"]
    assert console.request("GET", "/item/rv-1", jar="mia")[0] == 403
    assert 'id="lead"' not in console.request("GET", "/", jar="mia")[2]
    # In the lead queue, with the reason and the comment shown to the lead who opens it.
    front = console.request("GET", "/", jar="leo")[2]
    assert 'id="lead"' in front and "rv-1" not in re.findall(r'id="queues".*?</table>', front, re.S)[0]
    status, headers, _ = console.request("GET", "/next?lane=lead", jar="leo")
    assert headers["location"] == ["/item/rv-1"]
    page = console.request("GET", "/item/rv-1", jar="leo")[2]
    assert "the link is new" in page and "could be a threat: a lead should decide" in page
    status, headers, _ = console.request("POST", "/item/rv-1", jar="leo",
                                         form={"csrf": csrf(console, "leo"), "verdict": "violation"})  # fmt: skip
    assert status == 303 and headers["location"] == ["/next?lane=lead"]
    decision = console.writer.written[-1]
    assert isinstance(decision, ReviewDecision) and (decision.kind, decision.reviewer_id) == ("decision", "leo")


def test_a_lead_overturns_a_decided_item_with_a_reason_once_against_the_answer_seen(team):
    console = team(item(1))
    take(console, "mia", "rv-1")
    console.request("POST", "/item/rv-1", form={"csrf": csrf(console, "mia"), "verdict": "safe"}, jar="mia")
    page = console.request("GET", "/item/rv-1", jar="leo")[2]
    seen = re.search(r'name="standing" value="([^"]+)"', page).group(1)
    token = csrf(console, "leo")
    for form, status in (({"verdict": "violation", "note": ""}, 400),  # no reason
                         ({"verdict": "safe", "note": "agree"}, 400),  # the answer in force already
                         ({"verdict": "violation", "note": "threat", "standing": "decisions:0:9"}, 409)):  # fmt: skip
        assert console.request("POST", "/overturn/rv-1", form={"csrf": token, "standing": seen, **form},
                               jar="leo")[0] == status  # fmt: skip
    assert len(console.writer.written) == 1
    form = {"csrf": token, "standing": seen, "verdict": "violation", "category": "harassment", "note": "a threat"}
    assert console.request("POST", "/overturn/rv-1", form=form, jar="leo")[0] == 303
    overturn = console.writer.written[-1]
    assert (overturn.kind, overturn.violation, overturn.note, overturn.reviewer_id) == ("overturn", True, "a threat", "leo")
    assert console.state.standing("rv-1").decision == overturn
    stale = {**form, "csrf": csrf(console, "ada"), "verdict": "safe"}  # from a page that showed the first answer
    assert console.request("POST", "/overturn/rv-1", form=stale, jar="ada")[0] == 409
    assert len(console.writer.written) == 2


def test_appeals_have_their_own_queue_with_uphold_and_overturn(team):
    console = team(item(1), item(2, reason="appeal"))
    front = console.request("GET", "/", jar="mia")[2]
    appeals = re.findall(r'id="appeals".*?</table>', front, re.S)[0]
    assert 'data-reason="appeal"' in appeals and 'data-reason="appeal"' not in front.split('id="appeals"')[0]
    take(console, "mia", "rv-2")
    page = console.request("GET", "/item/rv-2", jar="mia")[2]
    # The machine said violation: upholding keeps it, overturning answers safe.
    assert re.search(r'value="violation"[^>]*id="btn-uphold"', page) and re.search(r'value="safe"[^>]*id="btn-overturn"', page)
    assert 'id="btn-violation"' not in page


def test_the_audit_lists_every_action_with_who_when_and_what_the_machine_said(team):
    console = team(item(1), item(2, reason="appeal"), item(3))
    take(console, "mia", "rv-3")
    console.request("POST", "/comment/rv-3", form={"csrf": csrf(console, "mia"), "text": "=cmd|' /C calc'!A0"}, jar="mia")
    console.request("POST", "/escalate/rv-3", form={"csrf": csrf(console, "mia"), "text": "unsure"}, jar="mia")
    take(console, "mia", "rv-1")
    console.request("POST", "/item/rv-1", form={"csrf": csrf(console, "mia"), "verdict": "safe", "note": "joke"}, jar="mia")
    take(console, "mia", "rv-2")
    console.request("POST", "/item/rv-2", form={"csrf": csrf(console, "mia"), "verdict": "safe"}, jar="mia")
    page = console.request("GET", "/item/rv-1", jar="leo")[2]
    seen = re.search(r'name="standing" value="([^"]+)"', page).group(1)
    console.request("POST", "/overturn/rv-1", jar="leo", form={"csrf": csrf(console, "leo"), "standing": seen,
                                                               "verdict": "violation", "note": "a threat"})  # fmt: skip
    status, headers, body = console.request("GET", "/audit.jsonl", jar="ana")
    assert status == 200 and 'filename="review-audit.jsonl"' in headers["content-disposition"][0]
    rows = [orjson.loads(line) for line in body.splitlines()]
    assert [(r["action"], r["reviewer_id"], r["review_id"]) for r in rows] == [
        ("comment", "mia", "rv-3"), ("escalation", "mia", "rv-3"), ("decision", "mia", "rv-1"),
        ("appeal_overturned", "mia", "rv-2"), ("overturn", "leo", "rv-1")]  # fmt: skip
    overturn = rows[-1]
    assert (overturn["machine_violation"], overturn["before_violation"], overturn["violation"]) == (True, False, True)
    assert overturn["note"] == "a threat" and overturn["record"] == "decisions[0]@4"
    status, _, text = console.request("GET", "/audit.csv", jar="ana")
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["action"] for r in table] == [r["action"] for r in rows]
    assert table[0]["note"] == "'=cmd|' /C calc'!A0"  # a spreadsheet shows it, never runs it
    page = console.request("GET", "/audit", jar="ana")[2]
    assert page.count('class="audit-row"') == 5 and 'href="/item/' not in page  # an analyst gets no overturn links


def test_roles_come_from_the_reviewers_list_in_both_identity_modes_and_tokens_mode_needs_every_token(tmp_path):
    from typer.testing import CliRunner

    from consumer.cli import app
    from consumer.console.identity import Identity

    tokens = Identity(ConsoleSettings(reviewers=TEAM))
    assert [tokens.open(n).role for n in ("mia", "leo", "ana", "ada")] == ["moderator", "lead", "analyst", "admin"]
    header = Identity(ConsoleSettings(identity="header", reviewers=[{"id": "leo", "role": "lead"}, {"id": "mia"}]))
    assert header.session({}, ["leo"], "127.0.0.1").role == "lead"  # behind a proxy no token is needed
    assert header.session({}, ["mia"], "127.0.0.1").role == "moderator"
    anyone = Identity(ConsoleSettings(identity="header"))
    assert anyone.session({}, ["zoe"], "127.0.0.1").role == "moderator"  # no list: everyone named moderates
    with pytest.raises(ValueError, match="review.console.reviewers.1.token: required with identity tokens"):
        ConsoleSettings(reviewers=[{"id": "mia", "token": "t"}, {"id": "leo", "role": "lead"}])
    config = tmp_path / "console.yaml"
    config.write_text("review:\n  console:\n    reviewers: [{id: r1, token: t-1, role: boss}]\n")
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)])
    assert result.exit_code == 2 and "review.console.reviewers.0.role" in result.output
