"""An outage is never a record's fault, against the real broker: a classifier whose dependency
goes down mid-stream (`Unavailable`) holds intake, fails /readyz with the reason, keeps its
records and their offsets, and finishes every one of them once it is back; with
`pipeline.outage_timeout_s` the run stops with exit 1 instead of waiting for ever."""

from __future__ import annotations

import time

import pytest

from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.kafka_helpers import (
    Collector,
    commits_reach,
    committed_offsets,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    http_get,
    produce,
    unique,
    wait_for,
)
from tests.plugins import DeadEngineClassifier, OutageClassifier
from tests.runner import settings_for

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def _metric(port: int, name: str) -> float | None:
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith(name + "{") and 'dependency="reasoner"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_reasoner_outage_mid_stream_dead_letters_nothing_and_every_offset_is_committed_after(kafka, policies_dir):
    topic, group, partitions, total = unique("outage"), unique("group"), 2, 600
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)))
    settings = settings_for(kafka, group, topic, policies_dir, pipeline={"max_in_flight_events": 100})
    classifier = OutageClassifier(down_after=100)  # mid-stream: records in flight, more to read
    pipeline = Pipeline(settings, classifier, PolicyStore(settings.policies.directory))
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(pipeline) as running:
            wait_for(lambda: pipeline.http is not None, timeout=30, message="the HTTP server")
            port = pipeline.http.port
            # The outage begins after 100 answers, which can come before a poll of /readyz sees it
            # ready: wait for the outage's own reason, not for a 200 first.
            wait_for(lambda: "reasoner unavailable" in http_get(port, "/readyz")[1], timeout=60,
                     message="/readyz failing for the outage")  # fmt: skip
            status, reason = http_get(port, "/readyz")
            assert status == 503 and "stand-in fleet" in reason, reason
            assert _metric(port, "safeguard_dependency_up") == 0
            time.sleep(3.0)  # well past the retry hint: the waiting records are retried, and wait again
            held = committed_offsets(kafka, group, topic, partitions)
            during = len(outputs.collect(wait=0.5))
            refused = classifier.refused
            assert refused > 0 and during < total
            classifier.down = False
            outputs.until(total, timeout=120)
            ends = end_offsets(kafka, topic, partitions)
            wait_for(lambda: commits_reach(kafka, group, topic, ends), timeout=60,
                     message="commits at the end offsets after the outage")  # fmt: skip
            wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=30, message="/readyz ready again")
            assert _metric(port, "safeguard_dependency_up") == 1
            assert _metric(port, "safeguard_dependency_outages_total") == 1
            result = running.stop()
    finally:
        outputs.close()
    assert result.exit_code == 0, result.reason
    by_offset = {(d["source"]["partition"], d["source"]["offset"]): d for d in decoded(outputs.messages)}
    assert len(by_offset) == total
    assert [d for d in by_offset.values() if d["kind"] == "dead_letter"] == []  # 0 dead letters from the outage
    assert sum(max(0, offset) for offset in held.values()) < total  # offsets held while the records waited
    assert classifier.answered >= total


def test_an_outage_past_outage_timeout_s_stops_the_run_with_exit_1_and_commits_nothing(kafka, policies_dir):
    topic, group = unique("outage-bound"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, (event_json(i) for i in range(20)))
    settings = settings_for(kafka, group, topic, policies_dir, pipeline={"outage_timeout_s": 1.5})
    classifier = OutageClassifier(down=True)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    started = time.monotonic()
    try:
        with BackgroundPipeline(Pipeline(settings, classifier, PolicyStore(settings.policies.directory))) as running:
            wait_for(lambda: running.result is not None, timeout=60, message="the run to stop on its own")
            result = running.result
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    assert result.exit_code == 1
    assert "reasoner unavailable for more than 1.5 s (pipeline.outage_timeout_s)" in result.reason
    assert time.monotonic() - started < 60
    assert outputs.messages == []  # no dead letter, no verdict
    assert classifier.refused > 0
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # OFFSET_INVALID: nothing committed


def test_an_engine_that_died_stops_the_run_with_exit_1_and_its_records_stay_uncommitted(kafka, policies_dir):
    topic, group, total = unique("dead-engine"), unique("group"), 200
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, (event_json(i) for i in range(total)))
    settings = settings_for(kafka, group, topic, policies_dir, pipeline={"max_in_flight_events": 50})
    classifier = DeadEngineClassifier(dies_after=20)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(Pipeline(settings, classifier, PolicyStore(settings.policies.directory))) as running:
            wait_for(lambda: running.result is not None, timeout=60, message="the run to stop on its own")
            result = running.result
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    assert result.exit_code == 1 and "the vLLM engine core died" in result.reason
    found = decoded(outputs.messages)
    assert [d for d in found if d["kind"] == "dead_letter"] == []  # the dead engine is no record's fault
    (committed,) = committed_offsets(kafka, group, topic, 1).values()
    assert committed <= len(found) < total  # nothing committed past what was delivered; the rest is read again
