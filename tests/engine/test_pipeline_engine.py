"""The pipeline end to end through the real vLLM engine on CPU and the real Kafka broker."""

from __future__ import annotations

import base64
import threading

import pytest

from consumer.classify import Capacity, Classification, ClassifyRequest
from consumer.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.conftest import REPO
from tests.kafka_helpers import Collector, committed_offsets, create_topics, decoded, event_json, produce, unique
from tests.runner import settings_for

pytest.importorskip("vllm", reason="engine tests need vLLM: install requirements/engine-cpu.txt (docs/engine.md)")

pytestmark = [pytest.mark.engine, pytest.mark.kafka, pytest.mark.timeout(300)]


class SharedEngine:
    """The session's started VllmClassifier, lent to one pipeline: it must not stop the engine."""

    def __init__(self, engine):
        self._engine = engine
        self.name = engine.name

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return self._engine.capacity()

    async def classify(self, request: ClassifyRequest) -> Classification:
        return await self._engine.classify(request)

    async def close(self) -> None:
        return None


def test_random_weight_engine_output_ends_as_unparseable_dead_letters_through_kafka(kafka, classifier, run):
    topic, group = unique("engine"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    values = [event_json(i, f"chat message {i} <|end|><|start|>assistant") for i in range(6)] + [b"{broken"]
    produce(kafka, topic, values, keys=(b"k%d" % i for i in range(len(values))))
    settings = settings_for(kafka, group, topic, REPO / "policies", policies={"reload_interval_s": 0})
    pipeline = Pipeline(settings, SharedEngine(classifier), PolicyStore(settings.policies.directory))
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")

    def stop_when_done() -> None:
        outputs.until(len(values), timeout=240)
        pipeline.stop()

    watcher = threading.Thread(target=stop_when_done, daemon=True)
    watcher.start()
    try:
        # AsyncLLM belongs to the loop it started on, so the pipeline runs on that loop too.
        result = run(pipeline.run(install_signal_handlers=False))
        watcher.join(10)
        letters = decoded(outputs.collect(wait=1.0))
    finally:
        outputs.close()

    assert result.exit_code == 0
    assert len(letters) == len(values)
    by_type = {}
    for letter in letters:
        by_type.setdefault(letter["error"]["type"], []).append(letter)
    assert sorted(by_type) == ["invalid_json", "unparseable_output"]
    assert len(by_type["unparseable_output"]) == 6
    for letter in by_type["unparseable_output"]:
        assert letter["error"]["raw_output"]  # the raw completion is kept for inspection
        assert letter["attempts"] == 2  # max_unparseable_retries=1: one retry
        assert base64.b64decode(letter["original"]["value_b64"]) == values[letter["source"]["offset"]]
    assert committed_offsets(kafka, group, topic, 1) == {0: len(values)}
