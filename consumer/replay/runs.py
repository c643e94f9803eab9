"""A replay run shared by many workers: owns "every worker of a run replays the same plan".

`safeguard-consumer replay --run NAME` starts or joins a run. Its plan (the offset range of
each partition as the bounds resolved when the run started, the policy versions, the output
topic and a fingerprint of the classifier settings) lives on a compacted *run topic*
(`--runs-topic`, default `safeguard-replay-runs`), in the partition the name hashes to, so
every record of one run is in one partition, in order.

Two workers starting at once agree on one plan without a lock: each that finds no plan
writes its proposal under a key of its own (`NAME/plan/PROPOSAL`), then reads the partition
back, and every worker takes the *first* plan record of the run. Keys are unique per
proposal, so compaction keeps them all and never reorders them: the first stays the first.
A worker whose command line asks for something else than that plan (another topic, bounds,
partitions, output, policy versions or classifier) is refused, naming what differs. Bounds
are compared as written (`--to now` asks the same whatever the time): the offsets come from
the plan.

The run's progress is the committed offsets of its own consumer group
(`safeguard-replay-NAME`, see `RunSource`); once every partition's committed offset reached its
END, a worker writes `NAME/complete`, and a worker started after that does nothing.
`run_status` puts the plan, the committed offsets and the group's members side by side.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from rich.table import Table

from consumer.config import Settings
from consumer.errors import Fatal
from consumer.kafka import admin
from consumer.kafka.client import Consumer, KafkaException, Producer, TopicPartition
from consumer.kafka.ranges import iter_ranges
from consumer.replay import ReplayError
from consumer.replay.bounds import OffsetRange
from consumer.replay.checkpoint import Checkpoint
from consumer.replay.source import replay_consumer_config

RUNS_TOPIC = "safeguard-replay-runs"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TIMEOUT_S = 30.0
# What a worker's command line must agree on with the plan, and how a refusal names it.
REQUEST_FIELDS = {
    "topic": "--topic",
    "start": "--from",
    "end": "--to",
    "partitions": "--partitions",
    "output": "the output",
    "policies": "the policy versions",
    "classifier": "the classifier settings",
}


class RunTopicError(Fatal):
    """The run topic cannot be read or written (the brokers, permissions): exit 1, try again."""


def run_group(name: str) -> str:
    """The consumer group of run `name`: its members share the partitions, its offsets are the run's progress."""
    return f"safeguard-replay-{name}"


def check_run_name(name: str) -> str:
    if not RUN_NAME.fullmatch(name):
        raise ReplayError(f"--run {name!r}: a run name is 1-100 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")  # fmt: skip
    return name


def classifier_fingerprint(settings: Settings) -> str:
    """What decides, hashed: the classifier and cascade sections and the engine's model. Where the
    engine runs (endpoints, priority) is left out: workers may reach the fleet differently."""
    deciding = {
        "classifier": settings.classifier.model_dump(mode="json"),
        "cascade": settings.cascade.model_dump(mode="json"),
        "model": settings.engine.get("model"),
    }
    digest = hashlib.sha256(orjson.dumps(deciding, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
    return f"{settings.classifier.kind}/{settings.classifier.reasoner_place or 'none'}:{digest}"


class RunRequest(BaseModel):
    """What one worker's command line and configuration ask for."""

    topic: str
    start: str  # --from as written
    end: str  # --to as written
    partitions: list[int] | None
    output: str  # "topic:NAME"
    policies: list[str]  # id@version of every policy in force
    classifier: str  # classifier_fingerprint

    def differences(self, other: RunRequest) -> list[str]:
        """`option: X in the plan, Y here` for each field where `other` (this worker's) differs."""
        return [
            f"{label}: {getattr(self, name)!r} in the plan, {getattr(other, name)!r} here"
            for name, label in REQUEST_FIELDS.items()
            if getattr(self, name) != getattr(other, name)
        ]


class RunPlan(RunRequest):
    """A run's plan, fixed by the first proposal on the run topic."""

    name: str
    proposal: str
    started_at: datetime
    ranges: dict[int, OffsetRange]  # per partition; `next` is unused here: progress is the group's offsets

    def records(self) -> int:
        return sum(r.end - r.start for r in self.ranges.values())


@dataclass
class RunRecords:
    """What the run topic holds for one run."""

    plan: RunPlan | None = None
    completed: dict[str, Any] | None = None  # the `complete` record: finished_at, worker
    proposals: int = 0


class RunLedger:
    """The run topic: reads a run's records, writes a proposed plan and the completion.

    Created on demand (one partition, compacted, replication min(3, brokers)); a topic of more
    partitions made by hand works too, each run staying in the partition its name hashes to.
    """

    def __init__(self, settings: Settings, topic: str = RUNS_TOPIC):
        self.settings = settings
        self.topic = topic
        self._reader = replay_consumer_config(settings.kafka.bootstrap_servers, "safeguard-replay-runs-reader",
                                              settings.kafka.consumer_options)  # fmt: skip

    def ensure(self, cluster: admin.Cluster) -> None:
        plan = admin.TopicPlan(self.topic, "replay runs", 1, {"cleanup.policy": "compact"})
        admin.create_topics(cluster, [plan], replication=None, timeout_s=TIMEOUT_S)
        if plan.outcome.startswith("failed"):
            raise RunTopicError(f"--runs-topic {self.topic!r}: cannot create it: {plan.outcome}")

    def read(self, name: str) -> RunRecords:
        partition, high = self._partition(name)
        records = RunRecords()
        prefix = f"{name}/".encode()
        try:
            spans = [(self.topic, partition, 0, high)]
            for message in iter_ranges(self._reader, spans, group_id=self._reader["group.id"]):
                key = message.key() or b""
                if not key.startswith(prefix) or not message.value():
                    continue
                kind = key[len(prefix):].split(b"/", 1)[0]
                if kind == b"plan":
                    records.proposals += 1
                    if records.plan is None:
                        records.plan = RunPlan.model_validate_json(message.value())
                elif kind == b"complete":
                    records.completed = orjson.loads(message.value())
        except KafkaException as exc:
            raise RunTopicError(f"cannot read the run topic {self.topic!r}: {exc}") from None
        except (ValidationError, orjson.JSONDecodeError):
            raise ReplayError(f"the run topic {self.topic!r} holds a record of run {name!r} that is not a plan "
                              "of this version") from None  # fmt: skip
        return records

    def agree(self, proposal: RunPlan) -> RunPlan:
        """Write `proposal` and return the run's plan: the first one on the topic, whoever wrote it."""
        self._write(f"{proposal.name}/plan/{proposal.proposal}", proposal.model_dump_json().encode(), proposal.name)
        plan = self.read(proposal.name).plan
        if plan is None:
            raise RunTopicError(f"the run topic {self.topic!r} does not show the plan just written")
        return plan

    def complete(self, name: str) -> None:
        """Say the run is complete: every partition's committed offset reached END."""
        value = {"finished_at": datetime.now(timezone.utc).isoformat(), "worker": worker_id()}
        self._write(f"{name}/complete", orjson.dumps(value), name)

    def _partition(self, name: str) -> tuple[int, int]:
        """The partition run `name` lives in, and its end offset now."""
        probe = Consumer(self._reader)
        try:
            found = probe.list_topics(self.topic, timeout=TIMEOUT_S).topics.get(self.topic)
            if found is None or found.error is not None or not found.partitions:
                raise RunTopicError(f"the run topic {self.topic!r} cannot be described")
            partition = zlib.crc32(name.encode()) % len(found.partitions)
            _, high = probe.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=TIMEOUT_S)
            return partition, high
        except KafkaException as exc:
            raise RunTopicError(f"cannot read the run topic {self.topic!r}: {exc}") from None
        finally:
            probe.close()

    def _write(self, key: str, value: bytes, name: str) -> None:
        partition, _ = self._partition(name)
        failures: list[str] = []
        kafka = self.settings.kafka
        producer = Producer({**kafka.producer_options, "bootstrap.servers": kafka.bootstrap_servers,
                             "acks": "all", "enable.idempotence": True})  # fmt: skip
        producer.produce(self.topic, value=value, key=key.encode(), partition=partition,
                         on_delivery=lambda error, _: failures.append(error.str()) if error else None)  # fmt: skip
        if producer.flush(TIMEOUT_S) or failures:
            why = failures[0] if failures else "timed out"
            raise RunTopicError(f"cannot write to the run topic {self.topic!r}: {why}")


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def new_plan(name: str, request: RunRequest, ranges: dict[int, OffsetRange]) -> RunPlan:
    return RunPlan(**request.model_dump(), name=name, proposal=uuid.uuid4().hex[:12],
                   started_at=datetime.now(timezone.utc), ranges=ranges)  # fmt: skip


def committed_offsets(settings: Settings, plan: RunPlan) -> dict[int, int]:
    """The run group's committed offset per planned partition (-1001: none yet), read without joining it."""
    probe = Consumer(replay_consumer_config(settings.kafka.bootstrap_servers, run_group(plan.name),
                                            settings.kafka.consumer_options))  # fmt: skip
    try:
        found = probe.committed([TopicPartition(plan.topic, p) for p in sorted(plan.ranges)], timeout=TIMEOUT_S)
        return {tp.partition: tp.offset for tp in found}
    except KafkaException as exc:
        raise RunTopicError(f"cannot read the offsets of group {run_group(plan.name)!r}: {exc}") from None
    finally:
        probe.close()


@dataclass
class PartitionProgress:
    partition: int
    start: int
    end: int
    committed: int  # -1001: none yet
    holder: str  # the group member that holds it, or "" when none does

    @property
    def done(self) -> int:
        return max(0, min(self.committed, self.end) - self.start) if self.committed >= 0 else 0

    @property
    def left(self) -> int:
        return self.end - self.start - self.done


@dataclass
class RunStatus:
    plan: RunPlan
    completed: dict[str, Any] | None
    group_state: str
    partitions: list[PartitionProgress] = field(default_factory=list)

    @property
    def at_end(self) -> bool:
        """Every partition's committed offset reached END: the run is complete (even before its record says so)."""
        return all(p.left == 0 for p in self.partitions)


def run_status(settings: Settings, cluster: admin.Cluster, ledger: RunLedger, name: str) -> RunStatus:
    """The plan, the committed offsets and who holds what (the group's members, from the admin API)."""
    records = ledger.read(name)
    if records.plan is None:
        raise ReplayError(f"no replay run {name!r} on the run topic {ledger.topic!r}")
    plan = records.plan
    committed = committed_offsets(settings, plan)
    holders: dict[int, str] = {}
    state = "unknown"
    try:
        described = cluster.admin.describe_consumer_groups([run_group(name)], request_timeout=TIMEOUT_S)
        group = described[run_group(name)].result(TIMEOUT_S)
        state = str(getattr(group.state, "name", group.state)).lower()
        for member in group.members:
            who = f"{member.client_id}@{member.host.lstrip('/')}"
            for tp in member.assignment.topic_partitions if member.assignment else []:
                if tp.topic == plan.topic:
                    holders[tp.partition] = who
    except KafkaException as exc:
        state = f"not described ({exc})"
    progress = [
        PartitionProgress(p, r.start, r.end, committed.get(p, -1001), holders.get(p, ""))
        for p, r in sorted(plan.ranges.items())
    ]
    return RunStatus(plan, records.completed, state, progress)


def as_checkpoint(plan: RunPlan, committed: dict[int, int]) -> Checkpoint:
    """The run seen as one replay's checkpoint, `next` at the committed offsets: what this worker's
    progress bars start from and, once the run is complete (`finish()`), what a backtest covers."""
    ranges = {
        p: OffsetRange(start=r.start, end=r.end, next=min(r.end, max(r.start, committed.get(p, -1))))
        for p, r in plan.ranges.items()
    }
    return Checkpoint(run_id=plan.name, topic=plan.topic, output=plan.output, policies=plan.policies,
                      started_at=plan.started_at, ranges=ranges)  # fmt: skip


def status_table(status: RunStatus) -> Table:
    """`replay status`: per partition, the range, the committed offset, what is left and who holds it."""
    plan = status.plan
    if status.completed:
        state = f"complete (finished at {status.completed.get('finished_at', '?')})"
    elif status.at_end:
        state = "complete (every partition committed at END)"
    else:
        state = f"incomplete: {sum(p.left for p in status.partitions)} of {plan.records()} records left"
    table = Table(title=f"Replay run {plan.name} of {plan.topic} to {plan.output}: {state}")
    for column in ("partition", "offsets", "committed", "done", "left", "held by"):
        table.add_column(column, justify="left" if column == "held by" else "right")
    for p in status.partitions:
        table.add_row(str(p.partition), f"{p.start}..{p.end}", str(p.committed) if p.committed >= 0 else "-",
                      str(p.done), str(p.left), p.holder or "-")  # fmt: skip
    members = len({p.holder for p in status.partitions if p.holder})
    table.caption = (f"group {run_group(plan.name)}: {status.group_state}, {members} member(s) holding "
                     f"planned partitions; planned {plan.started_at:%Y-%m-%d %H:%M:%S} UTC from --from "
                     f"{plan.start} --to {plan.end}; policies {', '.join(plan.policies)}; "
                     f"classifier {plan.classifier}")  # fmt: skip
    return table
