"""The cascade end to end: a real broker, the pipeline, cheap stages, and the real vLLM engine
(the tiny random-weight model) as the reasoner.

The tiny model answers random tokens, so whatever reaches it ends as an `unparseable_output`
dead letter: that is how this test tells escalated events from the ones the cascade decided.
"""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("vllm", reason="engine tests need vLLM: install requirements/engine-cpu.txt (docs/engine.md)")
pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify.cascade import CascadeSettings, make_cascade  # noqa: E402
from consumer.pipeline.pipeline import Pipeline  # noqa: E402
from consumer.policy import PolicyStore  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.engine.shared import SharedEngine, run_until_outputs  # noqa: E402
from tests.kafka_helpers import (  # noqa: E402
    committed_offsets,
    create_topics,
    event_json,
    produce,
    unique,
)
from tests.runner import settings_for  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.kafka, pytest.mark.timeout(300)]

# Decided by the lexical stage trained on policies/chat-harassment.examples.jsonl (calibrated
# confidence >= 0.95), each sent twice: the second copy is answered by the cache.
CLEAR = [
    "go kill yourself you worthless idiot",
    "you're a waste of oxygen",
    "welcome to the server! read the rules in #info",
]
# Below the target precision: escalated to the engine.
UNCLEAR = ["the weather is nice today", "is the tournament on saturday or sunday?", "the weather is nice today"]


def test_cheap_stages_decide_clear_events_and_escalate_the_rest_to_the_engine(kafka, classifier, run):
    topic, group = unique("cascade"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    contents = CLEAR + CLEAR + UNCLEAR
    values = [event_json(i, text) for i, text in enumerate(contents)] + [b"{broken"]
    produce(kafka, topic, values, keys=(b"k%d" % i for i in range(len(values))))
    settings = settings_for(kafka, group, topic, REPO / "policies", policies={"reload_interval_s": 0})
    store = PolicyStore(settings.policies.directory)
    cascade = make_cascade(CascadeSettings(shadow_fraction=0), SharedEngine(classifier), store)
    pipeline = Pipeline(settings, cascade, store)
    result, records = run_until_outputs(run, pipeline, kafka, [f"{topic}.verdicts", f"{topic}.dlq"], len(values))

    assert result.exit_code == 0
    assert len(records) == len(values)
    verdicts = [r for r in records if r["kind"] == "verdict"]
    letters = [r for r in records if r["kind"] == "dead_letter"]
    by_content = {contents[v["source"]["offset"]]: v for v in verdicts}
    assert sorted(by_content) == sorted(CLEAR)
    assert Counter(v["results"][0]["model"] for v in verdicts) == {"cascade:lexical": 3, "cascade:cache": 3}
    assert by_content[CLEAR[0]]["violation"] is True and by_content[CLEAR[2]]["violation"] is False
    for verdict in verdicts:
        assert float(verdict["results"][0]["confidence"]) >= 0.95
    assert Counter(letter["error"]["type"] for letter in letters) == {"unparseable_output": 3, "invalid_json": 1}
    escalated = [letter["source"]["offset"] for letter in letters if letter["error"]["type"] == "unparseable_output"]
    assert sorted(escalated) == [6, 7, 8]
    counters = cascade.counters["chat-harassment"]
    assert counters.decided["lexical"] == 3 and counters.decided["reasoner"] == 0
    assert counters.escalations >= 2  # the repeated unclear message may share the first one's request
    assert committed_offsets(kafka, group, topic, 1) == {0: len(values)}
