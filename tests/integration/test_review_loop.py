"""Human review against the real broker: needs-review results, moderators' decisions back into
the stream, appeals, sampling, and decisions exported as labelled data for `policy eval`."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import orjson
import pytest
from typer.testing import CliRunner

from consumer.classify.factory import build_classifier
from consumer.classify.keyword import KeywordClassifier
from consumer.cli import app
from consumer.policy import PolicyStore
from tests.kafka_helpers import Collector, committed_offsets, create_topics, decoded, produce, unique, wait_for
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka

HARD = ["nice build!", "brb dinner", "gg everyone, well played"]  # the cheap stages cannot decide these


def review_topics(topic: str) -> dict:
    return {"enabled": True, "topic": f"{topic}.reviews", "decisions_topic": f"{topic}.decisions",
            "appeals_topic": f"{topic}.appeals"}  # fmt: skip


def create_all(kafka: str, topic: str) -> None:
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", f"{topic}.reviews", f"{topic}.decisions",
                  f"{topic}.appeals")  # fmt: skip


def decision(review_id: str, violation: bool, **extra) -> bytes:
    return orjson.dumps({"review_id": review_id, "violation": violation, "reviewer_id": "mod-7",
                         "decided_at": datetime.now(timezone.utc).isoformat(), **extra})  # fmt: skip


def by_kind(messages: list, decided_by: str) -> list[dict]:
    return [d for d in decoded(messages) if d.get("decided_by") == decided_by]


def test_undecided_results_await_a_person_whose_decisions_come_back_as_corrected_verdicts(kafka, policies_dir, tmp_path):
    topic, group = unique("review"), unique("group")
    create_all(kafka, topic)
    review = review_topics(topic)
    settings = settings_for(kafka, group, topic, policies_dir, classifier={"kind": "cascade", "reasoner": "none"},
                            review=review)  # fmt: skip
    produce(kafka, topic, [orjson.dumps({"event_id": f"h{i}", "content": text, "author_id": f"u{i}"})
                           for i, text in enumerate(HARD)], keys=[b"general"] * len(HARD))  # fmt: skip
    verdicts = Collector(kafka, f"{topic}.verdicts")
    items = Collector(kafka, review["topic"])
    dead = Collector(kafka, f"{topic}.dlq")
    try:
        with running_pipeline(settings, build_classifier(settings, PolicyStore(policies_dir))) as running:
            # 1. Undecided results hold and await review; their review items are on the review topic.
            machine = decoded(verdicts.until(3, timeout=60))
            assert len(machine) == 3
            for verdict in machine:
                (result,) = verdict["results"]
                assert result["stage"] == "undecided"
                assert result["review"]["status"] == "pending" and result["review"]["reason"] == "undecided"
                assert result["action"] == "hold" and verdict["action"] == "hold"
                assert verdict["violation"] is False  # a guess is not a found violation
                assert verdict["decided_by"] == "machine" and verdict["supersedes"] is None
            review_items = decoded(items.until(3, timeout=30))
            assert len(review_items) == 3
            by_event = {i["event"]["event_id"]: i for i in review_items}
            for verdict in machine:
                item = by_event[verdict["event_id"]]
                assert item["review_id"] == verdict["results"][0]["review"]["review_id"]
                assert item["reason"] == "undecided" and item["policy_id"] == "chat-harassment"
                assert item["source"] == verdict["source"]
                assert item["event"]["author"] == "user-1" and item["author_id"] is not None
                assert item["machine"]["stage"] == "undecided" and item["machine"]["action"] == "hold"
            assert [m.key() for m in items.messages] == [b"general"] * 3  # keyed like the input

            # 2. Decisions: two real ones, a duplicate, a conflicting one, a malformed one, an unknown review.
            nice, brb = by_event["h0"]["review_id"], by_event["h1"]["review_id"]
            posted = [decision(nice, False, note="friendly"), decision(brb, True, category="harassment",
                      rule_ids=["H1"]), decision(nice, False), decision(nice, True), b'{"review_id": ',
                      decision("rv-unknown", True)]  # fmt: skip
            produce(kafka, review["decisions_topic"], posted, keys=[nice.encode(), brb.encode(), nice.encode(),
                    nice.encode(), b"x", b"rv-unknown"])  # fmt: skip
            corrected = by_kind(verdicts.until(5, timeout=60), "human")
            assert len(corrected) == 2
            letters = decoded(dead.until(3, timeout=30))
            assert sorted(d["error"]["type"] for d in letters) == ["conflicting_decision", "invalid_json", "unknown_review"]
            wait_for(lambda: committed_offsets(kafka, f"{group}.review", review["decisions_topic"], 1) == {0: 6},
                     timeout=30, message="the decisions' offsets committed after delivery")  # fmt: skip
            time.sleep(1.0)
            assert len(by_kind(verdicts.collect(), "human")) == 2  # the duplicate changed nothing

            first = next(v for v in corrected if v["event_id"] == "h0")
            original = next(v for v in machine if v["event_id"] == "h0")
            assert first["supersedes"] == {"event_id": "h0", "source": original["source"], "review_id": nice,
                                           "decided_by": "machine", "decision": None, "verdict": None}  # fmt: skip
            assert first["source"] == original["source"] and first["author_id"] == original["author_id"]
            (human,) = first["results"]
            assert human["violation"] is False and human["stage"] == "human" and human["action"] == "allow"
            assert human["review"] == {"status": "decided", "reason": "undecided", "review_id": nice}
            assert human["rationale"] == "friendly"
            second = next(v for v in corrected if v["event_id"] == "h1")
            assert second["violation"] is True and second["results"][0]["rule_ids"] == ["H1"]
            assert second["results"][0]["category"] == "harassment"

            # 3. The same content again is decided per the person's label, not held.
            produce(kafka, topic, [orjson.dumps({"event_id": "again-1", "content": "NICE   build!"}),
                                   orjson.dumps({"event_id": "again-2", "content": "brb dinner"})])  # fmt: skip
            wait_for(lambda: {"again-1", "again-2"} <= {d["event_id"] for d in decoded(verdicts.collect())},
                     timeout=30, message="verdicts of the repeated content")  # fmt: skip
            again = {d["event_id"]: d for d in decoded(verdicts.messages) if d["event_id"].startswith("again")}
            assert again["again-1"]["results"][0]["model"] == "cascade:cache:human"
            assert again["again-1"]["violation"] is False and again["again-1"]["results"][0]["review"] is None
            assert again["again-2"]["violation"] is True and again["again-2"]["action"] != "hold"
            assert running.stop().exit_code == 0

        # 4. After a restart the state comes back from the topics: the label still answers, a
        #    repeated decision is still a duplicate.
        produce(kafka, topic, [orjson.dumps({"event_id": "after-restart", "content": "nice build!"})])
        produce(kafka, review["decisions_topic"], [decision(nice, False)], keys=[nice.encode()])
        with running_pipeline(settings, build_classifier(settings, PolicyStore(policies_dir))) as running:
            wait_for(lambda: "after-restart" in {d["event_id"] for d in decoded(verdicts.collect())}, timeout=60,
                     message="the verdict after the restart")  # fmt: skip
            wait_for(lambda: committed_offsets(kafka, f"{group}.review", review["decisions_topic"], 1) == {0: 7},
                     timeout=30, message="the repeated decision consumed")  # fmt: skip
            after = next(d for d in decoded(verdicts.messages) if d["event_id"] == "after-restart")
            assert after["results"][0]["model"] == "cascade:cache:human" and after["violation"] is False
            assert running.stop().exit_code == 0
        assert len(by_kind(verdicts.collect(1.0), "human")) == 2
        assert len(dead.collect(0.5)) == 3

        # 5. The decisions as labelled data, and `policy eval` on them.
        out = tmp_path / "decisions.jsonl"
        runner = CliRunner()
        env = {"SAFEGUARD_REVIEW__TOPIC": review["topic"], "SAFEGUARD_REVIEW__DECISIONS_TOPIC": review["decisions_topic"]}
        exported = runner.invoke(app, ["review", "export", "--policy", "chat-harassment", "--out", str(out),
                                       "--bootstrap-servers", kafka], env=env)  # fmt: skip
        assert exported.exit_code == 0, exported.output
        rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert sorted((r["content"], r["label"]) for r in rows) == [("brb dinner", 1), ("nice build!", 0)]
        assert {r["reason"] for r in rows} == {"undecided"} and {r["machine_stage"] for r in rows} == {"undecided"}
        report = out.with_suffix(".md")
        evaluated = runner.invoke(app, ["policy", "eval", str(policies_dir / "chat-harassment.md"), "--data", str(out),
                                        "--report", str(report)])  # fmt: skip
        assert evaluated.exit_code == 0, evaluated.output
        assert "on 2 examples" in evaluated.output and report.exists()
    finally:
        for collector in (verdicts, items, dead):
            collector.close()


def test_an_appeal_opens_a_review_and_sampled_results_open_one_at_the_configured_rate(kafka, policies_dir):
    topic, group = unique("appeal"), unique("group")
    create_all(kafka, topic)
    review = review_topics(topic) | {"sample_fraction": 0.25}
    settings = settings_for(kafka, group, topic, policies_dir, review=review)
    produce(kafka, topic, [orjson.dumps({"event_id": f"s{i}", "content": f"ordinary message {i}", "author_id": "u1",
                                         "context": [{"content": "earlier", "author_id": "u2"}]})
                           for i in range(12)], keys=[b"chan"] * 12)  # fmt: skip
    verdicts = Collector(kafka, f"{topic}.verdicts")
    items = Collector(kafka, review["topic"])
    dead = Collector(kafka, f"{topic}.dlq")
    try:
        with running_pipeline(settings, KeywordClassifier()) as running:
            machine = decoded(verdicts.until(12, timeout=60))
            assert len(machine) == 12
            sampled = [v for v in machine if v["results"][0]["review"]]
            assert len(sampled) == 3  # a quarter of 12 decided results, spread evenly
            assert {v["results"][0]["review"]["reason"] for v in sampled} == {"sampled"}
            assert {v["action"] for v in sampled} == {"allow"}  # sampling never changes the decided action
            assert len(decoded(items.until(3, timeout=30))) == 3

            s5 = next(v for v in machine if v["event_id"] == "s5")
            appeals = [
                orjson.dumps({"event_id": "s4", "reason": "I was quoting someone", "appellant_id": 42}),
                orjson.dumps({"source": s5["source"], "reason": "context matters"}),
                orjson.dumps({"event_id": "s4", "reason": "again"}),  # the same review: adds nothing
                orjson.dumps({"event_id": "never-seen", "reason": "?"}),
                orjson.dumps({"reason": "names no event"}),
            ]
            produce(kafka, review["appeals_topic"], appeals)
            appeal_items = [i for i in decoded(items.until(5, timeout=60)) if i["reason"] == "appeal"]
            assert sorted(i["event"]["event_id"] for i in appeal_items) == ["s4", "s5"]
            s4 = next(i for i in appeal_items if i["event"]["event_id"] == "s4")
            assert s4["appeal"] == "I was quoting someone" and s4["event"]["content"] == "ordinary message 4"
            assert [c["author"] for c in s4["event"]["context"]] == ["user-1"] and s4["event"]["author"] == "user-2"
            assert s4["machine"]["violation"] is False and s4["source"]["offset"] == 4
            assert next(m for m in items.messages if orjson.loads(m.value())["reason"] == "appeal").key() == b"chan"
            letters = decoded(dead.until(2, timeout=30))
            assert sorted(d["error"]["type"] for d in letters) == ["appeal_not_found", "schema_violation"]
            wait_for(lambda: committed_offsets(kafka, f"{group}.review", review["appeals_topic"], 1) == {0: 5},
                     timeout=30, message="the appeals' offsets committed")  # fmt: skip
            assert len(items.collect(0.5)) == 5

            # A decision on the appeal yields a corrected verdict for the appealed event.
            produce(kafka, review["decisions_topic"], [decision(s4["review_id"], False)], keys=[s4["review_id"].encode()])
            corrected = by_kind(verdicts.until(13, timeout=30), "human")
            assert [v["event_id"] for v in corrected] == ["s4"]
            assert corrected[0]["results"][0]["review"]["reason"] == "appeal"
            assert running.stop().exit_code == 0
    finally:
        for collector in (verdicts, items, dead):
            collector.close()
