"""Faults against the real broker: a killed process, a slow classifier, a group member leaving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from consumer.classify import KeywordClassifier
from consumer.pipeline import BackgroundPipeline, Pipeline
from consumer.policy import PolicyStore
from consumer.sink import Sink
from tests.conftest import FAULT_FIGURES, REPO
from tests.kafka_helpers import (
    Collector,
    committed_offsets,
    covered_offsets,
    create_topics,
    end_offsets,
    event_json,
    produce,
    unique,
    wait_for,
)
from tests.plugins import SlowClassifier
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka


def _write_config(path: Path, bootstrap: str, group: str, topic: str, policies_dir: Path, **extra: dict) -> Path:
    config = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "input_topics": [topic],
            "verdict_topic": f"{topic}.verdicts",
            "dead_letter_topic": f"{topic}.dlq",
            # A killed member is noticed after the session timeout: keep it at the broker's minimum.
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        },
        "policies": {"directory": str(policies_dir), "default": "chat-harassment"},
        "pipeline": {"commit_interval_s": 0.2, "max_in_flight_events": 200},
        "telemetry": {"http_port": 0},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _start_consumer(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_sigkill_mid_stream_loses_nothing(kafka, policies_dir, tmp_path):
    topic, group, partitions, total = unique("kill"), unique("group"), 3, 3000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 11) for i in range(total)))
    config = _write_config(
        tmp_path / "config.yaml", kafka, group, topic, policies_dir,
        classifier={"kind": "plugin", "factory": "tests.plugins:slow",
                    "options": {"delay_s": 0.02, "max_concurrency": 16}},
    )  # fmt: skip
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    log = tmp_path / "consumer.log"
    try:
        process = _start_consumer(config, log)
        outputs.until(400, timeout=90)
        assert len(outputs.messages) >= 400, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = len(outputs.collect())
        assert killed_at < total, "the consumer finished before it was killed; make it slower"

        process = _start_consumer(config, log)
        ends = end_offsets(kafka, topic, partitions)
        wait_for(lambda: committed_offsets(kafka, group, topic, partitions) == ends, timeout=120,
                 message="commits at the end offsets after the restart")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
        wait_for(lambda: len(set(covered_offsets(outputs.collect()))) >= total, timeout=30, message="all outputs read")
    finally:
        if process.poll() is None:
            process.kill()
        outputs.close()

    covered = Counter(covered_offsets(outputs.messages))
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    assert set(covered) == expected  # every input offset has an output: nothing lost
    duplicates = sum(n - 1 for n in covered.values())
    assert duplicates <= 200 + 16  # at most one in-flight window redone after the kill
    FAULT_FIGURES.append(f"one SIGKILL: {total} events, {killed_at} outputs before it, {duplicates} duplicates, 0 lost")


def test_classifier_slower_than_max_poll_interval_causes_no_rebalance(kafka, policies_dir):
    topic, group = unique("slow"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=2)
    total = 12
    # Keyed, so both partitions get records: an unkeyed batch may all go to one partition,
    # and a partition without records has nothing to commit.
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % i for i in range(total)))
    # Each classification takes longer than max.poll.interval.ms; polling must go on regardless.
    settings = settings_for(
        kafka, group, topic, policies_dir,
        kafka={"consumer": {"max.poll.interval.ms": 6000, "session.timeout.ms": 6000}},
        pipeline={"max_in_flight_events": 4, "classify_timeout_s": 60},
    )  # fmt: skip
    classifier = SlowClassifier(delay_s=7.0, max_concurrency=8)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with running_pipeline(settings, classifier) as running:
            outputs.until(total, timeout=90)
            ends = end_offsets(kafka, topic, 2)
            assert all(ends.values()) and sum(ends.values()) == total
            wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=30, message="all commits")
            rebalances = running.pipeline.source.rebalances
            result = running.stop()
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    assert result.exit_code == 0
    assert rebalances == 1  # the initial assignment only: the slow classifier never cost the membership
    assert classifier.calls == total  # nothing classified twice
    assert classifier.peak <= 4  # the in-flight window, not the classifier's capacity, bounded the work
    assert sorted(covered_offsets(outputs.messages)) == sorted(
        (p, o) for p, end in end_offsets(kafka, topic, 2).items() for o in range(end)
    )


def test_two_consumers_split_partitions_and_stopping_one_hands_over_without_loss(kafka, policies_dir):
    topic, group, partitions = unique("group"), unique("group"), 4
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    first_batch = 400
    produce(kafka, topic, (event_json(i) for i in range(first_batch)), keys=(b"k%d" % i for i in range(first_batch)))
    settings = settings_for(kafka, group, topic, policies_dir)
    outputs = Collector(kafka, f"{topic}.verdicts")
    try:
        with running_pipeline(settings, KeywordClassifier()) as a, running_pipeline(settings, KeywordClassifier()) as b:
            # Each pipeline has a source once it has read its output topics' size budgets.
            wait_for(lambda: len(getattr(a.pipeline, "source", ()) and a.pipeline.source.assigned) == 2
                     and len(getattr(b.pipeline, "source", ()) and b.pipeline.source.assigned) == 2,
                     timeout=60, message="two members with two partitions each")  # fmt: skip
            assert a.pipeline.source.assigned.isdisjoint(b.pipeline.source.assigned)
            outputs.until(first_batch, timeout=60)
            assert b.stop().exit_code == 0
            wait_for(lambda: len(a.pipeline.source.assigned) == partitions, timeout=60,
                     message="the remaining member takes every partition")
            produce(kafka, topic, (event_json(i) for i in range(first_batch, 2 * first_batch)),
                    keys=(b"k%d" % i for i in range(first_batch, 2 * first_batch)))
            outputs.until(2 * first_batch, timeout=60)
            ends = end_offsets(kafka, topic, partitions)
            wait_for(lambda: committed_offsets(kafka, group, topic, partitions) == ends, timeout=30,
                     message="commits at the end offsets")
            assert a.stop().exit_code == 0
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    covered = Counter(covered_offsets(outputs.messages))
    assert set(covered) == {(p, o) for p, end in ends.items() for o in range(end)}
    assert sum(covered.values()) == 2 * first_batch  # a clean handover redoes nothing


def test_fatal_delivery_error_stops_with_exit_1_and_commits_nothing(kafka, policies_dir):
    topic, group = unique("nowhere"), unique("group")
    create_topics(kafka, topic, f"{topic}.dlq")  # the verdict topic does not exist (no auto-create)
    produce(kafka, topic, (event_json(i) for i in range(20)))
    settings = settings_for(
        kafka, group, topic, policies_dir,
        kafka={"producer": {"message.timeout.ms": 3000}},
        pipeline={"delivery_retries": 1},
    )  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: running.result is not None, timeout=60, message="the consumer to stop by itself")
    assert running.result.exit_code == 1
    assert topic + ".verdicts" in running.result.reason
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # OFFSET_INVALID: nothing committed


def test_a_failure_serving_delivery_reports_stops_with_exit_1_and_commits_nothing(kafka, policies_dir):
    """Reports that cannot be handed on would stall every commit: the consumer must stop, not hang."""
    topic, group = unique("unserved"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, (event_json(i) for i in range(20)))
    settings = settings_for(kafka, group, topic, policies_dir)

    def sink_with_a_broken_hand_over(*args, on_delivered, **kwargs) -> Sink:
        def explode(tickets) -> None:
            raise RuntimeError("a bug downstream of the delivery reports")

        return Sink(*args, on_delivered=explode, **kwargs)

    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory),
                        sink_factory=sink_with_a_broken_hand_over)  # fmt: skip
    with BackgroundPipeline(pipeline) as running:
        wait_for(lambda: running.result is not None, timeout=60, message="the consumer to stop by itself")
    assert running.result.exit_code == 1
    assert "serving the producer failed" in running.result.reason
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # OFFSET_INVALID: nothing committed
