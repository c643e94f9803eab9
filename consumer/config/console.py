"""Settings of the review console (`review.console`): where it listens and who may use it."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


# What a person may do in the console (consumer.console.roles says which routes each one opens).
Role = Literal["moderator", "lead", "analyst", "admin"]


class Reviewer(BaseModel):
    """One person allowed to review; the id names them on every decision."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    token: SecretStr | None = Field(
        default=None,
        description="what they sign in with (identity tokens: required); keep it in the environment or a secret file",
    )
    role: Role = Field(
        default="moderator",
        description="moderator: the queues and decisions; lead: also escalations and overturns; "
        "analyst: dashboard and audit, read-only; admin: everything",
    )

    @field_validator("token")
    @classmethod
    def _not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # Stored as compared: a token read from a file with a trailing newline must still sign in, and an
        # unset shell variable (an empty token) must not sign in everyone.
        if token is None:
            return None
        stripped = token.get_secret_value().strip()
        if not stripped:
            raise ValueError("a reviewer's token must not be empty or blank")
        return SecretStr(stripped)


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="the console listens here; put a TLS proxy in front for others")
    port: int = Field(default=8095, ge=0, le=65535, description="0: any free port (printed at start)")
    identity: Literal["tokens", "header"] = Field(
        default="tokens",
        description="tokens: reviewers sign in with a token from `reviewers`; header: a proxy in front of the console "
        "authenticates them and names them in `header`",
    )
    reviewers: list[Reviewer] = Field(
        default_factory=list,
        description="tokens: who may sign in, and their roles; header: if set, the only names the header may carry "
        "(and their roles; without it everyone named is a moderator)",
    )
    header: str = Field(default="X-Forwarded-User", description="identity header: the header the proxy sets")
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="identity header: the addresses (CIDRs) of the proxies whose header is believed; "
        "a request from anywhere else is refused",
    )
    lease_s: float = Field(default=300.0, gt=0, description="how long an item shown to one reviewer is kept from others")
    session_idle_s: float = Field(default=12 * 3600.0, gt=0, description="a session unused this long signs out")
    secure_cookie: bool = Field(default=False, description="mark the session cookie Secure (behind HTTPS)")
    sign_in_attempts_per_minute: int = Field(
        default=10, ge=1, description="refused sign-ins allowed per client address per minute; more are refused (429)"
    )
    replicas: int = Field(
        default=1, ge=1, description="console processes sharing the review topic: each shows only its partitions"
    )
    replica: int = Field(
        default=0, ge=0, description="which of `replicas` this process is (0..replicas-1): it serves the review "
        "topic's partitions p with p % replicas == replica",
    )
    read_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's headers and body must arrive within this; a stalled one is closed"
    )
    metrics_url: str | None = Field(
        default=None, description="the consumer's /metrics (telemetry.http_port), read for the dashboard's policy "
        "health panel; unset: no panel",
    )

    @field_validator("metrics_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://consumer:8080/metrics)")
        return url

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ip_network(proxy)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an address or a network (CIDR, e.g. 10.0.0.0/8)") from None
        return proxies

    @model_validator(mode="after")
    def _distinct(self) -> ConsoleSettings:
        if self.replica >= self.replicas:
            raise ValueError(f"review.console.replica: {self.replica} is not below review.console.replicas "
                             f"({self.replicas})")  # fmt: skip
        ids = [r.id for r in self.reviewers]
        if len(set(ids)) != len(ids):
            raise ValueError("review.console.reviewers: reviewer ids must be distinct")
        if self.identity == "tokens":
            for n, reviewer in enumerate(self.reviewers):
                if reviewer.token is None:
                    raise ValueError(f"review.console.reviewers.{n}.token: required with identity tokens "
                                     f"({reviewer.id} could not sign in)")  # fmt: skip
        tokens = [r.token.get_secret_value() for r in self.reviewers if r.token is not None]
        if len(set(tokens)) != len(tokens):
            raise ValueError("review.console.reviewers: tokens must be distinct")
        return self
