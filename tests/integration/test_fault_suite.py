"""The fault suite: kill the consumer, restart the broker, break the classifier; lose nothing."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest

from tests.integration.test_faults import _start_consumer, _write_config
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

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

WINDOW = 300  # pipeline.max_in_flight_events in these runs


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_five_sigkills_during_20k_events_lose_nothing(kafka, policies_dir, tmp_path, delivery):
    topic, group, partitions, total = unique(f"kill5-{delivery}"), unique("group"), 4, 20_000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 97) for i in range(total)))
    config = _write_config(
        tmp_path / "config.yaml", kafka, group, topic, policies_dir,
        classifier={"kind": "plugin", "factory": "tests.plugins:slow",
                    "options": {"delay_s": 0.02, "max_concurrency": 64}},
    )  # fmt: skip
    text = config.read_text().replace("max_in_flight_events: 200", f"max_in_flight_events: {WINDOW}")
    text = text.replace("pipeline:\n", f"pipeline:\n  delivery: {delivery}\n  transactional_id: {group}-tx\n")
    config.write_text(text)
    log = tmp_path / "consumer.log"
    rng = random.Random(7)
    kills = 0
    process = _start_consumer(config, log)
    try:
        for _ in range(5):
            time.sleep(rng.uniform(3.0, 6.0))  # start-up, group join, then a random point mid-stream
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            kills += 1
            process = _start_consumer(config, log)
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
    print(f"\n{delivery}: {total} events, {kills} kills, {duplicates} duplicates, {lost} lost")
    assert lost == 0
    if delivery == "exactly_once":
        assert duplicates == 0  # exactly one committed output per input, as read_committed sees it
    else:
        assert duplicates <= kills * WINDOW  # each kill redoes at most one in-flight window
