"""The pre-flight: everything a command checks before it touches a record, the same for
`run`, `check-config --connect`, `replay`, `review *` and `topics create`.

`prepare` (offline): the policies load, the routes name loaded policies (with `policies.topic`,
once `run` has read the topic), librdkafka accepts every passed-through option, the decoder
builds (`decode`, `schema_registry`), the files of `sinks.files` may be written, and the
classifier builds (the vLLM engine only has its settings checked and its package looked for:
loading it is not cheap). Each failure is a `ConfigError` naming the key.

`connect_and_check` (online): the ports the command serves on are free (else `ConfigError`
naming the key, exit 2), the brokers answer within `kafka.startup_timeout_s` (else
`Unreachable`, exit 1), the topics the command needs exist and may be read or written (else
`TopicProblem`, exit 2), and the schema registry answers when a registry format reads a topic
or an output is registered (else `Unreachable`, exit 1). `run_needs`, `review_needs` say which topics and ports each
command needs; a command with its own (a replay's --topic) builds `TopicNeed`s itself.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from consumer.classify import Classifier
from consumer.classify.factory import build_classifier
from consumer.config import REGISTRY_FORMATS, ConfigError, Settings, format_validation_error
from consumer.decode.factory import build_decoder
from consumer.errors import Unavailable
from consumer.kafka import admin
from consumer.kafka.admin import CREATE_COMMAND, TopicNeed
from consumer.kafka.options import check_client_options
from consumer.policy import Policy, PolicyError, PolicyStore
from consumer.policy.route import Router, RoutingError
from consumer.policy.topic import TopicPolicyStore
from consumer.sinks.file import check_writable

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    policies: PolicyStore
    classifier: Classifier | None  # None: not built (check-config with a reasoner)


def prepare(settings: Settings, build_engine: bool = True) -> Prepared:
    """The offline checks, in the order `run` meets them; `build_engine` False: a reasoner
    (in process or remote) has its settings checked but is not built."""
    directory = settings.policies.directory
    if not directory.is_dir():
        raise ConfigError(f"policies.directory: {directory} does not exist or is not a folder")
    topic = settings.policies.topic
    store = TopicPolicyStore if topic else PolicyStore  # the topic's records are applied by `run`
    try:
        policies = store(directory, settings.policies.max_tokens)
    except PolicyError as exc:
        raise ConfigError(f"policies.directory: {exc}") from None
    if not topic:  # with a policy topic, the policies and the routes naming them are checked once it is read (run)
        if not policies.get():
            raise ConfigError(f"policies.directory: no policy files (*.md) in {directory}")
        try:
            Router(settings.policies, policies.get)
        except RoutingError as exc:
            raise ConfigError(str(exc)) from None  # it names policies.routes/default
    _check_vllm_installed(settings)
    check_client_options(settings)
    build_decoder(settings)
    check_writable(settings.sinks.files)
    place = settings.classifier.reasoner_place
    if place is not None and not build_engine:
        from consumer.classify.engine import engine_settings

        try:
            engine_settings(settings.engine, place)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, None).replace("\n  ", "\n  engine.")) from None
        except ValueError as exc:  # an endpoint's key variable unset: named in the message
            raise ConfigError(str(exc)) from None
        return Prepared(policies, None)
    return Prepared(policies, build_classifier(settings, policies))


@dataclass(frozen=True)
class Port:
    """A port a command serves on, and the key that names it."""

    key: str
    host: str
    port: int | None  # None: not served; 0: any free port


@dataclass
class Needs:
    """What a command needs from its surroundings before it starts."""

    topics: list[TopicNeed]
    ports: list[Port] = field(default_factory=list)


def run_needs(settings: Settings) -> Needs:
    """`run`'s: its inputs, both outputs, the review topics when review is on, the shadow topic when
    shadow runs are, the policy topic when set, the metrics port."""
    k, review = settings.kafka, settings.review
    topics = [TopicNeed("kafka.input_topics", name, write=False) for name in k.input_topics]
    topics += [TopicNeed("kafka.verdict_topic", k.verdict_topic, write=True),
               TopicNeed("kafka.dead_letter_topic", k.dead_letter_topic, write=True)]  # fmt: skip
    if review.enabled:
        topics.append(TopicNeed("review.topic", review.topic, write=True))
        topics.append(TopicNeed("review.decisions_topic", review.decisions_topic, write=False))
        if review.opens("appeal"):
            topics.append(TopicNeed("review.appeals_topic", review.appeals_topic, write=False))
    if settings.shadow.enabled:
        topics.append(TopicNeed("shadow.topic", settings.shadow.topic, write=True))
    if settings.policies.topic:
        topics.append(TopicNeed("policies.topic", settings.policies.topic, write=False))
    t = settings.telemetry
    return Needs(topics, [Port("telemetry.http_port", t.http_host, t.http_port)])


def review_needs(settings: Settings, writes_decisions: bool, port: Port | None = None) -> Needs:
    """The review commands': the review items, and the decisions (read, or written by a console or bridge)."""
    review = settings.review
    topics = [TopicNeed("review.topic", review.topic, write=False),
              TopicNeed("review.decisions_topic", review.decisions_topic, write=False)]  # fmt: skip
    if writes_decisions:
        topics.append(TopicNeed("review.decisions_topic", review.decisions_topic, write=True))
    return Needs(topics, [port] if port else [])


def connect_and_check(settings: Settings, needs: Needs, create_command: str = CREATE_COMMAND) -> list[str]:
    """The online checks; returns warnings. Raises `ConfigError` (a busy port),
    `admin.Unreachable` or `admin.TopicProblem`."""
    for port in needs.ports:
        check_port(port)
    cluster = admin.connect(settings)
    warnings = admin.check_topics(cluster, needs.topics, create_command)
    formats = {spec.format for spec in (settings.decode, *settings.decode.topics.values())}
    if formats & set(REGISTRY_FORMATS) or settings.sinks.registered_outputs:
        from consumer.decode.registry import check_reachable, registry_client

        try:
            check_reachable(registry_client(settings.schema_registry), settings.schema_registry)
        except Unavailable as exc:
            raise admin.Unreachable(f"schema registry {settings.schema_registry.url}: {exc.reason}") from None
    return warnings


def check_port(port: Port) -> None:
    """`ConfigError` naming the key when another process already listens there."""
    if not port.port:
        return
    family = socket.AF_INET6 if ":" in port.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((port.host, port.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"{port.key}: cannot serve on {port.host}:{port.port} ({exc.strerror})") from None
            raise ConfigError(f"{port.key}: port {port.port} on {port.host} is already in use (another process on "
                              "this host?); choose another port, or 0 for any free one") from None  # fmt: skip


def _check_vllm_installed(settings: Settings) -> None:
    """An in-process vLLM engine needs the vllm package: said here, as `run` would meet it when
    it builds the engine (check-config does not build it)."""
    if settings.classifier.reasoner_place == "in_process" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"classifier.reasoner: in_process (classifier.kind {settings.classifier.kind}) runs vLLM in this "
            "process, and vllm is not installed here (`scripts/bootstrap full` installs it); "
            "classifier.reasoner: remote uses a served fleet instead"
        )


def describe(settings: Settings, prepared: Prepared) -> str:
    """The start-up line: what decides, with which policies, between which topics, how."""
    c = settings.classifier
    classifier = prepared.classifier.name if prepared.classifier is not None else c.kind
    engine = "none"
    if c.reasoner_place is not None:
        engine = f"{c.reasoner_place} {settings.engine.get('model', 'openai/gpt-oss-safeguard-20b')}"
    elif c.kind == "plugin":
        engine = f"plugin {c.factory}"
    policies = policy_summary(prepared.policies.get().values())
    k = settings.kafka
    return (
        f"starting: classifier {classifier} (kind {c.kind}, engine {engine}); policies {policies}; "
        f"input {', '.join(k.input_topics)} as group {k.group_id}; verdicts to {k.verdict_topic}, "
        f"dead letters to {k.dead_letter_topic}; delivery {settings.pipeline.delivery}"
    )


# Up to this many policies are named with their versions in the start-up line; more are counted.
NAMED_POLICIES = 20


def policy_summary(policies: Iterable[Policy]) -> str:
    """The policies in force for the start-up line: `id@version, ...` while they are few, else
    counted, so that a thousand communities' policies do not make it a thousand names long:
    "12 platform policies, 1,000 community policies in 1,000 communities, 3 shadow candidates"."""
    found = sorted(policies, key=lambda p: p.key)
    if len(found) <= NAMED_POLICIES:
        return ", ".join(f"{p.key}@{p.version}" for p in found)
    candidates = [p for p in found if p.shadow_of is not None]
    live = [p for p in found if p.shadow_of is None]
    platform = sum(1 for p in live if p.community is None)
    communities = {p.community for p in live if p.community is not None}
    parts = [_count(platform, "platform policy", "platform policies"),
             f"{_count(len(live) - platform, 'community policy', 'community policies')} in "
             f"{_count(len(communities), 'community', 'communities')}"]  # fmt: skip
    if candidates:
        parts.append(_count(len(candidates), "shadow candidate", "shadow candidates"))
    return ", ".join(parts)


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"
