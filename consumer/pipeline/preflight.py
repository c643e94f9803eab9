"""The pre-flight: everything `run` checks before its first poll, shared with `check-config`.

`prepare` (offline): the policies load, the routes name loaded policies, librdkafka accepts
every passed-through option, and the classifier builds (the vLLM engine only has its
settings checked: loading it is not cheap). Each failure is a `ConfigError` naming the key.

`connect_and_check` (online, `run` and `check-config --connect`): the brokers answer within
`kafka.startup_timeout_s` (else `Unreachable`, exit 1), the input topics exist or a regex
matches, the output topics exist and may be written (else `TopicProblem`, exit 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from consumer.classify import Classifier
from consumer.classify.factory import build_classifier
from consumer.config import ConfigError, Settings, format_validation_error
from consumer.kafka import admin
from consumer.kafka.options import check_client_options
from consumer.policy import PolicyError, PolicyStore
from consumer.policy.route import Router, RoutingError

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
    try:
        policies = PolicyStore(directory, settings.policies.max_tokens)
    except PolicyError as exc:
        raise ConfigError(f"policies.directory: {exc}") from None
    if not policies.get():
        raise ConfigError(f"policies.directory: no policy files (*.md) in {directory}")
    try:
        Router(settings.policies, policies.get)
    except RoutingError as exc:
        raise ConfigError(str(exc)) from None  # it names policies.routes/default
    check_client_options(settings)
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


def connect_and_check(settings: Settings) -> list[str]:
    """The online checks; returns warnings. Raises `admin.Unreachable` or `admin.TopicProblem`."""
    cluster = admin.connect(settings)
    return admin.check_topics(cluster, settings)


def describe(settings: Settings, prepared: Prepared) -> str:
    """The start-up line: what decides, with which policies, between which topics, how."""
    c = settings.classifier
    classifier = prepared.classifier.name if prepared.classifier is not None else c.kind
    engine = "none"
    if c.reasoner_place is not None:
        engine = f"{c.reasoner_place} {settings.engine.get('model', 'openai/gpt-oss-safeguard-20b')}"
    elif c.kind == "plugin":
        engine = f"plugin {c.factory}"
    policies = ", ".join(f"{p.id}@{p.version}" for p in sorted(prepared.policies.get().values(), key=lambda p: p.id))
    k = settings.kafka
    return (
        f"starting: classifier {classifier} (kind {c.kind}, engine {engine}); policies {policies}; "
        f"input {', '.join(k.input_topics)} as group {k.group_id}; verdicts to {k.verdict_topic}, "
        f"dead letters to {k.dead_letter_topic}; delivery {settings.pipeline.delivery}"
    )
