"""At-least-once delivery against the real broker: every record ends as one output, then commits."""

from __future__ import annotations

import orjson
import pytest

from consumer.classify.keyword import KeywordClassifier
from tests.kafka_helpers import (
    committed_offsets,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    produce,
    read_all,
    unique,
    wait_for,
)
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka


def test_thousand_events_become_thousand_verdicts_and_commits_reach_the_end(kafka, policies_dir):
    topic, group = unique("chat"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=3)
    produce(kafka, topic, (event_json(i, "kys loser" if i % 10 == 0 else None) for i in range(1000)),
            keys=(f"channel-{i % 7}".encode() for i in range(1000)))
    settings = settings_for(kafka, group, topic, policies_dir)

    with running_pipeline(settings, KeywordClassifier()) as running:
        verdicts = read_all(kafka, f"{topic}.verdicts", expected=1000, timeout=90)
        ends = end_offsets(kafka, topic, 3)
        wait_for(lambda: committed_offsets(kafka, group, topic, 3) == ends, timeout=30, message="commits at end")
        result = running.stop()

    assert result.exit_code == 0
    assert len(verdicts) == 1000
    bodies = decoded(verdicts)
    assert sorted(int(v["event_id"][1:]) for v in bodies) == list(range(1000))
    assert sum(v["violation"] for v in bodies) == 100
    assert {(v["source"]["partition"], v["source"]["offset"]) for v in bodies} == {
        (p, o) for p, end in ends.items() for o in range(end)
    }
    # Verdicts are keyed like their input and name the policy version that decided them.
    assert all(m.key().startswith(b"channel-") for m in verdicts)
    assert {r["policy_id"] for v in bodies for r in v["results"]} == {"chat-harassment"}
    assert all(len(r["policy_version"]) == 16 for v in bodies for r in v["results"])
    assert read_all(kafka, f"{topic}.dlq", expected=0, timeout=1) == []


def test_bad_records_become_dead_letters_with_their_original_bytes(kafka, policies_dir):
    topic, group = unique("mixed"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=1)
    bad = {
        b"{not json": "invalid_json",
        b'{"event_id": "x", "content": "caf\xe9 \xff"}': "invalid_encoding",
        b'{"event_id": "x", "content": 42}': "schema_violation",
        b'{"event_id": "x"}': "schema_violation",
        b'["a", "list"]': "schema_violation",
        orjson.dumps({"event_id": "big", "content": "x" * 5000}): "payload_too_large",
    }
    values = []
    for i in range(60):
        values.append(event_json(i))
        if i % 10 == 0:
            values.extend(bad)
    produce(kafka, topic, values, keys=(b"k%d" % i for i in range(len(values))),
            headers=[("origin", b"\x00\x01binary")])
    settings = settings_for(kafka, group, topic, policies_dir, pipeline={"max_payload_bytes": 4096})

    with running_pipeline(settings, KeywordClassifier()) as running:
        letters = decoded(read_all(kafka, f"{topic}.dlq", expected=6 * len(bad), timeout=60))
        verdicts = read_all(kafka, f"{topic}.verdicts", expected=60, timeout=60)
        wait_for(lambda: committed_offsets(kafka, group, topic, 1)[0] == len(values), timeout=30,
                 message="commit past the bad records")
        result = running.stop()

    assert result.exit_code == 0
    assert len(verdicts) == 60
    assert len(letters) == 6 * len(bad)
    for letter in letters:
        offset = letter["source"]["offset"]
        original = values[offset]
        assert letter["error"]["type"] == bad[original], letter["error"]
        assert letter["error"]["message"]
        import base64

        assert base64.b64decode(letter["original"]["value_b64"]) == original
        assert base64.b64decode(letter["original"]["key_b64"]) == b"k%d" % offset
        assert [(n, base64.b64decode(v)) for n, v in letter["original"]["headers"]] == [("origin", b"\x00\x01binary")]


def test_a_full_producer_queue_holds_outputs_back_in_order_and_loses_none(kafka, policies_dir):
    """librdkafka's local queue capped at 5 messages: most sends meet BufferError and wait in the
    sink's backlog, which the loop produces from as reports come back."""
    topic, group = unique("backlog"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=1)
    produce(kafka, topic, (event_json(i) for i in range(500)))
    settings = settings_for(kafka, group, topic, policies_dir,
                            kafka={"producer": {"queue.buffering.max.messages": 5}})  # fmt: skip

    with running_pipeline(settings, KeywordClassifier()) as running:
        verdicts = read_all(kafka, f"{topic}.verdicts", expected=500, timeout=90)
        wait_for(lambda: committed_offsets(kafka, group, topic, 1) == end_offsets(kafka, topic, 1), timeout=30,
                 message="commits at end")
        held_back = running.pipeline.sink.held_back
        result = running.stop()

    assert result.exit_code == 0
    assert held_back > 0  # the backlog was used
    # One input partition, one output partition: the backlog kept the order of the input.
    assert [v["source"]["offset"] for v in decoded(verdicts)] == list(range(500))
