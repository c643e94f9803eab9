"""The README's first command: the demo runs end to end on CPU and reports every record."""

import io

import pytest
from rich.console import Console

from consumer.demo import MALFORMED, default_policies_dir, run_demo, sample_events

pytestmark = pytest.mark.kafka


def test_demo_classifies_every_sample_and_dead_letters_the_malformed_ones():
    output = io.StringIO()
    summary = run_demo(default_policies_dir(), Console(file=output, width=120), timeout_s=180)
    events = sample_events()
    assert summary.produced == len(events) + len(MALFORMED)
    assert summary.verdicts == len(events)
    assert summary.dead_letters == {"invalid_json": 1, "schema_violation": 1, "invalid_encoding": 1}
    # Chat goes to both policies, reviews to the spam policy only.
    chat = sum(1 for e in events if e["content_type"] != "review")
    assert sum(n for (policy, _), n in summary.by_policy.items() if policy == "chat-harassment") == chat
    assert sum(n for (policy, _), n in summary.by_policy.items() if policy == "spam-scams") == len(events)
    assert summary.by_policy[("chat-harassment", "harassment")] > 0
    assert summary.by_policy[("spam-scams", "scam")] > 0
    lines = summary.verdicts_file.read_bytes().splitlines()
    assert len(lines) == summary.produced
    text = output.getvalue()
    assert "engine: keyword patterns" in text and "stopped the local Kafka broker" in text
