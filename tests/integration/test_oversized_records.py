"""One oversized record never stops the consumer: every output fits its topic (issue 21).

Against the real broker with Kafka's default size settings for the output topics (only the
input topic allows records of up to 3 MB, so that oversized records can arrive at all).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections import Counter

import orjson
import pytest
import yaml

from consumer.events import DeadLetter, Verdict
from tests.kafka_helpers import (
    Collector,
    committed_offsets,
    covered_offsets,
    create_topic,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    produce,
    set_topic_config,
    unique,
    wait_for,
)
from tests.plugins import LongRationaleClassifier
from tests.runner import running_pipeline, settings_for, start_consumer, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

NORMAL = 200  # ordinary events around the oversized ones
OVERSIZED = {  # offset in the input (by production order) -> (value, the output it must become)
    20: (b"{" + b"x" * 900_000, "invalid_json"),  # ~900 KB, not JSON
    60: (event_json(60, "y" * 950_000), "verdict"),  # ~950 KB, a valid event under max_payload_bytes (1 MiB)
    100: (event_json(100, "z" * 1_100_000), "payload_too_large"),  # over pipeline.max_payload_bytes
    140: (os.urandom(2_000_000), "payload_too_large"),  # 2 MB, incompressible
}


def _produce_with_oversized(bootstrap: str, topic: str) -> list[bytes]:
    from confluent_kafka import Producer

    values = [event_json(i) for i in range(NORMAL)]
    for position, (value, _) in sorted(OVERSIZED.items()):
        values.insert(position, value)
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 3_000_000, "linger.ms": 5})
    for value in values:
        producer.produce(topic, value=value, key=b"k%d" % len(value))
    assert producer.flush(60) == 0
    return values


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_oversized_records_each_end_as_exactly_one_output_and_the_consumer_keeps_going(
    kafka, policies_dir, tmp_path, delivery
):
    topic, group = unique(f"oversized-{delivery}"), unique("group")
    create_topic(kafka, topic, config={"max.message.bytes": "3000000"})  # the input allows big records
    create_topics(kafka, f"{topic}.verdicts", f"{topic}.dlq")  # the outputs keep Kafka's defaults
    values = _produce_with_oversized(kafka, topic)
    total = len(values)
    config = write_config(tmp_path / "config.yaml", kafka, group, topic, policies_dir)
    settings = yaml.safe_load(config.read_text())
    settings["pipeline"].update({"delivery": delivery, "transactional_id": f"{group}-tx"})
    config.write_text(yaml.safe_dump(settings))
    log = tmp_path / "consumer.log"
    process = start_consumer(config, log)
    try:
        ends = end_offsets(kafka, topic, 1)
        wait_for(lambda: committed_offsets(kafka, group, topic, 1) == ends or process.poll() is not None,
                 timeout=120, message="commits at the end offsets")  # fmt: skip
        assert process.poll() is None, log.read_text()[-3000:]  # still running after every oversized record
        assert committed_offsets(kafka, group, topic, 1) == ends == {0: total}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=delivery == "exactly_once")
    try:
        outputs.until(total, timeout=60)
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    covered = Counter(covered_offsets(outputs.messages))
    assert sorted(covered) == [(0, o) for o in range(total)]  # 0 lost, records after the big ones processed
    assert set(covered.values()) == {1}  # exactly one output each
    by_offset = {d["source"]["offset"]: d for d in decoded(outputs.messages)}
    for offset, (value, expected) in OVERSIZED.items():
        output = by_offset[offset]
        if expected == "verdict":
            assert Verdict.model_validate(output).truncated is None  # a verdict does not carry the content
            continue
        letter = DeadLetter.model_validate(output)
        assert letter.error.type.value == expected
        cut = letter.original.value_cut
        assert letter.original.truncated and cut is not None
        assert cut.size == len(value) and cut.sha256 == hashlib.sha256(value).hexdigest()
        assert value.startswith(letter.original.value_bytes()) and cut.kept == len(letter.original.value_bytes())
    assert max(len(m.value()) for m in outputs.messages) < 1_000_000  # every output fits the defaults
    # The exit summary counts what the broker acknowledged: here, every output read back.
    summary = re.search(rb"consumed (\d+), verdicts (\d+), dead letters (\d+)", log.read_bytes())
    assert summary, log.read_text()[-2000:]
    kinds = Counter(d["kind"] for d in by_offset.values())
    assert [int(n) for n in summary.groups()] == [total, kinds["verdict"], kinds["dead_letter"]] == [204, 201, 3]


def test_a_verdict_made_too_large_by_a_long_rationale_is_delivered_trimmed_with_the_flag(kafka, policies_dir):
    topic, group = unique("rationale"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, [event_json(0), event_json(1, "please explain at length"), event_json(2)])
    settings = settings_for(kafka, group, topic, policies_dir)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with running_pipeline(settings, LongRationaleClassifier(rationale_bytes=1_500_000)) as running:
            wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 3}, timeout=60, message="commits")
            result = running.stop()
        outputs.until(3, timeout=30)
    finally:
        outputs.close()
    assert (result.exit_code, result.verdicts, result.dead_letters) == (0, 3, 0)
    verdicts = {v.source.offset: v for v in (Verdict.model_validate(d) for d in decoded(outputs.messages))}
    assert sorted(verdicts) == [0, 1, 2]
    trimmed = verdicts[1]
    assert trimmed.truncated is not None and trimmed.truncated.cut == ["rationale"]
    assert trimmed.truncated.original_bytes > 1_500_000 and trimmed.truncated.results_omitted == 0
    assert trimmed.violation and 500_000 < len(trimmed.results[0].rationale) < 1_000_000
    assert verdicts[0].truncated is None and verdicts[2].truncated is None


def test_a_topic_limit_lowered_while_running_is_read_again_and_the_verdict_trimmed_to_it(kafka, policies_dir):
    topic, group = unique("lowered"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, group, topic, policies_dir)
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with running_pipeline(settings, LongRationaleClassifier(rationale_bytes=300_000)) as running:
            produce(kafka, topic, [event_json(0)])
            wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 1}, timeout=60, message="first")
            set_topic_config(kafka, f"{topic}.verdicts", max_message_bytes="100000")  # the budget read is stale
            produce(kafka, topic, [event_json(1, "explain"), event_json(2)])
            wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 3}, timeout=60, message="the rest")
            result = running.stop()
        outputs.until(3, timeout=30)
    finally:
        outputs.close()
    assert (result.exit_code, result.verdicts, result.dead_letters) == (0, 3, 0)
    by_offset = {m.offset(): m for m in outputs.messages}
    trimmed = Verdict.model_validate(orjson.loads(by_offset[1].value()))
    assert trimmed.truncated.cut == ["rationale"] and len(by_offset[1].value()) < 100_000


def test_a_dead_letter_topic_too_small_for_any_dead_letter_is_a_start_up_error(kafka, policies_dir, tmp_path):
    topic, group = unique("tiny-dlq"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts")
    create_topic(kafka, f"{topic}.dlq", config={"max.message.bytes": "3000"})
    produce(kafka, topic, [event_json(0)])
    config = write_config(tmp_path / "config.yaml", kafka, group, topic, policies_dir)
    log = tmp_path / "consumer.log"
    process = start_consumer(config, log)
    assert process.wait(60) == 2
    text = log.read_text()
    assert f"kafka.dead_letter_topic '{topic}.dlq'" in text and "max.message.bytes" in text
    assert "consumed 0" in text
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # nothing read, nothing committed
