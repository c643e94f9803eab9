"""Each implementation plays the role it is handed in: Protocols of `consumer.kafka.roles` (the
sinks' roles: tests/unit/sinks/test_roles.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from consumer.kafka.budget import OutputBudget
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.roles import Committer, RecordSource
from consumer.kafka.source import OffsetCommitter, Source
from consumer.replay.bounds import OffsetRange
from consumer.replay.checkpoint import Checkpoint
from consumer.replay.source import ReplaySource
from consumer.sinks.kafka import TransactionalSink
from tests.protocols import role_problems

# Never contacted: librdkafka connects only when something is produced.
PRODUCER = {"bootstrap.servers": "127.0.0.1:9"}
# Kafka's default limits, never read from a broker (there is none at PRODUCER's address).
UNREAD = OutputBudget(PRODUCER, "verdicts", "dlq")


def ignore(*_args: object) -> None:
    return None


def group_source() -> Source:
    return Source(object(), ["chat"], OffsetTracker(), ignore, ignore, max_in_flight_events=10,
                  max_in_flight_bytes=1 << 20, commit_interval_s=1.0, revoke_drain_s=0.0)  # fmt: skip


def replay_source(tmp_path) -> ReplaySource:
    checkpoint = Checkpoint(run_id="r", topic="chat", output="file:out", policies=[],
                            started_at=datetime.now(timezone.utc), ranges={0: OffsetRange(start=0, end=5, next=0)})  # fmt: skip
    return ReplaySource(object(), checkpoint, tmp_path / "cp.json", OffsetTracker(), ignore, ignore, ignore,
                        max_in_flight_events=10, max_in_flight_bytes=1 << 20, save_interval_s=1.0)  # fmt: skip


def test_both_sources_play_the_record_source_role(tmp_path):
    assert role_problems(group_source(), RecordSource) == []
    assert role_problems(replay_source(tmp_path), RecordSource) == []


def test_both_committers_play_the_committer_role():
    transactional = TransactionalSink(PRODUCER, "verdicts", "dlq", OffsetTracker(), "tx", ignore, budget=UNREAD)
    try:
        assert role_problems(OffsetCommitter(OffsetTracker(), commit_at=1), Committer) == []
        assert role_problems(transactional, Committer) == []
    finally:
        transactional.close()


@pytest.mark.parametrize("role", [RecordSource, Committer])
def test_the_roles_module_declares_members_to_check(role):
    from tests.protocols import protocol_members

    attributes, methods = protocol_members(role)
    assert methods  # an empty Protocol would make every check above pass
