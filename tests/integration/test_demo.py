"""The README's first command: the demo runs end to end on CPU and reports every record."""

import io

import orjson
import pytest
from rich.console import Console

from consumer.demo import MALFORMED, default_policies_dir, run_demo, sample_events

pytestmark = pytest.mark.kafka


def test_demo_classifies_every_sample_and_dead_letters_the_malformed_ones():
    output = io.StringIO()
    summary = run_demo(default_policies_dir(), Console(file=output, width=120), timeout_s=180)
    events = sample_events()
    contents = {e["event_id"]: e["content"] for e in events}
    assert summary.produced == len(events) + len(MALFORMED)
    assert summary.verdicts == len(events)
    assert summary.dead_letters == {"invalid_json": 1, "schema_violation": 1, "invalid_encoding": 1}
    # Chat goes to the harassment and spam policies, reviews to the fake-review and spam policies.
    reviews = sum(1 for e in events if e["content_type"] == "review")
    per_policy = {p: sum(n for (policy, _), n in summary.by_policy.items() if policy == p) for p in
                  ("chat-harassment", "spam-scams", "fake-reviews")}  # fmt: skip
    assert per_policy == {"chat-harassment": len(events) - reviews, "spam-scams": len(events), "fake-reviews": reviews}
    # The cheap stages, trained on the policies' examples, find the obvious cases.
    assert summary.by_policy[("chat-harassment", "violation")] > 0
    assert summary.by_policy[("spam-scams", "violation")] > 0
    lines = summary.verdicts_file.read_bytes().splitlines()
    assert len(lines) == summary.produced
    text = output.getvalue()
    assert "engine: the cascade's cheap stages on CPU" in text and "much weaker than gpt-oss-safeguard" in text
    assert "stopped the local Kafka broker" in text
    # Results the cheap stages cannot decide await a person: held, not shown as violations.
    outputs = [orjson.loads(line) for line in lines]
    nice = next(o for o in outputs if o.get("event_id") and contents.get(o["event_id"]) == "nice build!")
    assert nice["action"] == "hold" and nice["violation"] is False
    assert {r["review"]["status"] for r in nice["results"]} == {"pending"}
    assert summary.awaiting_review and summary.review_items == sum(summary.awaiting_review.values())
    assert f"{summary.review_items} results await a person's review" in " ".join(text.split())
    assert "review pending" in text
