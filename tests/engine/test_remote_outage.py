"""A served fleet's outage against the real broker: two real `vllm serve` endpoints (the tiny
model on CPU, tests/engine/servers.py) both killed mid-stream for longer than the back-off, then
one restarted. The outage costs time, not records: /readyz fails meanwhile, no record becomes a
`classifier_error` dead letter, every event is classified after, committed offsets reach the end.

The model's weights are random, so every completion ends as an `unparseable_output` dead letter
carrying the raw completion (as in test_remote_engine.py): that outcome proves a completion came
back from a server; a `classifier_error` would be the outage charged to the record.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.classify.factory import build_classifier
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.engine.servers import SERVED_MODEL, VllmServer
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
from tests.runner import settings_for

pytest.importorskip("vllm", reason="engine tests need vLLM: install requirements/engine-cpu.txt (docs/engine.md)")

pytestmark = [pytest.mark.engine, pytest.mark.kafka, pytest.mark.timeout(900)]

BACKOFF_MAX_S = 1.0  # engine.endpoint_backoff_max_s: the outage below lasts far longer


@pytest.fixture
def fleet(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[VllmServer, VllmServer]]:
    a = VllmServer(tiny_model, tmp_path / "a.log", priority_scheduling=False)
    b = VllmServer(tiny_model, tmp_path / "b.log", priority_scheduling=False)
    try:
        a.start(), b.start()
        a.wait_ready(), b.wait_ready()
        yield a, b
    finally:
        a.stop(), b.stop()


def test_a_whole_fleet_down_mid_stream_dead_letters_nothing_for_it_and_resumes_on_one_endpoint(
    fleet, kafka, policies_dir
) -> None:
    a, b = fleet
    topic, group, partitions, first, second = unique("fleet-outage"), unique("group"), 2, 24, 24
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    settings = settings_for(
        kafka, group, topic, policies_dir,
        # The tiny model on shared CPU cores answers in seconds: the backlog the outage leaves (48
        # requests, 4 at a time on the one endpoint back) takes minutes. A deadline passing in that
        # queue would be a classifier_error of its own, not the one this test looks for.
        pipeline={"classify_timeout_s": 900},
        classifier={"kind": "reasoner", "reasoner": "remote"},
        engine={"model": SERVED_MODEL, "max_tokens": 16, "max_unparseable_retries": 0, "metrics_interval_s": 0.5,
                "endpoint_backoff_s": 0.2, "endpoint_backoff_max_s": BACKOFF_MAX_S, "max_attempts": 3,
                "endpoints": [{"url": s.url, "name": n, "max_concurrency": 4} for s, n in ((a, "a"), (b, "b"))]},
    )  # fmt: skip
    policies = PolicyStore(settings.policies.directory)
    pipeline = Pipeline(settings, build_classifier(settings, policies), policies)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    readyz_during: tuple[int, str] | None = None
    try:
        produce(kafka, topic, (event_json(i) for i in range(first)))
        with BackgroundPipeline(pipeline) as running:
            wait_for(lambda: pipeline.http is not None, timeout=60, message="the HTTP server")
            port = pipeline.http.port
            outputs.until(6, timeout=300)  # mid-stream: some answered, the rest in flight or queued
            a.kill(), b.kill()
            produce(kafka, topic, (event_json(i) for i in range(first, first + second)))  # more arrive meanwhile
            wait_for(lambda: http_get(port, "/readyz")[0] == 503, timeout=60, message="/readyz failing")
            readyz_during = http_get(port, "/readyz")
            time.sleep(5 * BACKOFF_MAX_S)  # down for longer than the back-off
            during = decoded(outputs.collect(wait=0.5))
            committed_during = committed_offsets(kafka, group, topic, partitions)
            a.start()
            a.wait_ready()
            outputs.until(first + second, timeout=300)
            ends = end_offsets(kafka, topic, partitions)
            wait_for(lambda: commits_reach(kafka, group, topic, ends), timeout=120,
                     message="commits at the end offsets after the outage")  # fmt: skip
            wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=60, message="/readyz ready again")
            result = running.stop()
    finally:
        outputs.close()
    assert result.exit_code == 0, result.reason
    assert readyz_during is not None and "reasoner unavailable" in readyz_during[1], readyz_during
    assert len(during) < first + second and sum(max(0, offset) for offset in committed_during.values()) < first + second
    outcomes = decoded(outputs.messages)
    by_offset = Counter((o["source"]["partition"], o["source"]["offset"]) for o in outcomes)
    assert len(by_offset) == first + second  # every event has its output
    errors = Counter(o["error"]["type"] for o in outcomes if o["kind"] == "dead_letter")
    # Random weights: every completion is unparseable; not one record was charged with the outage.
    charged = [o["error"]["message"] for o in outcomes
               if o["kind"] == "dead_letter" and o["error"]["type"] != "unparseable_output"]  # fmt: skip
    assert errors.get("classifier_error", 0) == 0, (errors, charged)
    assert errors["unparseable_output"] == len(outcomes), errors
