"""Exactly-once with human review against the real broker: a record's verdict, its review items and
its offset commit in one transaction, and the review loop commits each decision's corrected verdict
with the decision's offset; `read_committed` readers see one of each, across SIGKILLs.

Review ids are derived from the record's coordinates, the policy and the reason, so a review item
written twice is visible as a repeated id, and a corrected verdict written twice as a repeated
`supersedes.review_id`."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import orjson
import pytest
import yaml
from confluent_kafka import Producer

from tests.conftest import FAULT_FIGURES
from tests.kafka_helpers import (
    Collector,
    committed_offsets,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    produce,
    unique,
    wait_for,
)
from tests.runner import start_consumer, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

INTAKE_LIMIT = 300  # pipeline.max_in_flight_events, as in the fault suite


def create_all(kafka: str, topic: str, partitions: int) -> None:
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", f"{topic}.reviews", partitions=partitions)
    create_topics(kafka, f"{topic}.decisions", f"{topic}.appeals", partitions=1)


def exactly_once_config(tmp_path, name: str, kafka: str, group: str, topic: str, policies_dir,
                        classifier: dict, sample_fraction: float, **pipeline: object):  # fmt: skip
    """`run`'s config: exactly_once, review on, a `sample_fraction` of results sampled for review."""
    config = write_config(tmp_path / f"{name}.yaml", kafka, group, topic, policies_dir, classifier=classifier)
    settings = yaml.safe_load(config.read_text())
    settings["pipeline"].update({"delivery": "exactly_once", "transactional_id": f"{group}-tx", **pipeline})
    settings["review"] = {"enabled": True, "topic": f"{topic}.reviews", "decisions_topic": f"{topic}.decisions",
                          "appeals_topic": f"{topic}.appeals", "when": ["sampled"],
                          "sample_fraction": sample_fraction}  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    return config


def machine_and_human(messages: list) -> tuple[list[dict], list[dict]]:
    """Verdicts and dead letters of the data path, and the review loop's corrected verdicts."""
    documents = decoded(messages)
    return ([d for d in documents if d.get("decided_by") != "human"],
            [d for d in documents if d.get("decided_by") == "human"])  # fmt: skip


def sources(documents: list[dict]) -> list[tuple[int, int]]:
    """(partition, offset) of the input record behind each output document."""
    return [(d["source"]["partition"], d["source"]["offset"]) for d in documents]


def pending_reviews(outputs: list[dict]) -> Counter:
    """review_id -> how many of the data path's outputs name it as pending."""
    return Counter(result["review"]["review_id"] for verdict in outputs for result in verdict.get("results", ())
                   if (result.get("review") or {}).get("status") == "pending")  # fmt: skip


class Reviewer(threading.Thread):
    """A moderator who decides every review item a `read_committed` reader sees, once each."""

    def __init__(self, kafka: str, topic: str):
        super().__init__(name="reviewer", daemon=True)
        self._kafka, self._topic = kafka, topic
        self._decided: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._read = 0  # items handled so far

    def run(self) -> None:
        items = Collector(self._kafka, f"{self._topic}.reviews", read_committed=True)
        producer = Producer({"bootstrap.servers": self._kafka, "enable.idempotence": True})
        try:
            while not self.stopping.is_set():
                messages = items.collect(wait=0.5)
                fresh, self._read = messages[self._read:], len(messages)
                for item in decoded(fresh):
                    review_id = item["review_id"]
                    producer.produce(f"{self._topic}.decisions", key=review_id.encode(), value=orjson.dumps(
                        {"review_id": review_id, "violation": True, "reviewer_id": "mod-1",
                         "decided_at": datetime.now(timezone.utc).isoformat()}))  # fmt: skip
                    with self._lock:
                        self._decided.add(review_id)
                assert producer.flush(30) == 0
        finally:
            items.close()

    @property
    def decided(self) -> set[str]:
        """The review ids decided so far (a copy: the thread goes on adding)."""
        with self._lock:
            return set(self._decided)


def test_a_review_item_is_never_visible_without_its_verdict(kafka, policies_dir, tmp_path):
    """A process stalls with a transaction open whose verdicts and review items are on the broker,
    and is SIGKILLed there: read_committed sees none of them, then exactly one verdict per input and
    exactly the review items those verdicts name, none without its verdict."""
    topic, group, total = unique("eosreview"), unique("group"), 500
    create_all(kafka, topic, partitions=2)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 13) for i in range(total)))
    marker = tmp_path / "transaction-open"
    stalling = exactly_once_config(tmp_path, "stalling", kafka, group, topic, policies_dir, sample_fraction=0.5,
                                   classifier={"kind": "plugin", "factory": "tests.plugins:stall_in_transaction",
                                               "options": {"marker": str(marker), "kind": "review_item"}},
                                   transaction_max_records=100)  # fmt: skip
    normal = exactly_once_config(tmp_path, "normal", kafka, group, topic, policies_dir, sample_fraction=0.5,
                                 classifier={"kind": "keyword"}, transaction_max_records=100)  # fmt: skip
    log = tmp_path / "consumer.log"

    process = start_consumer(stalling, log)
    try:
        wait_for(marker.exists, timeout=120, message="a transaction with written outputs, open")
        # The stalled transaction is the first with review items: a read_uncommitted reader sees its items.
        written = Collector(kafka, f"{topic}.reviews")
        committed = Collector(kafka, f"{topic}.verdicts", f"{topic}.reviews", read_committed=True)
        try:
            written.until(1, timeout=30)
            written.collect(wait=1.0)
            committed.collect(wait=2.0)
        finally:
            written.close()
            committed.close()
        in_open_transaction = {item["review_id"] for item in decoded(written.messages)}
        assert in_open_transaction, log.read_text()[-3000:]  # review items written, not committed
        visible = decoded(committed.messages)
        assert not in_open_transaction & {d["review_id"] for d in visible if "review_id" in d}
        assert not in_open_transaction & set(pending_reviews(visible))  # nor the verdicts that name them
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        process = start_consumer(normal, log)  # same transactional ids: fences the dead one, aborts its transaction
        ends = end_offsets(kafka, topic, 2)
        wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=120, message="commits at the end")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=True)
    items = Collector(kafka, f"{topic}.reviews", read_committed=True)
    everything = Collector(kafka, f"{topic}.reviews")
    try:
        outputs.until(total, timeout=60)
        outputs.collect(wait=1.0)
        items.collect(wait=2.0)
        everything.collect(wait=2.0)
    finally:
        for collector in (outputs, items, everything):
            collector.close()
    seen = Counter(sources(decoded(outputs.messages)))
    assert sorted(seen) == sorted((p, o) for p, end in ends.items() for o in range(end))  # 0 lost
    assert set(seen.values()) == {1}  # one verdict per input
    pending = pending_reviews(decoded(outputs.messages))
    committed_items = Counter(item["review_id"] for item in decoded(items.messages))
    assert set(pending.values()) == {1} and set(committed_items.values()) == {1}  # no id twice
    assert committed_items == pending  # every item with its verdict, every pending verdict with its item
    assert 100 <= len(committed_items) <= 400  # half the results sampled, spread evenly
    # The dead process's items were on the broker and were aborted with its transaction.
    assert len(everything.messages) >= len(committed_items) + len(in_open_transaction)


def test_a_decision_killed_in_its_transaction_yields_one_corrected_verdict(kafka, policies_dir, tmp_path):
    """The review loop stalls with corrected verdicts written and decision offsets sent in an open
    transaction, and is SIGKILLed there: read_committed sees none of those corrected verdicts; after
    the restart the decisions are applied again and exactly one corrected verdict per decision shows."""
    topic, group, total = unique("eosdecide"), unique("group"), 40
    create_all(kafka, topic, partitions=2)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 5) for i in range(total)))
    marker = tmp_path / "transaction-open"
    stalling = exactly_once_config(tmp_path, "stalling", kafka, group, topic, policies_dir, sample_fraction=0.5,
                                   classifier={"kind": "plugin", "factory": "tests.plugins:stall_in_review_transaction",
                                               "options": {"marker": str(marker)}})  # fmt: skip
    normal = exactly_once_config(tmp_path, "normal", kafka, group, topic, policies_dir, sample_fraction=0.5,
                                 classifier={"kind": "keyword"})  # fmt: skip
    log = tmp_path / "consumer.log"
    reviewer = Reviewer(kafka, topic)
    process = start_consumer(stalling, log)
    try:
        ends = end_offsets(kafka, topic, 2)
        wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=120, message="every verdict")
        reviewer.start()  # decides the 20 review items
        wait_for(marker.exists, timeout=120, message="a review transaction with corrected verdicts, open")
        written = Collector(kafka, f"{topic}.verdicts")  # read_uncommitted: sees the open transaction
        committed = Collector(kafka, f"{topic}.verdicts", read_committed=True)
        try:
            written.until(total + 1, timeout=30)
            written.collect(wait=1.0)
            committed.until(total, timeout=30)
            committed.collect(wait=2.0)
        finally:
            written.close()
            committed.close()
        in_open_transaction = len(machine_and_human(written.messages)[1])
        assert in_open_transaction > 0, log.read_text()[-3000:]  # corrected verdicts written, not committed
        assert machine_and_human(committed.messages)[1] == []
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        process = start_consumer(normal, log)  # the same transactional ids: aborts the dead loop's transaction
        wait_for(lambda: len(reviewer.decided) == total // 2, timeout=60, message="a decision for each review item")
        reviewer.stopping.set()
        reviewer.join(60)
        decisions_end = end_offsets(kafka, f"{topic}.decisions", 1)
        wait_for(lambda: committed_offsets(kafka, f"{group}.review", f"{topic}.decisions", 1) == decisions_end,
                 timeout=120, message="every decision applied and committed")  # fmt: skip
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        reviewer.stopping.set()
        if process.poll() is None:
            process.kill()

    committed = Collector(kafka, f"{topic}.verdicts", read_committed=True)
    everything = Collector(kafka, f"{topic}.verdicts")
    try:
        committed.until(total + total // 2, timeout=60)
        committed.collect(wait=1.0)
        everything.collect(wait=2.0)
    finally:
        committed.close()
        everything.close()
    corrected = Counter(verdict["supersedes"]["review_id"] for verdict in machine_and_human(committed.messages)[1])
    assert set(corrected) == reviewer.decided and set(corrected.values()) == {1}  # one per decision
    written_in_all = len(machine_and_human(everything.messages)[1])
    assert written_in_all >= len(corrected) + in_open_transaction  # the dead loop's were aborted


def test_five_sigkills_with_review_lose_nothing_and_duplicate_nothing(kafka, policies_dir, tmp_path):
    """The fault suite's five SIGKILLs in 20,000 events, with review on and a moderator deciding every
    review item as it becomes visible: as read_committed sees them, one verdict or dead letter per
    input, one review item per pending result, one corrected verdict per decision; 0 lost, 0 duplicates."""
    topic, group, partitions, total = unique("eoskill"), unique("group"), 4, 20_000
    create_all(kafka, topic, partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 97) for i in range(total)))
    # A hundredth sampled: the review loop applies a few decisions a second (it lets its follower catch
    # up with each decision's partition first), and every review item gets one.
    config = exactly_once_config(tmp_path, "config", kafka, group, topic, policies_dir, sample_fraction=0.01,
                                 classifier={"kind": "plugin", "factory": "tests.plugins:slow",
                                             "options": {"delay_s": 0.02, "max_concurrency": 64}},
                                 max_in_flight_events=INTAKE_LIMIT)  # fmt: skip
    log = tmp_path / "consumer.log"
    rng = random.Random(7)
    reviewer = Reviewer(kafka, topic)
    reviewer.start()
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
                 message="commits at the end offsets after five kills")  # fmt: skip
        decided_during_kills = len(reviewer.decided)

        outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=True)
        try:
            wait_for(lambda: len(set(sources(machine_and_human(outputs.collect())[0]))) >= total,
                     timeout=60, message="every input's verdict")  # fmt: skip
            pending = pending_reviews(machine_and_human(outputs.messages)[0])
        finally:
            outputs.close()
        wait_for(lambda: reviewer.decided >= set(pending), timeout=120, message="a decision for every review item")
        reviewer.stopping.set()
        reviewer.join(60)
        decisions_end = end_offsets(kafka, f"{topic}.decisions", 1)
        wait_for(lambda: committed_offsets(kafka, f"{group}.review", f"{topic}.decisions", 1) == decisions_end,
                 timeout=240, message="every decision applied and committed")  # fmt: skip
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        reviewer.stopping.set()
        if process.poll() is None:
            process.kill()

    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=True)
    items = Collector(kafka, f"{topic}.reviews", read_committed=True)
    try:
        wait_for(lambda: len(outputs.collect()) >= total + len(reviewer.decided), timeout=60, message="all outputs")
        outputs.collect(wait=1.0)
        items.until(len(pending), timeout=60)
        items.collect(wait=1.0)
    finally:
        outputs.close()
        items.close()
    machine, human = machine_and_human(outputs.messages)
    covered = Counter(sources(machine))
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    lost, duplicates = len(expected - set(covered)), sum(n - 1 for n in covered.values())
    committed_items = Counter(item["review_id"] for item in decoded(items.messages))
    item_duplicates = sum(n - 1 for n in committed_items.values())
    corrected = Counter(verdict["supersedes"]["review_id"] for verdict in human)
    corrected_duplicates = sum(n - 1 for n in corrected.values())
    FAULT_FIGURES.append(
        f"exactly_once with review: {total} events, {kills} SIGKILLs, {len(committed_items)} review items, "
        f"{len(reviewer.decided)} decisions ({decided_during_kills} during the kills); duplicates: "
        f"{duplicates} verdicts, {item_duplicates} review items, {corrected_duplicates} corrected verdicts; "
        f"lost: {lost} verdicts, {len(set(pending) - set(committed_items))} review items, "
        f"{len(reviewer.decided - set(corrected))} corrected verdicts"
    )
    assert (lost, duplicates) == (0, 0)
    assert item_duplicates == 0 and set(pending.values()) == {1}
    assert committed_items == pending  # every review item with its verdict, and the other way round
    assert 150 <= len(committed_items) <= 300  # a hundredth of the results sampled
    assert corrected_duplicates == 0
    assert set(corrected) == reviewer.decided == set(pending)  # one corrected verdict per decision
    assert decided_during_kills > 0  # decisions came in while the kills went on: the review loop was killed too
