"""Shadow candidates on live traffic, against the real broker: a candidate version of a policy
runs beside the live one on a sample of the stream, its results land on the shadow topic only, the
report (`policy shadow report`, a real subprocess) and the consumer's metrics count the same flips
as the test computes from that topic, and the verdicts are the ones a run without the candidate
gives: no shadow result reaches the verdict topic or an action."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import orjson
import pytest

from consumer.classify.keyword import KeywordClassifier
from consumer.config import load_settings
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.pipeline.shadow import sampled
from consumer.policy import PolicyStore
from tests.conftest import REPO
from tests.integration.test_drift_watch import parse, total
from tests.kafka_helpers import Collector, create_topics, event_json, http_get, produce, unique, wait_for
from tests.runner import settings_for, write_config

pytestmark = pytest.mark.kafka

LIVE = (REPO / "policies" / "chat-harassment.md").read_text(encoding="utf-8")
HATE = "  hate: Attacks on people for a protected characteristic\n"
# The candidate flags "loser", no longer flags "nobody wants you here", and lists `hate` first (the
# keyword classifier answers a policy's first category); the rest is the live text.
CANDIDATE = (
    LIVE.replace("id: chat-harassment\n", "id: chat-harassment-v2\nshadow_of: chat-harassment\n")
    .replace("  - '\\bnobody wants you here\\b'\n", "  - '\\bloser\\b'\n")
    .replace(HATE, "")
    .replace("categories:\n", "categories:\n" + HATE)
)
# Four kinds of message, 20 of each: the flip each is, with the category it is counted under.
KINDS = {
    "you are such a loser": ("safe_to_violation", "hate"),  # the candidate's violation
    "nobody wants you here": ("violation_to_safe", "harassment"),  # the live one's
    "kys": ("category_changed", "hate"),  # a violation for both, of another category
    "good game everyone": None,  # safe for both
}
SAMPLE_FRACTION = 0.5


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def verdict_view(verdict: dict) -> tuple:
    """What a verdict decides: the overall answer and action, and each policy's result."""
    return (verdict["violation"], verdict["action"],
            tuple((r["policy_id"], r["policy_version"], r["violation"], r["category"], r["action"])
                  for r in verdict["results"]))  # fmt: skip


def test_shadow_candidate_flips_counted_alike_by_report_metrics_and_topic_and_verdicts_unchanged(kafka, tmp_path):
    topic, group = unique("shadow"), unique("group")
    shadow_topic = f"{topic}.shadow"
    with_candidate, live_only = tmp_path / "with-candidate", tmp_path / "live-only"
    for folder in (with_candidate, live_only):
        folder.mkdir()
        (folder / "chat-harassment.md").write_text(LIVE, encoding="utf-8")
    (with_candidate / "chat-harassment-v2.md").write_text(CANDIDATE, encoding="utf-8")
    shadow = {"enabled": True, "topic": shadow_topic, "sample_fraction": SAMPLE_FRACTION}
    config = write_config(tmp_path / "config.yaml", kafka, group, topic, with_candidate, shadow=shadow)

    # The pre-flight of `run` wants the shadow topic; `topics create` makes it with the others.
    missing = cli("check-config", "--connect", "-q", "--config", str(config))
    assert missing.returncode == 2
    assert f"shadow.topic: topic '{shadow_topic}' does not exist; create it with: safeguard-consumer topics create" \
        in missing.stderr  # fmt: skip
    created = cli("topics", "create", "--config", str(config), "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert f"{shadow_topic} (shadow results): created" in created.stdout

    contents = [content for content in KINDS for _ in range(20)]
    kind_of = {f"e{i}": content for i, content in enumerate(contents)}
    produce(kafka, topic, [event_json(i, content) for i, content in enumerate(contents)],
            keys=[f"k{i}".encode() for i in range(len(contents))])  # fmt: skip

    # The run with the candidate in force.
    settings = load_settings(config)
    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(with_candidate))
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    shadows = Collector(kafka, shadow_topic)
    try:
        with BackgroundPipeline(pipeline) as running:
            messages = outputs.until(80, timeout=90)
            assert len(messages) == 80
            verdicts = [orjson.loads(m.value()) for m in messages]
            assert {m.topic() for m in messages} == {f"{topic}.verdicts"}
            in_sample = {v["event_id"] for v in verdicts
                         if sampled(topic, v["source"]["partition"], v["source"]["offset"], SAMPLE_FRACTION)}
            # One shadow record per sampled event (one candidate): wait for all, then for any extra.
            records = shadows.until(len(in_sample), timeout=60)
            wait_for(lambda: sum(pipeline.shadow.compared.values()) == len(in_sample), timeout=30,
                     message="every sampled event compared")  # fmt: skip
            scraped = parse(http_get(pipeline.http.port, "/metrics")[1])
            running.stop()
        records = shadows.collect(wait=1.0)
    finally:
        outputs.close()
        shadows.close()

    # The sample: about half, the same records any reader computes from the coordinates.
    assert 0 < len(in_sample) < 80
    shadow_records = [orjson.loads(m.value()) for m in records]
    assert len(shadow_records) == len(in_sample)
    assert {r["event_id"] for r in shadow_records} == in_sample
    assert all(m.key() == f"k{r['event_id'][1:]}".encode() for m, r in zip(records, shadow_records))

    # The flips, computed here from the shadow topic, and as the messages' kinds say they must be.
    from_topic: Counter[tuple[str, str]] = Counter()
    for record in shadow_records:
        live, candidate = record["live"], record["candidate"]
        assert (live["policy_id"], candidate["policy_id"], candidate["shadow_of"]) == \
            ("chat-harassment", "chat-harassment-v2", "chat-harassment")  # fmt: skip
        assert record["source"]["topic"] == topic and live["decided_by"] == candidate["decided_by"] == "cheap"
        if live["violation"] != candidate["violation"]:
            direction = "safe_to_violation" if candidate["violation"] else "violation_to_safe"
            from_topic[(direction, (candidate if candidate["violation"] else live)["category"])] += 1
        elif live["violation"] and live["category"] != candidate["category"]:
            from_topic[("category_changed", candidate["category"])] += 1
    expected = Counter(KINDS[kind_of[e]] for e in in_sample if KINDS[kind_of[e]] is not None)
    assert from_topic == expected
    assert len(from_topic) == 3  # every direction flipped

    # The report says the same, from the topic, in a process of its own.
    reported = cli("policy", "shadow", "report", "chat-harassment-v2", "--config", str(config), "--json",
                   "--show-content", "--examples", "2")  # fmt: skip
    assert reported.returncode == 0, reported.stderr
    report = json.loads(reported.stdout)
    assert report["compared"] == len(in_sample)
    assert report["flipped"] == sum(from_topic.values())
    assert {(flip, category): n for flip, counts in report["categories"].items() for category, n in counts.items()} \
        == dict(from_topic)  # fmt: skip
    assert report["flips"] == {direction: n for (direction, _), n in from_topic.items()}
    assert report["stages"]["candidate"]["cheap"] == {"compared": len(in_sample), "flipped": sum(from_topic.values())}
    assert report["stages"]["candidate"]["reasoner"] == {"compared": 0, "flipped": 0}
    assert len(report["examples"]) == 6  # two per direction
    for example in report["examples"]:
        assert example["flip"] == KINDS[example["content"]][0] == KINDS[kind_of[example["event_id"]]][0]

    # The same on the terminal, content shown only when asked.
    text = cli("policy", "shadow", "report", "chat-harassment-v2", "--config", str(config), "--examples", "1")
    assert text.returncode == 0, text.stderr
    assert f"{len(in_sample)} sampled events compared" in text.stdout
    for (direction, category), count in from_topic.items():
        assert re.search(rf"^  {direction} +{count}  \({category} {count}\)$", text.stdout, re.MULTILINE), direction
    assert not any(content in text.stdout for content in KINDS)

    # The consumer's metrics counted the same flips.
    flips = "safeguard_shadow_flips_total"
    for (direction, category), count in from_topic.items():
        assert total(scraped, flips, safeguard_candidate="chat-harassment-v2", safeguard_flip=direction,
                     safeguard_category=category) == count  # fmt: skip
    assert total(scraped, flips) == sum(from_topic.values())
    assert total(scraped, "safeguard_shadow_compared_total", safeguard_candidate="chat-harassment-v2") == len(in_sample)
    assert total(scraped, "safeguard_shadow_skipped_total") == 0

    # No shadow result in a verdict: only the live policy answered, and every verdict and action is
    # the one a run without the candidate gives for the same records.
    assert {r["policy_id"] for v in verdicts for r in v["results"]} == {"chat-harassment"}
    plain_group = unique("plain")
    create_topics(kafka, f"{topic}.plain-verdicts")
    plain = settings_for(kafka, plain_group, topic, live_only,
                         kafka={"verdict_topic": f"{topic}.plain-verdicts"})  # fmt: skip
    plain_outputs = Collector(kafka, f"{topic}.plain-verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(Pipeline(plain, KeywordClassifier(), PolicyStore(live_only))):
            plain_messages = plain_outputs.until(80, timeout=90)
    finally:
        plain_outputs.close()
    plain_verdicts = [orjson.loads(m.value()) for m in plain_messages]
    assert len(plain_verdicts) == 80
    without_candidate = {v["event_id"]: verdict_view(v) for v in plain_verdicts}
    assert {v["event_id"]: verdict_view(v) for v in verdicts} == without_candidate
    assert Counter(v["action"] for v in verdicts) == Counter({"delete": 40, "allow": 40})
    assert {r["category"] for v in verdicts for r in v["results"] if r["violation"]} == {"harassment"}
