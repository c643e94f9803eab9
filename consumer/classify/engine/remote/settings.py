"""Settings of the remote reasoner: `classifier.reasoner: remote`, gpt-oss-safeguard on a served fleet.

Plain pydantic, no HTTP client and no harmony import, so the config loader validates the
`engine:` section anywhere. API keys are never settings: an endpoint names the environment
variable that holds its key (`api_key_env`), read when the classifier starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Priority = Literal["live", "low"]


class EndpointSettings(BaseModel):
    """One OpenAI-compatible server (or a load balancer in front of several)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    url: str = Field(description="base URL of the OpenAI API, ending in /v1 (http://vllm-0.vllm:8000/v1)")
    api: Literal["completions", "chat"] = Field(
        default="completions",
        description="completions: the harmony prompt as token ids to /completions (vLLM, servers that take "
        "token ids); chat: /chat/completions with the policy as the system message (hosted providers)",
    )
    model: str | None = Field(default=None, description="the served model name; defaults to engine.model")
    name: str | None = Field(default=None, description="name in logs and figures; defaults to host:port")
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the bearer token (the key itself is never configured)"
    )
    max_concurrency: int = Field(
        default=64,
        ge=1,
        description="most requests this consumer keeps in flight on the endpoint; the learned limit stays below it",
    )
    metrics_url: str | None = Field(
        default=None,
        description="vLLM's Prometheus endpoint; default <server root>/metrics for api=completions, none for chat. "
        "Running and waiting requests and KV-cache use there steer the endpoint's concurrency",
    )
    priority_scheduling: bool = Field(
        default=False,
        description="the server runs vLLM's --scheduling-policy priority: low traffic carries `priority` and may "
        "use the whole limit; otherwise it takes engine.low_priority_share of it. The server cannot be asked "
        "(vLLM 0.32 accepts and ignores the field under fcfs), so say it here",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).netloc

    @property
    def resolved_metrics_url(self) -> str | None:
        if self.metrics_url is not None:
            return self.metrics_url or None  # "" turns it off
        if self.api != "completions":
            return None
        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        return f"{root}/metrics"


class RemoteSettings(BaseModel):
    """Validated settings of the remote reasoner; unknown keys are errors, as for the in-process engine."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    endpoints: list[EndpointSettings] = Field(min_length=1)
    model: str = Field(default="openai/gpt-oss-safeguard-20b", description="served model name, and verdicts' `model`")
    max_tokens: int = Field(default=2048, gt=0, description="completion cap: reasoning plus the final answer")
    temperature: float = Field(default=1.0, ge=0)
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="longest one attempt may run when the request carries no earlier deadline"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(
        default=4, ge=1, description="endpoint attempts per completion; after a failure the next goes elsewhere"
    )
    max_unparseable_retries: int = Field(default=1, ge=0, description="new completions after an unparseable answer")
    endpoint_backoff_s: float = Field(
        default=0.5, gt=0, description="first pause of an endpoint after a failure; doubles per failure in a row"
    )
    endpoint_backoff_max_s: float = Field(default=30.0, gt=0)
    priority: Priority = Field(
        default="live", description="live traffic outranks low (replays, backfills); `replay` runs low by default"
    )
    low_priority_value: int = Field(
        default=10, description="vLLM `priority` of low traffic (lower runs earlier; live sends 0, the default)"
    )
    low_priority_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="share of each endpoint's concurrency that low traffic uses where the server has no "
        "priority scheduling",
    )
    metrics_interval_s: float = Field(default=1.0, gt=0, description="how often each endpoint's /metrics is read")
    kv_cache_high: float = Field(
        default=0.90, gt=0, le=1, description="KV-cache use above which an endpoint counts as full"
    )
    latency_target_ms: float | None = Field(
        default=None,
        gt=0,
        description="for endpoints without /metrics: per-endpoint AIMD on latency (else the ceiling, and the "
        "batcher's pipeline.adaptive_latency_target_ms)",
    )
    policy_role: Literal["system", "developer"] = Field(
        default="system", description="api=chat: the role of the message that carries the policy"
    )
    keep_reasoning: bool = Field(default=False, description="copy the reasoning into verdicts (audit only)")

    @model_validator(mode="after")
    def _backoff_order(self) -> RemoteSettings:
        if self.endpoint_backoff_max_s < self.endpoint_backoff_s:
            raise ValueError("endpoint_backoff_max_s must be at least endpoint_backoff_s")
        return self

    @property
    def model_name(self) -> str:
        return self.model

    def unset_key_variables(self, environ: Mapping[str, str]) -> list[str]:
        """A problem line for each endpoint whose `api_key_env` names a variable not set in `environ`."""
        return [
            f"engine.endpoints[{i}].api_key_env: the environment variable {e.api_key_env} (the key of {e.label}) "
            "is not set"
            for i, e in enumerate(self.endpoints)
            if e.api_key_env is not None and not environ.get(e.api_key_env)
        ]
