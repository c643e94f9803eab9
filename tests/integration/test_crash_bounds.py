"""What a crash may cost, measured: duplicates within the stated bound, none across an abort.

- At least once, the README's bound: a crash redoes at most `pipeline.max_in_flight_events`
  records per instance, because records delivered but not yet committed count in that
  window (and commits follow it), whatever `commit_interval_s` is.
- Exactly once: a SIGKILL while a transaction is open, with its outputs already written to
  the broker, leaves none of them visible to `read_committed` readers.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest
import yaml

from tests.conftest import FAULT_FIGURES
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
from tests.runner import start_consumer, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

INTAKE_LIMIT = 1000  # pipeline.max_in_flight_events
COMMIT_INTERVAL_S = 30.0  # long: only the window bounds what a crash redoes


def _config(tmp_path, kafka, group, topic, policies_dir, **pipeline):
    config = write_config(tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml", kafka, group, topic, policies_dir)
    settings = yaml.safe_load(config.read_text())
    settings["pipeline"].update(pipeline)
    config.write_text(yaml.safe_dump(settings))
    return config


def _outputs(kafka, topic) -> int:
    return sum(end_offsets(kafka, f"{topic}.verdicts", 4).values())


def test_sigkills_at_full_speed_duplicate_at_most_one_window_each(kafka, policies_dir, tmp_path):
    topic, group, partitions, total = unique("fullspeed"), unique("group"), 4, 80_000
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=partitions)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 97) for i in range(total)))
    # The keyword classifier decides at once: the consumer runs as fast as it can.
    config = _config(tmp_path, kafka, group, topic, policies_dir, max_in_flight_events=INTAKE_LIMIT,
                     commit_interval_s=COMMIT_INTERVAL_S)  # fmt: skip
    log = tmp_path / "consumer.log"
    rng = random.Random(21)
    kills, outputs_at_kill = 0, []
    process = start_consumer(config, log)
    try:
        for _ in range(3):
            # Kill once the restarted instance is streaming: at least 5,000 new outputs, then a random moment.
            before = _outputs(kafka, topic)
            wait_for(lambda: _outputs(kafka, topic) >= before + 5000, timeout=120, message="streaming again")
            time.sleep(rng.uniform(0.0, 0.5))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            kills += 1
            outputs_at_kill.append(_outputs(kafka, topic))
            process = start_consumer(config, log)
        assert outputs_at_kill[-1] < total  # every kill came mid-stream
        ends = end_offsets(kafka, topic, partitions)
        wait_for(lambda: committed_offsets(kafka, group, topic, partitions) == ends, timeout=240,
                 message="commits at the end offsets after the kills")  # fmt: skip
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    outputs, seen = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq"), set()

    def all_covered() -> bool:  # decodes each output once: over 80,000 of them
        read = len(outputs.messages)
        seen.update(covered_offsets(outputs.collect(wait=0.5)[read:]))
        return len(seen) >= total

    try:
        wait_for(all_covered, timeout=180, interval=0.0, message="all outputs")
        outputs.collect(wait=1.0)
    finally:
        outputs.close()
    covered = Counter(covered_offsets(outputs.messages))
    lost = len({(p, o) for p, end in ends.items() for o in range(end)} - set(covered))
    duplicates = sum(n - 1 for n in covered.values())
    FAULT_FIGURES.append(f"full speed, intake limit {INTAKE_LIMIT}, commit interval {COMMIT_INTERVAL_S:.0f}s: {total} events, "
                         f"{kills} SIGKILLs, {duplicates} duplicates (bound {kills * INTAKE_LIMIT}), {lost} lost")  # fmt: skip
    assert lost == 0
    assert duplicates <= kills * INTAKE_LIMIT


def test_a_sigkill_with_a_transaction_open_leaves_no_aborted_output_visible(kafka, policies_dir, tmp_path):
    topic, group, total = unique("abort"), unique("group"), 500
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=2)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % (i % 13) for i in range(total)))
    exactly_once = {"delivery": "exactly_once", "transactional_id": f"{group}-tx", "transaction_max_records": 100}
    marker = tmp_path / "transaction-open"
    stalling = _config(tmp_path, kafka, group, topic, policies_dir, **exactly_once)
    settings = yaml.safe_load(stalling.read_text())
    settings["classifier"] = {"kind": "plugin", "factory": "tests.plugins:stall_in_transaction",
                              "options": {"marker": str(marker)}}  # fmt: skip
    stalling.write_text(yaml.safe_dump(settings))
    normal = _config(tmp_path, kafka, group, topic, policies_dir, **exactly_once)
    log = tmp_path / "consumer.log"

    process = start_consumer(stalling, log)
    try:
        wait_for(marker.exists, timeout=90, message="a transaction with written outputs, open")
        written = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")  # read_uncommitted: sees the open transaction
        try:
            in_open_transaction = len(written.until(1, timeout=30))
            written.collect(wait=1.0)
            in_open_transaction = len(written.messages)
        finally:
            written.close()
        assert in_open_transaction > 0  # the outputs are on the broker, not yet committed
        # Its offsets are in the open transaction too (send_offsets_to_transaction came before the stall).
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        process = start_consumer(normal, log)  # same transactional id: fences the dead one, aborts its transaction
        ends = end_offsets(kafka, topic, 2)
        wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=120, message="commits at the end")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    committed = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq", read_committed=True)
    everything = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        committed.until(total, timeout=60)
        committed.collect(wait=1.0)
        everything.until(total + in_open_transaction, timeout=60)
        everything.collect(wait=1.0)
    finally:
        committed.close()
        everything.close()
    seen = Counter(covered_offsets(committed.messages))
    assert sorted(seen) == sorted((p, o) for p, end in ends.items() for o in range(end))  # 0 lost
    assert set(seen.values()) == {1}  # exactly one output per input, as read_committed sees it
    aborted = len(everything.messages) - len(committed.messages)
    assert aborted == in_open_transaction  # the aborted outputs exist, and read_committed saw none of them
    FAULT_FIGURES.append(f"exactly once, SIGKILL with a transaction open: {total} events, {aborted} outputs aborted "
                         f"(invisible to read_committed), 0 duplicates, 0 lost")  # fmt: skip
