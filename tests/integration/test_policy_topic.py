"""Policies on a compacted Kafka topic, with the real broker: every consumer instance follows it live,
a bad record never displaces a good version, and an unreadable topic at start is an outage."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from consumer.classify.keyword import KeywordClassifier
from consumer.cli import app
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import parse_policy
from consumer.policy.topic import TopicPolicyStore
from tests.conftest import REPO
from tests.kafka_helpers import (
    Collector,
    covered_offsets,
    create_topic,
    create_topics,
    decoded,
    event_json,
    http_get,
    produce,
    unique,
    wait_for,
)
from tests.runner import settings_for, start_consumer, write_config

pytestmark = pytest.mark.kafka

GOOD = (REPO / "policies" / "chat-harassment.md").read_text()
# The new version: the same policy, which now also deletes "everyone hates you".
EDITED = GOOD.replace("patterns:\n", "patterns:\n  - 'everyone hates you'\n")
# How long after `policy publish` returns both instances must have switched: the stated delay.
SWITCH_DEADLINE_S = 30


def publish(config: Path, text: str, tmp_path: Path) -> str:
    """`policy publish` of `text` as a file; returns the version it printed."""
    path = tmp_path / f"{unique('policy')}.md"
    path.write_text(text)
    result = CliRunner().invoke(app, ["policy", "publish", str(path), "--config", str(config), "--by", "test"])
    assert result.exit_code == 0, result.output
    return parse_policy(text.encode()).version


def config_file(tmp_path: Path, kafka: str, policy_topic: str) -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": kafka}, "policies": {"topic": policy_topic}}))
    return path


def instance(settings) -> BackgroundPipeline:
    store = TopicPolicyStore(settings.policies.directory, settings.policies.max_tokens)
    return BackgroundPipeline(Pipeline(settings, KeywordClassifier(), store))


def metric(port: int, name: str) -> float | None:
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_two_instances_switch_to_a_version_published_mid_stream_and_lose_nothing(kafka, tmp_path, policies_dir):
    topic, group, policy_topic = unique("pt-switch"), unique("group"), unique("policies")
    create_topics(kafka, topic, partitions=2)
    create_topics(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
    settings = settings_for(kafka, group, topic, policies_dir, policies={"topic": policy_topic})
    config = config_file(tmp_path, kafka, policy_topic)
    file_version = parse_policy(GOOD.encode()).version
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with instance(settings) as first, instance(settings) as second:
            sources = [first.pipeline, second.pipeline]
            wait_for(lambda: all(p.source is not None and len(p.source.assigned) == 1 for p in sources), timeout=90,
                     message="one partition for each instance")  # fmt: skip
            assert {p.policies.get()["chat-harassment"].version for p in sources} == {file_version}

            # 200 events, 100 a partition; the new version is published while they are consumed.
            for partition in (0, 1):
                produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(partition, 200, 2)],
                        partition=partition)  # fmt: skip
            new_version = publish(config, EDITED, tmp_path)
            published = time.monotonic()
            wait_for(lambda: all(p.policies.get()["chat-harassment"].version == new_version for p in sources),
                     timeout=SWITCH_DEADLINE_S, interval=0.05, message="both instances on the new version")  # fmt: skip
            switched_s = time.monotonic() - published
            for partition in (0, 1):
                produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(200 + partition, 400, 2)],
                        partition=partition)  # fmt: skip

            messages = outputs.until(400, timeout=120)
            outputs.collect(wait=1.0)  # anything beyond 400 would be a duplicate
            first_result, second_result = first.stop(), second.stop()
        assert first_result.exit_code == 0 and second_result.exit_code == 0
        assert first_result.consumed > 0 and second_result.consumed > 0

        verdicts = [d for d in decoded(messages) if "results" in d]
        assert len(messages) == 400 and len(verdicts) == 400  # no dead letter
        assert sorted(covered_offsets(messages)) == [(p, o) for p in (0, 1) for o in range(200)]  # each once
        after = [v for v in verdicts if int(v["event_id"][1:]) >= 200]
        assert len(after) == 200 and {v["source"]["partition"] for v in after} == {0, 1}
        assert {r["policy_version"] for v in after for r in v["results"]} == {new_version}
        assert all(v["violation"] and v["action"] == "delete" for v in after)
        before = {r["policy_version"] for v in verdicts if int(v["event_id"][1:]) < 200 for r in v["results"]}
        assert before <= {file_version, new_version}
        print(f"both instances on the new version {switched_s:.2f} s after `policy publish` returned")
    finally:
        outputs.close()


def test_an_invalid_record_on_the_topic_is_counted_and_logged_and_the_last_good_version_serves(
    kafka, tmp_path, policies_dir, caplog
):
    topic, group, policy_topic = unique("pt-bad"), unique("group"), unique("policies")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
    settings = settings_for(kafka, group, topic, policies_dir, policies={"topic": policy_topic})
    good_version = publish(config_file(tmp_path, kafka, policy_topic), EDITED, tmp_path)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    caplog.set_level(logging.ERROR, logger="consumer.policy.topic")
    try:
        with instance(settings) as running:
            pipeline = running.pipeline
            wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/readyz")[0] == 200,
                     timeout=90, message="/readyz ready")  # fmt: skip
            # Read at start, before the first event: the topic's version, not the file's.
            assert pipeline.policies.get()["chat-harassment"].version == good_version

            # Bypassing `policy publish`: a version without its VIOLATES section, and bytes that are not text.
            broken = EDITED.replace("## VIOLATES (1)", "## BROKEN").encode()
            produce(kafka, policy_topic, [broken, b"\xff\xfe"], keys=[b"chat-harassment", b"chat-harassment"])
            port = pipeline.http.port
            wait_for(lambda: metric(port, "safeguard_policy_topic_rejected_total") == 2, timeout=30,
                     message="2 rejected records counted")  # fmt: skip
            exposition = http_get(port, "/metrics")[1]
            check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                                   timeout=30)  # fmt: skip
            assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(20)])
            messages = outputs.until(20, timeout=60)
            result = running.stop()
        assert result.exit_code == 0
        verdicts = decoded(messages)
        assert len(verdicts) == 20
        assert {r["policy_version"] for v in verdicts for r in v["results"]} == {good_version}
        assert all(v["action"] == "delete" for v in verdicts)
        logged = [r.getMessage() for r in caplog.records if r.name == "consumer.policy.topic"]
        assert len(logged) == 2
        assert "missing section `## VIOLATES`" in logged[0] and "not UTF-8" in logged[1]
        assert all(f"{policy_topic}[0]@" in line and "Targeted insults" not in line for line in logged)
    finally:
        outputs.close()


def test_an_unreadable_policy_topic_at_start_is_an_outage_then_intake_begins(kafka, tmp_path, policies_dir):
    topic, group, policy_topic = unique("pt-outage"), unique("group"), unique("policies")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, group, topic, policies_dir, policies={"topic": policy_topic})
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        produce(kafka, topic, [event_json(i) for i in range(10)])
        with instance(settings) as running:
            pipeline = running.pipeline
            wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/readyz")[0] == 503
                     and "policy topic unavailable" in http_get(pipeline.http.port, "/readyz")[1], timeout=60,
                     message="/readyz failing for the policy topic")  # fmt: skip
            assert pipeline.source is None and pipeline.consumed == 0  # no intake while it cannot be read
            assert outputs.collect(wait=1.0) == []

            create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
            wait_for(lambda: http_get(pipeline.http.port, "/readyz")[0] == 200, timeout=60, message="/readyz ready")
            messages = outputs.until(10, timeout=60)
            result = running.stop()
        assert result.exit_code == 0 and result.consumed == 10
        assert len(decoded(messages)) == 10 and all("results" in v for v in decoded(messages))
    finally:
        outputs.close()


def test_a_route_to_a_policy_neither_the_files_nor_the_topic_hold_stops_the_run_with_exit_2(kafka, policies_dir):
    topic, group, policy_topic = unique("pt-route"), unique("group"), unique("policies")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
    settings = settings_for(kafka, group, topic, policies_dir, policies={
        "topic": policy_topic, "routes": [{"where": {"community_id": "kids"}, "policies": ["kids/chat-harassment"]}],
    })  # fmt: skip
    running = instance(settings).start()
    wait_for(lambda: running.result is not None, timeout=60, message="the run to end on its own")
    result = running.result
    assert result.exit_code == 2 and result.consumed == 0
    assert result.reason.endswith(f"unknown policies: kids/chat-harassment (in the files and on policies.topic "
                                  f"{policy_topic})")


def test_run_applies_the_topics_policies_from_its_first_event(kafka, tmp_path, policies_dir):
    """`safeguard-consumer run` as a process: the pre-flight checks the policy topic, and the version
    published before the start classifies the first event already."""
    topic, group, policy_topic = unique("pt-run"), unique("group"), unique("policies")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
    version = publish(config_file(tmp_path, kafka, policy_topic), EDITED, tmp_path)
    config = write_config(tmp_path / "run.yaml", kafka, group, topic, policies_dir)
    data = yaml.safe_load(config.read_text())
    data["policies"]["topic"] = policy_topic
    config.write_text(yaml.safe_dump(data))
    produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(10)])
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    process = start_consumer(config, tmp_path / "run.log")
    try:
        verdicts = decoded(outputs.until(10, timeout=90))
    finally:
        process.terminate()
        process.wait(60)
        outputs.close()
    log = (tmp_path / "run.log").read_text()
    assert process.returncode == 0, log
    assert len(verdicts) == 10, log
    assert {r["policy_version"] for v in verdicts for r in v["results"]} == {version}
    assert f"policy topic {policy_topic} read: 1 records, 1 policies from it in force, 0 rejected" in log


def test_a_candidate_published_on_the_topic_shadows_live_traffic_until_promote_makes_it_live(
    kafka, tmp_path, policies_dir
):
    """The whole way of a policy change on a running consumer: `policy publish` of a shadow
    candidate, its results on the shadow topic only, then `policy promote`, after which the
    verdicts carry the promoted version and the shadow topic gets nothing more."""
    topic, group, policy_topic = unique("pt-promote"), unique("group"), unique("policies")
    shadow_topic = f"{topic}.shadow"
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", shadow_topic)
    create_topic(kafka, policy_topic, 1, {"cleanup.policy": "compact"})
    settings = settings_for(kafka, group, topic, policies_dir, policies={"topic": policy_topic},
                            shadow={"enabled": True, "topic": shadow_topic, "sample_fraction": 1.0})  # fmt: skip
    config = config_file(tmp_path, kafka, policy_topic)
    candidate_text = EDITED.replace("id: chat-harassment\n", "id: chat-harassment-v2\nshadow_of: chat-harassment\n")
    promoted_version = parse_policy(EDITED.encode()).version  # the live record promote writes: the id back
    file_version = parse_policy(GOOD.encode()).version
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    shadows = Collector(kafka, shadow_topic)
    try:
        with instance(settings) as running:
            pipeline = running.pipeline
            publish(config, candidate_text, tmp_path)
            wait_for(lambda: "chat-harassment-v2" in pipeline.policies.get(), timeout=SWITCH_DEADLINE_S,
                     message="the candidate followed from the topic")  # fmt: skip
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(20)])
            before = list(outputs.until(20, timeout=60))  # a copy: the collector keeps appending
            shadows.until(20, timeout=60)

            promote = CliRunner().invoke(app, ["policy", "promote", "chat-harassment-v2", "--config", str(config)])
            assert promote.exit_code == 0, promote.output
            wait_for(lambda: pipeline.policies.get()["chat-harassment"].version == promoted_version
                     and "chat-harassment-v2" not in pipeline.policies.get(),
                     timeout=SWITCH_DEADLINE_S, message="the promoted version live, the candidate gone")  # fmt: skip
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(20, 40)])
            after = outputs.until(40, timeout=60)[20:]
            shadows.collect(wait=1.0)  # a shadow result after the promotion would show here
            result = running.stop()
        assert result.exit_code == 0
    finally:
        outputs.close()
        shadows.close()

    # Before: the live version decided (not a violation), the candidate's answer only on the shadow topic.
    assert [(r["policy_id"], r["policy_version"], r["violation"]) for v in decoded(before) for r in v["results"]] \
        == [("chat-harassment", file_version, False)] * 20  # fmt: skip
    assert len(shadows.messages) == 20  # every shadow result the run wrote, none after the promotion
    candidates = [d["candidate"] for d in decoded(shadows.messages)]
    assert {(c["policy_id"], c["violation"]) for c in candidates} == {("chat-harassment-v2", True)}
    # After: the promoted version decides, and only it.
    assert [(r["policy_id"], r["policy_version"], r["violation"]) for v in decoded(after) for r in v["results"]] \
        == [("chat-harassment", promoted_version, True)] * 20  # fmt: skip
