"""A second destination against the real broker: verdicts and dead letters go to the Kafka topics
and to a file at once (`sinks.files`, through the fan-out sink), and an offset is committed only
when both have the record's output."""

from __future__ import annotations

import time

import orjson
import pytest

from consumer.classify.factory import build_classifier
from consumer.classify.keyword import KeywordClassifier
from consumer.policy import PolicyStore
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

HARD = ["nice build!", "brb dinner", "gg everyone, well played"]  # the cheap stages cannot decide these

EVENTS, BAD = 40, 2
NOTHING_COMMITTED = -1001  # librdkafka's OFFSET_INVALID: the group has no committed offset


def file_outputs(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def source_offsets(outputs: list[dict]) -> list[tuple[int, int]]:
    """(partition, offset) of the input record each output is for (verdicts and dead letters name it differently)."""
    return sorted((o["source"]["partition"], o["source"]["offset"]) if "source" in o
                  else (o["partition"], o["offset"]) for o in outputs)  # fmt: skip


def test_a_held_back_file_holds_back_the_commit_and_then_both_have_every_output(kafka, policies_dir, tmp_path):
    topic, group = unique("fanout"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=2)
    values = [event_json(i, "kys loser" if i % 4 == 0 else None) for i in range(EVENTS)] + [b"{not json"] * BAD
    produce(kafka, topic, values, keys=(b"k%d" % i for i in range(len(values))))
    path = tmp_path / "outputs.jsonl"
    # The file syncs only when the pipeline flushes it at shutdown: until then it has delivered nothing.
    settings = settings_for(
        kafka, group, topic, policies_dir, pipeline={"shutdown_deadline_s": 2},
        sinks={"files": [{"path": str(path), "sync_interval_s": 3600}]},
    )  # fmt: skip

    with running_pipeline(settings, KeywordClassifier()) as running:
        verdicts = read_all(kafka, f"{topic}.verdicts", expected=EVENTS, timeout=60)
        letters = read_all(kafka, f"{topic}.dlq", expected=BAD, timeout=30)
        time.sleep(1.0)  # five commit intervals: the Kafka deliveries alone must commit nothing
        held = committed_offsets(kafka, group, topic, 2)
        result = running.stop()

    assert (len(verdicts), len(letters)) == (EVENTS, BAD)  # Kafka had every output...
    assert held == {0: NOTHING_COMMITTED, 1: NOTHING_COMMITTED}  # ...and nothing was committed past the file
    ends = end_offsets(kafka, topic, 2)
    assert sum(ends.values()) == EVENTS + BAD
    # The shutdown flush synced the file; then the commit reached the end of every partition.
    assert committed_offsets(kafka, group, topic, 2) == ends
    assert result.exit_code == 0
    assert (result.verdicts, result.dead_letters) == (EVENTS, BAD)
    outputs = file_outputs(path)
    every_record = sorted((p, o) for p, end in ends.items() for o in range(end))
    assert source_offsets(outputs) == every_record  # one output a record, in the file...
    assert source_offsets(decoded(verdicts) + decoded(letters)) == every_record  # ...and on the topics
    assert sum(o.get("violation", False) for o in outputs) == EVENTS // 4


def test_with_the_file_syncing_as_it_goes_commits_reach_the_end_while_running(kafka, policies_dir, tmp_path):
    topic, group = unique("fanout"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=2)
    produce(kafka, topic, (event_json(i) for i in range(EVENTS)), keys=(b"k%d" % i for i in range(EVENTS)))
    path = tmp_path / "verdicts.jsonl"
    settings = settings_for(kafka, group, topic, policies_dir,
                            sinks={"files": [{"path": str(path), "outputs": ["verdict"]}]})  # fmt: skip

    with running_pipeline(settings, KeywordClassifier()) as running:
        ends = end_offsets(kafka, topic, 2)
        wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=60, message="commits at end")
        in_file = file_outputs(path)  # committed, so synced: all of it is in the file already
        result = running.stop()

    assert result.exit_code == 0
    assert len(in_file) == EVENTS
    assert len(read_all(kafka, f"{topic}.verdicts", expected=EVENTS, timeout=30)) == EVENTS


def test_review_items_reach_the_review_topic_and_a_file_before_their_records_commit(kafka, policies_dir, tmp_path):
    topic, group = unique("fanout"), unique("group")
    reviews = f"{topic}.reviews"
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", reviews, f"{topic}.decisions", partitions=1)
    produce(kafka, topic, [orjson.dumps({"event_id": f"h{i}", "content": text}) for i, text in enumerate(HARD)])
    path = tmp_path / "reviews.jsonl"
    settings = settings_for(
        kafka, group, topic, policies_dir, classifier={"kind": "cascade", "reasoner": "none"},
        review={"enabled": True, "topic": reviews, "decisions_topic": f"{topic}.decisions"},
        sinks={"files": [{"path": str(path), "outputs": ["review_item"]}]},
    )  # fmt: skip

    with running_pipeline(settings, build_classifier(settings, PolicyStore(policies_dir))) as running:
        wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: len(HARD)}, timeout=60,
                 message="commits at end")  # fmt: skip
        in_file = file_outputs(path)  # committed, so every review item of those records is synced
        result = running.stop()

    assert result.exit_code == 0
    on_topic = decoded(read_all(kafka, reviews, expected=len(HARD), timeout=30))
    assert len(on_topic) == len(in_file) == len(HARD)
    assert sorted(i["review_id"] for i in in_file) == sorted(i["review_id"] for i in on_topic)
    assert len(read_all(kafka, f"{topic}.verdicts", expected=len(HARD), timeout=30)) == len(HARD)  # on the topic only
