"""Topics and the start-up checks against the brokers: fail fast at start, with the reason.

Every command that talks to Kafka (through `consumer.pipeline.preflight`) calls `connect`
then `check_topics` with the topics it needs: brokers unreachable for
`kafka.startup_timeout_s` raise `Unreachable` (exit 1, one line naming the addresses); a
missing topic, or one this principal may not read or write as needed, raises `TopicProblem`
(exit 2, naming the key or option that names the topic and how to create it). After a
successful start, outages are the clients' to ride out (`consumer.kafka.client_logs`).

`create_topics` is `safeguard-consumer topics create`: every topic the configuration names
(the named input topics, both outputs, the three review topics when `review.enabled`, and the
compacted `policies.topic` when set),
with partitions, replication and the record size the outputs need; idempotent (existing
topics are reported, never changed).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient, ClusterMetadata, NewTopic

from consumer.config import Settings
from consumer.errors import Fatal
from consumer.kafka.client_logs import client_options

CREATE_COMMAND = "safeguard-consumer topics create --config FILE"
# librdkafka options that apply to any client (security, addresses, networking): what the
# admin client takes from the consumer's and producer's options.
_CLIENT_WIDE = re.compile(
    r"^(security\.|sasl\.|ssl\.|ssl_|client\.|socket\.|broker\.|reconnect\.|api\.version|metadata\.|"
    r"topic\.metadata|resolve|connections\.max|log_level$|debug$|oauth)"
)
# A dead letter carries the original key, value and headers base64-encoded, plus its own fields.
_DEAD_LETTER_OVERHEAD_BYTES = 64 << 10
_BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class Unreachable(Fatal):
    """No broker answered within `kafka.startup_timeout_s`, or the brokers refused us (exit 1)."""


class TopicProblem(Fatal):
    """A topic the consumer needs is missing or not permitted (exit 2)."""


@dataclass(frozen=True)
class TopicNeed:
    """A topic a command reads or writes, with the key (or option) that names it; a name
    starting with ^ is a pattern, and matching no topic yet is only a warning."""

    key: str  # kafka.verdict_topic, review.topic, --output-topic
    name: str
    write: bool
    remedy: str = ""  # how to make it exist; empty: the `topics create` command


def admin_config(settings: Settings) -> dict[str, Any]:
    """Options for an admin client: the client-wide options of both clients, and our logger."""
    k = settings.kafka
    options = {
        key: value
        for source in (k.consumer, k.producer, k.common)  # common last: it is what both share
        for key, value in source.items()
        if key in k.common or _CLIENT_WIDE.match(key)
    }
    return {**options, "bootstrap.servers": k.bootstrap_servers}


def output_max_message_bytes(max_payload_bytes: int) -> int:
    """The record size an output topic must accept: a dead letter of the largest input
    (its value base64-encoded, 4/3 of it) and its own fields."""
    return max(_BROKER_DEFAULT_MAX_MESSAGE_BYTES, 4 * math.ceil(max_payload_bytes / 3) + _DEAD_LETTER_OVERHEAD_BYTES)


@dataclass
class _Errors:
    """What the admin client's error callback heard, to say why nothing answered."""

    last: str = ""
    fatal: str = ""

    def __call__(self, error: KafkaError) -> None:
        if error.fatal() or error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            self.fatal = error.str()
        elif error.code() != KafkaError._ALL_BROKERS_DOWN:
            self.last = error.str()


@dataclass
class Cluster:
    """A connected admin client and the metadata it saw."""

    admin: AdminClient
    metadata: ClusterMetadata
    errors: _Errors = field(default_factory=_Errors)

    @property
    def brokers(self) -> int:
        return len(self.metadata.brokers)


def connect(settings: Settings, timeout_s: float | None = None) -> Cluster:
    """An admin client that has seen the cluster's metadata, or `Unreachable` after
    `kafka.startup_timeout_s` (at once on an authentication or TLS failure)."""
    addresses = settings.kafka.bootstrap_servers
    timeout_s = settings.kafka.startup_timeout_s if timeout_s is None else timeout_s
    errors = _Errors()
    try:
        # Its connection failures at DEBUG: `Unreachable` says it once, with the last of them.
        admin = AdminClient({**admin_config(settings), **client_options("admin", failure_level=logging.DEBUG),
                             "error_cb": errors})  # fmt: skip
    except KafkaException as exc:
        raise Unreachable(f"cannot create a Kafka client: {exc.args[0].str() if exc.args else exc}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        admin.poll(0)  # serves the error callback and the logger
        if errors.fatal:
            raise Unreachable(f"brokers {addresses} refused the connection: {errors.fatal}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = errors.last or "no answer"
            raise Unreachable(
                f"brokers unreachable: no answer from {addresses} within {timeout_s:g} s "
                f"(kafka.startup_timeout_s): {why}"
            )
        try:
            metadata = admin.list_topics(timeout=min(2.0, max(0.1, remaining)))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() not in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT):
                errors.last = error.str()
            continue
        if metadata.brokers:
            return Cluster(admin, metadata, errors)


def check_topics(
    cluster: Cluster, needs: list[TopicNeed], create_command: str = CREATE_COMMAND, timeout_s: float = 15.0
) -> list[str]:
    """Raises `TopicProblem` for a missing topic, or one this principal may not read or write
    as `needs` says; returns warnings (a pattern that matches no topic yet)."""
    topics = cluster.metadata.topics
    problems, warnings = [], []

    def missing(name: str) -> bool:
        t = topics.get(name)
        return t is None or (t.error is not None and t.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART)

    named = [need for need in needs if not need.name.startswith("^")]
    for need in (n for n in needs if n.name.startswith("^")):
        if not any(re.match(need.name, name) for name in topics):
            warnings.append(f"{need.key}: no topic matches {need.name!r} yet; the consumer waits for one")
    for need in named:
        if missing(need.name):
            remedy = need.remedy or f"create it with: {create_command}"
            problems.append(f"{need.key}: topic {need.name!r} does not exist; {remedy}")
    if problems:
        raise TopicProblem("\n".join(dict.fromkeys(problems)))

    # Permissions, where the broker has an authorizer: READ on what is read, WRITE on what is written.
    operations: dict[str, set[AclOperation]] = {}
    for need in named:
        operations.setdefault(need.name, set()).add(AclOperation.WRITE if need.write else AclOperation.READ)
    try:
        described = cluster.admin.describe_topics(
            TopicCollection(list(operations)), include_authorized_operations=True, request_timeout=timeout_s
        )
        for name, future in described.items():
            allowed = future.result(timeout_s).authorized_operations
            if allowed is None or AclOperation.ALL in allowed:
                continue
            for operation in sorted(operations[name] - set(allowed), key=lambda o: o.name):
                verb = "read" if operation == AclOperation.READ else "write"
                problems.append(f"topic {name!r}: this principal may not {verb} it (ask for {verb.upper()} on it)")
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        text = error.str() if isinstance(error, KafkaError) else str(error)
        if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            problems.append(f"the topics {', '.join(operations)}: this principal may not describe them ({text})")
        else:
            warnings.append(f"could not check topic permissions: {text}")
    if problems:
        raise TopicProblem("\n".join(problems))
    return warnings


@dataclass
class TopicPlan:
    name: str
    role: str  # input, verdicts, dead letters, review items, review decisions, review appeals
    partitions: int
    config: dict[str, str]
    outcome: str = ""  # created, exists, or the error


def plan_topics(settings: Settings, partitions: int) -> list[TopicPlan]:
    """Every topic the configuration names, each once. The topics that may carry a copy of the
    largest input (dead letters, and review items with their event) are sized for it."""
    k, review = settings.kafka, settings.review
    sized = {"max.message.bytes": str(output_max_message_bytes(settings.pipeline.max_payload_bytes))}
    plans = [TopicPlan(name, "input", partitions, {}) for name in k.input_topics if not name.startswith("^")]
    plans.append(TopicPlan(k.verdict_topic, "verdicts", partitions, sized))
    plans.append(TopicPlan(k.dead_letter_topic, "dead letters", partitions, sized))
    if review.enabled:
        plans.append(TopicPlan(review.topic, "review items", partitions, sized))
        plans.append(TopicPlan(review.decisions_topic, "review decisions", partitions, {}))
        plans.append(TopicPlan(review.appeals_topic, "review appeals", partitions, {}))
    if settings.policies.topic:
        # Compacted: the last record of each policy key is kept for ever (a tombstone, for a while).
        # One partition: every instance reads it whole anyway, and its order is the order of publishing.
        plans.append(TopicPlan(settings.policies.topic, "policies", 1, {"cleanup.policy": "compact"}))
    unique: dict[str, TopicPlan] = {}
    for plan in plans:
        unique.setdefault(plan.name, plan)
    return list(unique.values())


def create_topics(cluster: Cluster, plans: list[TopicPlan], replication: int | None, timeout_s: float = 30.0) -> None:
    """Create what is missing; each plan's `outcome` says what happened. Never alters an
    existing topic. `replication` None: min(3, brokers)."""
    factor = replication or min(3, max(1, cluster.brokers))
    existing = cluster.metadata.topics
    new = []
    for plan in plans:
        if plan.name in existing and existing[plan.name].error is None:
            plan.outcome = f"exists ({len(existing[plan.name].partitions)} partitions)"
        else:
            new.append(plan)
    if not new:
        return
    futures = cluster.admin.create_topics(
        [NewTopic(p.name, num_partitions=p.partitions, replication_factor=factor, config=p.config) for p in new],
        request_timeout=timeout_s,
    )
    for plan in new:
        try:
            futures[plan.name].result(timeout_s)
            plan.outcome = f"created ({plan.partitions} partitions, replication {factor})"
        except KafkaException as exc:
            error = exc.args[0] if exc.args else exc
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                plan.outcome = "exists"
            else:
                plan.outcome = f"failed: {error.str() if isinstance(error, KafkaError) else error}"
    # Wait until the new topics are visible, so a `run` right after finds them.
    deadline = time.monotonic() + timeout_s
    names = [p.name for p in new if p.outcome.startswith("created")]
    while names and time.monotonic() < deadline:
        topics = cluster.admin.list_topics(timeout=5).topics
        if all(n in topics and topics[n].error is None for n in names):
            return
        time.sleep(0.2)
