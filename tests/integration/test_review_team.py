"""A review team against the real broker: the consumer opening reviews and applying what people
do, the console as its command runs it, asked over real HTTP by a moderator, a lead and an
analyst. A lead's overturn and an appeal's overturn each become a corrected verdict whose
`supersedes` names the verdict it replaces; escalations and comments are no decisions; the
audit (`review audit` and the console's download) lists all of it."""

from __future__ import annotations

import csv
import http.cookiejar
import io
import re
import urllib.error
import urllib.parse
import urllib.request

import orjson
import pytest
from typer.testing import CliRunner

from consumer.classify.factory import build_classifier
from consumer.cli import app
from consumer.policy import PolicyStore
from tests.integration.test_review_console import ConsoleProcess, console_config
from tests.integration.test_review_loop import HARD, by_kind, create_all, review_topics
from tests.kafka_helpers import Collector, decoded, produce, unique, wait_for
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka

TEAM = {"mia": "moderator", "leo": "lead", "ana": "analyst"}


class Person:
    """One signed-in browser session, as plain HTTP: a cookie jar and the page's form token."""

    def __init__(self, url: str, name: str):
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        form_token = re.search(r'name="form_token" value="([^"]+)"', self.get("login")[1]).group(1)
        status, page = self.post("login", token=f"token-{name}", form_token=form_token, next="/dashboard")
        assert status == 200, page
        self.csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def get(self, path: str) -> tuple[int, str]:
        return self._open(urllib.request.Request(self.url + path))

    def post(self, path: str, **form: str) -> tuple[int, str]:
        fields = {"csrf": getattr(self, "csrf", ""), **form}
        return self._open(urllib.request.Request(self.url + path, data=urllib.parse.urlencode(fields).encode()))

    def _open(self, request: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=30) as page:  # redirects followed
                return page.status, page.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def test_a_lead_overturn_and_an_appeal_overturn_each_supersede_the_verdict_they_replace_and_the_audit_lists_both(
    kafka, policies_dir, tmp_path
):
    topic, group = unique("team"), unique("group")
    create_all(kafka, topic)
    review = review_topics(topic)
    settings = settings_for(kafka, group, topic, policies_dir, classifier={"kind": "cascade", "reasoner": "none"},
                            review=review)  # fmt: skip
    produce(kafka, topic, [orjson.dumps({"event_id": f"h{i}", "content": text, "author_id": f"u{i}"})
                           for i, text in enumerate(HARD)], keys=[b"general"] * len(HARD))  # fmt: skip
    verdicts = Collector(kafka, f"{topic}.verdicts")
    items = Collector(kafka, review["topic"])
    decisions = Collector(kafka, review["decisions_topic"])
    dead = Collector(kafka, f"{topic}.dlq")
    console = None
    try:
        with running_pipeline(settings, build_classifier(settings, PolicyStore(policies_dir))) as running:
            machine = decoded(verdicts.until(3, timeout=60))
            assert len(machine) == 3 and len(decoded(items.until(3, timeout=30))) == 3
            h2_verdict = next(m for m in verdicts.messages if orjson.loads(m.value())["event_id"] == "h2")
            produce(kafka, review["appeals_topic"], [orjson.dumps({"event_id": "h2", "reason": "it was a quote"})])
            opened = {(i["event"]["event_id"], i["reason"]): i for i in decoded(items.until(4, timeout=60))}
            assert len(opened) == 4
            decided_id = opened[("h0", "undecided")]["review_id"]
            escalated_id = opened[("h1", "undecided")]["review_id"]
            appeal = opened[("h2", "appeal")]
            config = console_config(tmp_path / "console.yaml", kafka, topic, policies_dir,
                                     reviewers=[{"id": n, "token": f"token-{n}", "role": r} for n, r in TEAM.items()])  # fmt: skip
            console = ConsoleProcess(config, tmp_path / "console.log")
            mia, leo, ana = (Person(console.url, name) for name in TEAM)

            # 1. An analyst reads, and nothing they post is written.
            assert ana.get("audit")[0] == 200
            assert ana.post(f"item/{decided_id}", verdict="safe")[0] == 403
            assert ana.post(f"open/{decided_id}")[0] == 403
            assert decisions.collect(0.5) == []

            # 2. A moderator decides one item, comments on and escalates another.
            assert mia.post(f"open/{decided_id}")[0] == 200
            assert mia.post(f"item/{decided_id}", verdict="safe", note="a joke between friends")[0] == 200
            assert mia.post(f"open/{escalated_id}")[0] == 200
            assert mia.post(f"comment/{escalated_id}", text="the second link is new")[0] == 200
            assert mia.post(f"escalate/{escalated_id}", text="could be a threat")[0] == 200
            assert mia.get(f"item/{escalated_id}")[0] == 403  # out of the moderators' queue

            # 3. The appeal: the machine's answer overturned from the appeals queue.
            status, front = mia.get("")
            assert 'id="appeals"' in front and appeal["review_id"] not in front.split('id="appeals"')[0]
            assert mia.post(f"open/{appeal['review_id']}")[0] == 200
            page = mia.get(f"item/{appeal['review_id']}")[1]
            overturned = re.search(r'value="(\w+)"[^>]*id="btn-overturn"', page).group(1)
            assert overturned == ("safe" if appeal["machine"]["violation"] else "violation")
            assert mia.post(f"item/{appeal['review_id']}", verdict=overturned)[0] == 200

            # 4. The lead sees the escalation with its comment, and overturns mia's decision with a reason.
            status, page = leo.post(f"open/{escalated_id}")
            assert status == 200 and "could be a threat" in page and "the second link is new" in page
            page = leo.get(f"item/{decided_id}")[1]
            seen = re.search(r'name="standing" value="([^"]+)"', page).group(1)
            assert leo.post(f"overturn/{decided_id}", verdict="violation", note="a threat in context",
                            standing=seen)[0] == 200  # fmt: skip

            records = decoded(decisions.until(5, timeout=30))
            assert [(r.get("kind", "decision"), r["reviewer_id"]) for r in records] == [
                ("decision", "mia"), ("comment", "mia"), ("escalation", "mia"), ("decision", "mia"), ("overturn", "leo")]  # fmt: skip
            first = decisions.messages[0]
            # By hand, as a script could: an overturn of a review nobody decided is a dead letter.
            produce(kafka, review["decisions_topic"], [orjson.dumps({
                "kind": "overturn", "review_id": escalated_id, "violation": True, "note": "by hand",
                "reviewer_id": "script", "decided_at": "2026-12-01T10:00:00+00:00"})], keys=[escalated_id.encode()])  # fmt: skip

            # 5. Three corrected verdicts (none for the notes), each naming what it replaces.
            wait_for(lambda: len(by_kind(verdicts.collect(), "human")) >= 3, timeout=60,
                     message="three corrected verdicts")  # fmt: skip
            human = by_kind(verdicts.collect(1.0), "human")
            assert len(human) == 3
            decision_v = next(v for v in human if v["event_id"] == "h0" and v["supersedes"]["decided_by"] == "machine")
            overturn_v = next(v for v in human if v["supersedes"]["decided_by"] == "human")
            appeal_v = next(v for v in human if v["event_id"] == "h2")
            assert decision_v["event_id"] == "h0" and decision_v["supersedes"]["decided_by"] == "machine"
            assert decision_v["results"][0]["violation"] is False
            assert overturn_v["event_id"] == "h0" and overturn_v["results"][0]["violation"] is True
            assert overturn_v["results"][0]["rationale"] == "a threat in context"
            assert overturn_v["supersedes"]["decision"] == {"topic": first.topic(), "partition": first.partition(),
                                                           "offset": first.offset(), "timestamp_ms": None}  # fmt: skip
            assert appeal_v["appeal"] == "overturned" and appeal_v["supersedes"]["review_id"] == appeal["review_id"]
            assert appeal_v["supersedes"]["verdict"] == {"topic": h2_verdict.topic(), "partition": h2_verdict.partition(),
                                                        "offset": h2_verdict.offset(), "timestamp_ms": None}  # fmt: skip
            assert appeal_v["results"][0]["violation"] is (overturned == "violation")
            (letter,) = decoded(dead.until(1, timeout=30))  # notes are no decisions: no dead letters for them
            assert letter["error"]["type"] == "conflicting_decision" and "no decision to overturn" in letter["error"]["message"]
            assert len(dead.collect(0.5)) == 1
            assert running.stop().exit_code == 0

        # 6. The audit lists both overturns, from the topics: the command and the console's download.
        out = tmp_path / "audit.jsonl"
        result = CliRunner().invoke(app, ["review", "audit", "--format", "jsonl", "--output", str(out),
                                          "--config", str(config)])  # fmt: skip
        assert result.exit_code == 0, result.output
        rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert [(r["action"], r["reviewer_id"]) for r in rows] == [
            ("decision", "mia"), ("comment", "mia"), ("escalation", "mia"), ("appeal_overturned", "mia"),
            ("overturn", "leo")]  # fmt: skip
        assert rows[-1]["before_violation"] is False and rows[-1]["note"] == "a threat in context"
        status, text = ana.get("audit.csv")
        table = list(csv.DictReader(io.StringIO(text)))
        assert status == 200 and [r["action"] for r in table] == [r["action"] for r in rows]
        assert {r["review_id"] for r in table if r["action"] in ("overturn", "appeal_overturned")} == {
            decided_id, appeal["review_id"]}  # fmt: skip
    finally:
        if console is not None:
            console.stop()
        for collector in (verdicts, items, decisions, dead):
            collector.close()
