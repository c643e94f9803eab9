"""Configuration: one YAML file plus `SAFEGUARD_`-prefixed environment overrides.

Nested keys use `__` in the environment (`SAFEGUARD_KAFKA__BOOTSTRAP_SERVERS=...`); the
environment wins over the file. Unknown keys are errors, so a typo never silently falls
back to a default. `ConfigError` messages name the key and the problem, never the value,
so a secret such as `sasl.password` cannot leak through an error or a log line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from consumer.config.cascade import CascadeSettings
from consumer.config.chat import ChatSettings
from consumer.config.exceptions import ConfigError
from consumer.config.review import ReviewSettings
from consumer.config.shadow import ShadowSettings
from consumer.config.sinks import SinksSettings

# Any key whose name looks like a secret, misspellings included (`sasl.pasword` is still a
# password): hiding a harmless value costs little, printing a password costs a rotation. Not
# every OAuth key is secret (`sasl.oauthbearer.method`, `.client.id`, `.scope` are what an
# operator checks): only its free-form `config` and `extensions`, which may carry one.
_SECRET_KEY = re.compile(
    r"pass|pasw|pswd|pwd|secret|secr|(^|[._-])key($|[._-])|api.?key|token($|[._-])|credential|jaas|private"
    r"|oauthbearer\.(config|extensions)",
    re.IGNORECASE,
)
# SAFEGUARD_* variables read by the scripts and tests, not settings.
TOOL_VARIABLES = frozenset(
    {"SAFEGUARD_CACHE_DIR", "SAFEGUARD_VENV", "SAFEGUARD_KEEP_KAFKA_DATA", "SAFEGUARD_BENCH_PEER_PYTHON",
     "SAFEGUARD_BOOTSTRAP_REPOINT"}
)  # fmt: skip
ENV_PREFIX = "SAFEGUARD_"

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_topic_patterns(topics: Iterable[str]) -> None:
    """Topic entries starting with `^` are regular expressions (as librdkafka reads them): each must compile."""
    for topic in topics:
        if topic.startswith("^"):
            try:
                re.compile(topic)
            except re.error as exc:
                raise ValueError(f"{topic!r} is not a valid regular expression ({exc})") from None


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "safeguard-consumer"
    input_topics: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["content-events"],
        description="topic names; an entry starting with ^ is a regular expression",
    )
    verdict_topic: str = "verdicts"
    dead_letter_topic: str = "dead-letters"
    startup_timeout_s: float = Field(
        default=30.0, gt=0, description="brokers unreachable this long at start: one ERROR line and exit 1"
    )
    common: dict[str, Any] = Field(
        default_factory=dict, description="librdkafka options for both clients (security.protocol, sasl.*, ssl.*)"
    )
    consumer: dict[str, Any] = Field(default_factory=dict, description="librdkafka consumer options")
    producer: dict[str, Any] = Field(default_factory=dict, description="librdkafka producer options")

    @property
    def consumer_options(self) -> dict[str, Any]:
        return {**self.common, **self.consumer}

    @property
    def producer_options(self) -> dict[str, Any]:
        return {**self.common, **self.producer}

    @field_validator("input_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        # The environment gives a plain string: "a,b" or "^chat-.*".
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("input_topics")
    @classmethod
    def _topics_valid(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one input topic is required")
        check_topic_patterns(value)
        return value


class PipelineSettings(_Section):
    max_in_flight_events: int = Field(default=5000, ge=1, description="records consumed but not yet committed")
    max_in_flight_bytes: int = Field(default=64 << 20, ge=1024)
    max_payload_bytes: int = Field(default=1 << 20, ge=1, description="larger values become dead letters")
    commit_interval_s: float = Field(default=1.0, gt=0)
    shutdown_deadline_s: float = Field(default=30.0, gt=0, description="drain time on SIGTERM/SIGINT")
    revoke_drain_s: float = Field(default=10.0, ge=0, description="drain time for revoked partitions")
    max_batch_size: int = Field(default=64, ge=1)
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    max_batch_tokens: int = Field(
        default=8192, ge=1, description="estimated prompt tokens per micro-batch (vLLM's max_num_batched_tokens)"
    )
    completion_tokens_estimate: int = Field(
        default=512, ge=0, description="KV-cache tokens each request in flight is assumed to add for its answer"
    )
    adaptive_latency_target_ms: float | None = Field(
        default=None,
        gt=0,
        description="classifier latency target; when set, the batcher's concurrency limit follows it (AIMD) below the capacity",
    )
    classify_timeout_s: float = Field(default=120.0, gt=0, description="per-request deadline")
    outage_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="a dependency (the reasoner, ...) down this long stops the run (exit 1); null: wait for it",
    )
    delivery_retries: int = Field(default=3, ge=0, description="re-sends after a retriable delivery error")
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once", description="exactly_once: Kafka transactions; readers use read_committed"
    )
    transactional_id: str | None = Field(
        default=None, description="exactly_once: unique per instance, stable across its restarts (default group-host)"
    )
    transaction_max_records: int = Field(default=1000, ge=1, description="exactly_once: commit early at this many")


DecodeFormat = Literal["json", "avro", "protobuf", "json_schema"]
REGISTRY_FORMATS = ("avro", "protobuf", "json_schema")


class TopicDecode(_Section):
    """How the records of some input topics are read, where they differ from `decode`'s own."""

    format: DecodeFormat = Field(
        default="json", description="json, or through schema_registry: avro, protobuf, json_schema (docs/registry.md)"
    )
    message_type: str | None = Field(
        default=None, description="protobuf: the generated message class the producers use, module:Class"
    )
    field_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="ContentEvent field -> dotted path (a.b.c) or JSON pointer (/a/b/c) in the input",
    )

    @field_validator("field_mapping")
    @classmethod
    def _mapping_targets_exist(cls, value: dict[str, str]) -> dict[str, str]:
        from consumer.events import ContentEvent

        for target in value:
            if target not in ContentEvent.model_fields or target == "schema_version":
                raise ValueError(f"{target!r} is not a ContentEvent field")
        return value

    @model_validator(mode="after")
    def _protobuf_names_its_message(self) -> TopicDecode:
        if self.format == "protobuf" and not self.message_type:
            raise ValueError("format protobuf needs message_type (module:Class, the generated message class)")
        if self.message_type is not None and ":" not in self.message_type:
            raise ValueError(f"message_type must be module:Class, not {self.message_type!r}")
        return self


class DecodeSettings(TopicDecode):
    topics: dict[str, TopicDecode] = Field(
        default_factory=dict,
        description="input topic (^ entries are regexes) -> its own format and field_mapping",
    )

    @field_validator("topics")
    @classmethod
    def _patterns_valid(cls, value: dict[str, TopicDecode]) -> dict[str, TopicDecode]:
        check_topic_patterns(value)
        return value


class SchemaRegistrySettings(_Section):
    """The Schema Registry the registry formats read their schemas from (confluent-kafka's client)."""

    url: str | None = Field(default=None, description="e.g. https://registry:8081 (comma-separated for several)")
    username: str | None = Field(default=None, description="basic auth")
    password: str | None = Field(default=None, description="basic auth")
    ssl_ca_location: str | None = Field(default=None, description="CA certificate file (PEM) for https")
    ssl_certificate_location: str | None = Field(default=None, description="client certificate (PEM), mutual TLS")
    ssl_key_location: str | None = Field(default=None, description="client key (PEM), mutual TLS")
    timeout_s: float = Field(default=10.0, gt=0, description="one HTTP request")
    retry_s: float = Field(
        default=5.0, ge=0, description="retry an unreachable registry this long, then: unavailable (no dead letter)"
    )
    client: dict[str, Any] = Field(
        default_factory=dict, description="other SchemaRegistryClient properties passed through (bearer.auth.*, ...)"
    )


ROUTABLE_FIELDS = ("content_type", "community_id", "context_id", "author_id")


class Route(_Section):
    topics: list[str] = Field(default_factory=list, description="empty: any topic; ^ entries are regexes")
    where: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="event field (content_type, community_id, context_id, author_id, metadata.KEY) -> value(s)",
    )
    policies: list[str] = Field(min_length=1)

    @field_validator("where")
    @classmethod
    def _fields_routable(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for name in value:
            if name not in ROUTABLE_FIELDS and not name.startswith("metadata."):
                raise ValueError(f"cannot route on {name!r}; use one of {', '.join(ROUTABLE_FIELDS)} or metadata.KEY")
        return value


class PolicySettings(_Section):
    directory: Path = Path("policies")
    routes: list[Route] = Field(default_factory=list)
    match: Literal["first", "all"] = "all"
    default: str | None = Field(default=None, description="policy for events no route matches")
    reload_interval_s: float = Field(default=2.0, ge=0, description="how often to look for edits; 0: never")
    max_tokens: int = Field(default=1500, ge=1, description="policies longer than this are rejected")
    topic: str | None = Field(
        default=None, min_length=1, description="compacted Kafka topic of policies, followed live beside the files"
    )


ReasonerPlace = Literal["in_process", "remote"]


class ClassifierSettings(_Section):
    kind: Literal["keyword", "reasoner", "cascade", "plugin", "vllm"] = Field(
        default="keyword", description="reasoner: gpt-oss-safeguard alone; 'vllm' is the deprecated name of 'reasoner'"
    )
    reasoner: Literal["in_process", "remote", "none", "vllm"] | None = Field(
        default=None,
        description="where gpt-oss-safeguard runs, for kind reasoner (default in_process) and cascade (default "
        "none: the cheap stages answer alone); the `engine:` section holds that engine's settings",
    )
    factory: str | None = Field(default=None, description="module:callable, for kind=plugin")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")

    @model_validator(mode="after")
    def _plugin_needs_factory(self) -> ClassifierSettings:
        if self.kind == "plugin" and not self.factory:
            raise ValueError("kind 'plugin' needs classifier.factory ('module:callable')")
        return self

    @property
    def reasoner_place(self) -> ReasonerPlace | None:
        """Where the reasoner runs, None when this classifier has none: the one reading of
        `classifier.kind` and `classifier.reasoner` (after `resolve_reasoner_place`)."""
        if self.kind in ("reasoner", "cascade") and self.reasoner in ("in_process", "remote"):
            return self.reasoner  # type: ignore[return-value]
        return None


def resolve_reasoner_place(classifier: ClassifierSettings, engine: dict[str, Any]) -> list[str]:
    """Say where the reasoner runs in `classifier.reasoner` alone: the deprecated spellings
    (`classifier.kind: vllm`, `classifier.reasoner: vllm`, `engine.kind`) are rewritten in place,
    `engine.kind` leaves the engine's settings. Returns one deprecation line per old key met;
    raises ValueError for a pair that cannot run."""
    notes = []
    legacy = engine.pop("kind", None)
    if legacy is not None:
        if legacy not in ("in_process", "remote"):
            raise ValueError(
                f"engine.kind: must be in_process or remote (deprecated: say classifier.reasoner), not {legacy!r}"
            )
        notes.append(f"engine.kind is deprecated: say classifier.reasoner: {legacy}")
    if classifier.kind == "vllm":
        notes.append(f"classifier.kind: vllm is deprecated: say classifier.kind: reasoner with classifier.reasoner: "
                     f"{legacy or 'in_process'}")  # fmt: skip
        classifier.kind = "reasoner"
    if classifier.reasoner == "vllm":
        notes.append(f"classifier.reasoner: vllm is deprecated: say classifier.reasoner: {legacy or 'in_process'}")
        classifier.reasoner = legacy or "in_process"
    if classifier.kind == "reasoner":
        if classifier.reasoner == "none":
            raise ValueError("classifier.reasoner: kind reasoner needs in_process or remote, not none")
        classifier.reasoner = classifier.reasoner or legacy or "in_process"
    elif classifier.kind == "cascade":
        classifier.reasoner = classifier.reasoner or "none"
    elif classifier.reasoner not in (None, "none"):
        raise ValueError(f"classifier.reasoner: kind {classifier.kind} has no reasoner; use kind reasoner or cascade")
    else:
        classifier.reasoner = "none"
    return notes


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field(default="json", description="json lines carry trace and span ids")


class TelemetrySettings(_Section):
    """Tracing itself is configured by the standard OTEL_* environment variables."""

    http_host: str = Field(default="127.0.0.1", description="use 0.0.0.0 in containers so probes reach it")
    http_port: int | None = Field(default=8080, ge=0, le=65535, description="/metrics, /healthz, /readyz; null: off")
    trace_content: bool = Field(default=False, description="put message content in span attributes")
    statistics_interval_ms: int = Field(default=5000, ge=0, description="librdkafka stats (consumer lag); 0: off")
    heartbeat_timeout_s: float = Field(default=30.0, gt=0, description="/healthz fails when the loop stalls this long")
    engine_health_interval_s: float = Field(default=10.0, gt=0, description="how often the engine's health is checked")
    community_labels: int = Field(
        default=20, ge=0, description="drift metrics: the top N communities by volume get a label, the rest: other"
    )
    community_rank_interval_s: float = Field(
        default=60.0, gt=0, description="drift metrics: how often the communities are ranked by their volume"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SAFEGUARD_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    policies: PolicySettings = Field(default_factory=PolicySettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the engine classifier.reasoner names: in_process (consumer.classify.engine."
        "EngineSettings) or remote (consumer.classify.engine.RemoteSettings)",
    )
    log: LogSettings = Field(default_factory=LogSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    sinks: SinksSettings = Field(default_factory=SinksSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)

    @model_validator(mode="after")
    def _registry_formats_need_a_registry(self) -> Settings:
        formats = {self.decode.format, *(t.format for t in self.decode.topics.values())}
        if formats & set(REGISTRY_FORMATS) and not self.schema_registry.url:
            raise ValueError("decode.format avro, protobuf or json_schema needs schema_registry.url")
        return self

    @model_validator(mode="after")
    def _registered_outputs_need_their_own_subjects(self) -> Settings:
        registered = self.sinks.registered_outputs
        if registered and not self.schema_registry.url:
            raise ValueError("sinks.registered_outputs needs schema_registry.url")
        # One subject per topic (the topic name strategy): two kinds of output on one topic cannot both have it.
        one_topic = self.kafka.verdict_topic == self.kafka.dead_letter_topic
        if {"verdict", "dead_letter"} <= set(registered) and one_topic:
            raise ValueError("sinks.registered_outputs: verdict and dead_letter need two topics "
                             "(kafka.verdict_topic and kafka.dead_letter_topic are the same)")  # fmt: skip
        # Readers and writers of ours that still take these topics as plain JSON: not yet with them.
        if registered and self.review.enabled:
            raise ValueError("sinks.registered_outputs is not supported with review.enabled yet (the review loop "
                             "writes corrected verdicts and dead letters as plain JSON)")  # fmt: skip
        if "verdict" in registered and self.chat.offender_thresholds and self.chat.rebuild_records:
            raise ValueError("sinks.registered_outputs: verdict is not supported with chat.offender_thresholds "
                             "and chat.rebuild_records yet (the rebuild reads the verdict topic as plain JSON)")
        return self

    @model_validator(mode="after")
    def _reasoner_said_once(self) -> Settings:
        for note in resolve_reasoner_place(self.classifier, self.engine):
            log.warning("%s", note)
        return self

    @model_validator(mode="after")
    def _exactly_once_reads_committed(self) -> Settings:
        # Our own readers (the review loop, the console, the chat rebuild) take kafka.consumer:
        # read_uncommitted would show them the outputs of aborted transactions (phantom reviews).
        if self.pipeline.delivery == "exactly_once":
            for section in ("consumer", "common"):
                if str(getattr(self.kafka, section).get("isolation.level", "")).lower() == "read_uncommitted":
                    raise ValueError(f"kafka.{section}.isolation.level: read_uncommitted is not allowed with "
                                     "pipeline.delivery exactly_once (readers would see aborted outputs)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _files_need_at_least_once(self) -> Settings:
        # A file cannot join a Kafka transaction: its lines would be visible before (or without) the commit.
        if self.sinks.files and self.pipeline.delivery == "exactly_once":
            raise ValueError("sinks.files needs pipeline.delivery at_least_once (a file cannot join a transaction)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment overrides it.
        return (env_settings, init_settings)


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the YAML file (if any), apply the environment and `overrides`, validate."""
    unknown = unknown_environment_keys()
    if unknown:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unknown))
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    from_environment = environment_keys()
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, from_environment)) from None
    except SettingsError as exc:
        # e.g. a SAFEGUARD_* variable holding a list or mapping that is not valid JSON
        raise ConfigError(f"environment: {exc}") from None
    if path is not None and not settings.policies.directory.is_absolute():
        # Relative policy paths are relative to the config file, not the working directory.
        candidate = (path.parent / settings.policies.directory).resolve()
        if candidate.exists():
            settings.policies.directory = candidate
    return settings


def format_validation_error(
    exc: ValidationError, path: Path | None, from_environment: dict[str, str] | None = None
) -> str:
    """One line per problem, each naming where the key came from: the environment variable
    that set it, else the file."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        parts = [str(part) for part in error["loc"]]
        key = ".".join(parts) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        variable = _variable_for(parts, from_environment or {})
        source = f"environment variable {variable}: " if variable else (f"{path}: " if path else "")
        lines.append(f"{source}{key}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def environment_keys(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Dotted settings key (lower case) -> the SAFEGUARD_* variable that sets it."""
    environ = os.environ if environ is None else environ
    keys = {}
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in TOOL_VARIABLES:
            keys[".".join(upper[len(ENV_PREFIX) :].lower().split("__"))] = name
    return keys


def unknown_environment_keys(environ: dict[str, str] | None = None) -> list[str]:
    """A problem line for each SAFEGUARD_* variable that names no setting (pydantic-settings
    would ignore it silently: a typo must not fall back to a default)."""
    problems = []
    for dotted, name in sorted(environment_keys(environ).items()):
        model: type[BaseModel] = Settings
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                known = ", ".join(model.model_fields)
                where = ".".join(parts[:depth]) or "the top level"
                problems.append(f"environment variable {name}: unknown key {'.'.join(parts[: depth + 1])!r} "
                                f"(keys of {where}: {known})")  # fmt: skip
                break
            annotation = field.annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break  # a scalar, list or mapping (librdkafka options): the value is pydantic's to check
            model = annotation
    return problems


def _variable_for(parts: list[str], from_environment: dict[str, str]) -> str | None:
    for depth in range(len(parts), 0, -1):
        variable = from_environment.get(".".join(parts[:depth]).lower())
        if variable:
            return variable
    return None


def looks_secret(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact(options: Any) -> Any:
    """A copy safe to print or log: the value of every key that looks like a secret replaced,
    at any depth (librdkafka options, plugin options, engine settings)."""
    if isinstance(options, dict):
        return {k: ("***" if looks_secret(str(k)) and v not in (None, "") else redact(v)) for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    # "section.key": librdkafka option names contain dots, so only the first one splits.
    section, _, key = dotted.partition(".")
    data.setdefault(section, {})[key] = value
