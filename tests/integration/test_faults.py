"""The fault suite against the real broker: kill the consumer, restart the broker, break the classifier,
slow it past max.poll.interval, hand partitions over, lose the output topic; lose nothing."""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from collections import Counter

import pytest

from consumer.classify.keyword import KeywordClassifier
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from consumer.sinks.kafka import KafkaSink
from consumer.sinks.roles import SinkOptions, SinkWiring
from tests.conftest import FAULT_FIGURES
from tests.kafka_helpers import (
    Collector,
    commits_reach,
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
from tests.runner import running_pipeline, settings_for, start_consumer, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

INTAKE_LIMIT = 300  # pipeline.max_in_flight_events in these runs


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_five_sigkills_during_20k_events_lose_nothing(kafka, policies_dir, tmp_path, delivery):
    topic, group, partitions, total = unique(f"kill5-{delivery}"), unique("group"), 4, 20_000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 97) for i in range(total)))
    config = write_config(
        tmp_path / "config.yaml", kafka, group, topic, policies_dir,
        classifier={"kind": "plugin", "factory": "tests.plugins:slow",
                    "options": {"delay_s": 0.02, "max_concurrency": 64}},
    )  # fmt: skip
    text = config.read_text().replace("max_in_flight_events: 200", f"max_in_flight_events: {INTAKE_LIMIT}")
    text = text.replace("pipeline:\n", f"pipeline:\n  delivery: {delivery}\n  transactional_id: {group}-tx\n")
    config.write_text(text)
    log = tmp_path / "consumer.log"
    rng = random.Random(7)
    kills = 0
    process = start_consumer(config, log)
    try:
        for _ in range(5):
            time.sleep(rng.uniform(3.0, 6.0))  # start-up, group join, then a random point mid-stream
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            kills += 1
            process = start_consumer(config, log)
        ends = end_offsets(kafka, topic, partitions)
        wait_for(lambda: committed_offsets(kafka, group, topic, partitions) == ends, timeout=240,
                 message="commits at the end offsets after five kills")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    read_committed = delivery == "exactly_once"
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=read_committed)
    try:
        wait_for(lambda: len(set(covered_offsets(outputs.collect()))) >= total, timeout=60, message="all outputs")
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    covered = Counter(covered_offsets(outputs.messages))
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    lost = len(expected - set(covered))
    duplicates = sum(n - 1 for n in covered.values())
    FAULT_FIGURES.append(f"{delivery}: {total} events, {kills} SIGKILLs, {duplicates} duplicates, {lost} lost")
    assert lost == 0
    if delivery == "exactly_once":
        assert duplicates == 0  # exactly one committed output per input, as read_committed sees it
    else:
        assert duplicates <= kills * INTAKE_LIMIT  # each kill redoes at most one intake limit


def test_misbehaving_classifier_ends_in_dead_letters_and_never_blocks_its_partition(kafka, policies_dir):
    from consumer.pipeline.background import BackgroundPipeline
    from consumer.pipeline.pipeline import Pipeline
    from consumer.policy import PolicyStore
    from tests.plugins import FlakyClassifier
    from tests.runner import settings_for

    topic, group = unique("flaky"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")  # one partition: a poison record could block it
    kinds = ["raise", "hang", "garbage", "transient"] + ["fine"] * 36  # 10% misbehave for good
    contents = [f"{kinds[i % len(kinds)]} message {i}" for i in range(200)]
    produce(kafka, topic, (event_json(i, c) for i, c in enumerate(contents)))
    settings = settings_for(kafka, group, topic, policies_dir, pipeline={"classify_timeout_s": 1.0})
    classifier = FlakyClassifier()
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(Pipeline(settings, classifier, PolicyStore(settings.policies.directory))) as running:
            outputs.until(200, timeout=120)
            wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 200}, timeout=30, message="commits")
            result = running.stop()
    finally:
        outputs.close()
    assert result.exit_code == 0  # the process stayed up
    from tests.kafka_helpers import decoded

    by_offset = {d["source"]["offset"]: d for d in decoded(outputs.messages)}
    assert sorted(by_offset) == list(range(200))
    for offset, output in by_offset.items():
        kind = contents[offset].split()[0]
        if kind in ("raise", "hang"):
            assert output["kind"] == "dead_letter" and output["error"]["type"] == "classifier_error", output
            assert output["attempts"] == 3  # two retries with backoff, then the dead letter
        elif kind == "garbage":
            assert output["error"]["type"] == "unparseable_output" and "maybe" in output["error"]["raw_output"]
        else:
            assert output["kind"] == "verdict"  # transient failures were retried; the rest flowed past the poison
    assert max(n for rid, n in classifier.attempts.items() if rid.startswith("e3/")) == 2  # e3 is 'transient'
    kinds_seen = sorted(o["error"]["type"] for o in by_offset.values() if o["kind"] == "dead_letter")
    FAULT_FIGURES.append(f"misbehaving classifier (10%): 200 events, {len(kinds_seen)} dead letters "
                         f"({', '.join(f'{t} {kinds_seen.count(t)}' for t in sorted(set(kinds_seen)))}), 0 lost")


def test_broker_restart_mid_stream_loses_nothing(kafka_broker, policies_dir):
    from consumer.classify.keyword import KeywordClassifier
    from tests.runner import running_pipeline, settings_for

    kafka = kafka_broker.bootstrap
    topic, group, total = unique("restart"), unique("group"), 3000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=3)
    produce(kafka, topic, (event_json(i) for i in range(total // 2)))
    settings = settings_for(kafka, group, topic, policies_dir)
    with running_pipeline(settings, KeywordClassifier()) as running:
        outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
        outputs.until(200, timeout=60)
        outputs.close()
        kafka_broker.restart()  # same ports and data; clients reconnect by themselves
        produce(kafka, topic, (event_json(i) for i in range(total // 2, total)))
        ends = end_offsets(kafka, topic, 3)
        wait_for(lambda: commits_reach(kafka, group, topic, ends), timeout=120,  # keyless: a partition may stay empty
                 message="commits at the end after the broker restart")
        result = running.stop()
    assert result.exit_code == 0
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        wait_for(lambda: len(set(covered_offsets(outputs.collect()))) >= total, timeout=60, message="all outputs")
    finally:
        outputs.close()
    assert set(covered_offsets(outputs.messages)) == {(p, o) for p, end in ends.items() for o in range(end)}
    FAULT_FIGURES.append(f"broker restart mid-stream: {total} events, 0 lost")


def _bad_records():
    from hypothesis import strategies as st

    from tests.unit.decode.test_properties import event_like, json_values

    value = (
        st.binary(max_size=200)
        | json_values.map(lambda v: __import__("orjson").dumps(v))
        | event_like.map(lambda v: __import__("orjson").dumps(v))
        | st.just(b"")
        | st.just(b"[" * 3000)
        | st.text(min_size=1).map(lambda t: __import__("orjson").dumps({"content": t * 500}))
    )
    record = st.tuples(
        st.none() | value,  # the value; None is a tombstone
        st.none() | st.binary(max_size=20),  # the key
        st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=3),  # headers
    )
    return st.lists(record, min_size=20, max_size=60)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_property_based_bad_input_ends_as_verdicts_or_dead_letters(kafka, policies_dir):
    from hypothesis import HealthCheck, given, settings

    from consumer.classify.keyword import KeywordClassifier
    from tests.kafka_helpers import decoded
    from tests.runner import running_pipeline, settings_for

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_bad_records())
    def run_once(records):
        topic, group = unique("fuzz"), unique("group")
        create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": kafka})
        for value, key, headers in records:
            producer.produce(topic, value=value, key=key, headers=headers or None)
        assert producer.flush(30) == 0
        producer.close()
        settings_ = settings_for(kafka, group, topic, policies_dir, pipeline={"max_payload_bytes": 20_000})
        outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
        try:
            with running_pipeline(settings_, KeywordClassifier()) as running:
                outputs.until(len(records), timeout=60)
                wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: len(records)}, timeout=30,
                         message="commits")
                result = running.stop()
        finally:
            outputs.close()
        assert result.exit_code == 0
        results = decoded(outputs.messages)
        assert sorted(r["source"]["offset"] for r in results) == list(range(len(records)))
        assert all(r["kind"] == "verdict" or r["error"]["type"] and r["error"]["message"] for r in results)

    run_once()


def test_output_topic_deleted_stops_the_consumer_and_a_restart_completes_the_work(kafka, policies_dir):
    from confluent_kafka.admin import AdminClient

    from consumer.classify.keyword import KeywordClassifier
    from tests.runner import running_pipeline, settings_for

    topic, group = unique("deleted"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, (event_json(i) for i in range(100)))
    settings = settings_for(kafka, group, topic, policies_dir, kafka={"producer": {"message.timeout.ms": 3000}},
                            pipeline={"delivery_retries": 1})
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 100}, timeout=60, message="first commits")
        admin = AdminClient({"bootstrap.servers": kafka})
        admin.delete_topics([f"{topic}.verdicts"])[f"{topic}.verdicts"].result(30)
        time.sleep(2)
        produce(kafka, topic, (event_json(i) for i in range(100, 150)))
        wait_for(lambda: running.result is not None, timeout=90, message="the consumer to stop by itself")
    assert running.result.exit_code == 1
    assert f"{topic}.verdicts" in running.result.reason
    assert committed_offsets(kafka, group, topic, 1) == {0: 100}  # nothing past what was delivered

    create_topics(kafka, f"{topic}.verdicts")  # the topic returns
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: committed_offsets(kafka, group, topic, 1) == {0: 150}, timeout=60, message="the rest")
        assert running.stop().exit_code == 0
    outputs = Collector(kafka, f"{topic}.verdicts")
    try:
        assert {o for _, o in covered_offsets(outputs.until(50, timeout=30))} == set(range(100, 150))
        FAULT_FIGURES.append("output topic deleted: stopped with exit 1 at 100 committed; after the topic "
                             "returned, a restart finished 150 of 150, 0 lost")
    finally:
        outputs.close()


def test_sigkill_mid_stream_loses_nothing(kafka, policies_dir, tmp_path):
    topic, group, partitions, total = unique("kill"), unique("group"), 3, 3000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 11) for i in range(total)))
    config = write_config(
        tmp_path / "config.yaml", kafka, group, topic, policies_dir,
        classifier={"kind": "plugin", "factory": "tests.plugins:slow",
                    "options": {"delay_s": 0.02, "max_concurrency": 16}},
    )  # fmt: skip
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    log = tmp_path / "consumer.log"
    try:
        process = start_consumer(config, log)
        outputs.until(400, timeout=90)
        assert len(outputs.messages) >= 400, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = len(outputs.collect())
        assert killed_at < total, "the consumer finished before it was killed; make it slower"

        process = start_consumer(config, log)
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
            wait_for(lambda: all(p.source is not None and len(p.source.assigned) == 2 for p in (a.pipeline, b.pipeline)),
                     timeout=60, message="two members with two partitions each")
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

    def sink_with_a_broken_hand_over(options: SinkOptions, wiring: SinkWiring) -> KafkaSink:
        def explode(tickets) -> None:
            raise RuntimeError("a bug downstream of the delivery reports")

        return KafkaSink.open(options, dataclasses.replace(wiring, on_delivered=explode))

    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory),
                        sink_factory=sink_with_a_broken_hand_over)  # fmt: skip
    with BackgroundPipeline(pipeline) as running:
        wait_for(lambda: running.result is not None, timeout=60, message="the consumer to stop by itself")
    assert running.result.exit_code == 1
    assert "serving the producer failed" in running.result.reason
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # OFFSET_INVALID: nothing committed
