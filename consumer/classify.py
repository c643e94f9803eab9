"""The boundary between the pipeline and any engine: the `Classifier` Protocol.

The pipeline hands a classifier one (event, policy) request at a time, as many concurrently
as the classifier's `capacity()` allows, and gets back a `Classification` or a
`ClassificationFailed` naming the dead-letter error type. Implementations: `KeywordClassifier`
(below, deterministic pattern matching from the policy's `patterns`), the vLLM engine
(`consumer.engine`), the cascade of cheap stages in front of it (`consumer.cascade`), and
any user class loaded with `classifier.kind: plugin`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from consumer.events import ContentEvent, ErrorType
from consumer.policy import Policy

if TYPE_CHECKING:
    from consumer.config import Settings
    from consumer.policy import PolicyStore


@dataclass(slots=True)  # not frozen: one is made per (record, policy), and frozen costs 3x to build
class ClassifyRequest:
    event: ContentEvent
    policy: Policy
    request_id: str
    deadline: float | None = None  # time.monotonic() after which the request is abandoned


@dataclass
class Classification:
    violation: bool
    category: str | None = None
    rule_ids: list[str] = field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None
    reasoning: str | None = None
    model: str = "unknown"
    stage: str | None = None  # which stage of a cascade decided: cache, lexical, embedding, reasoner, undecided
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class ClassificationFailed(Exception):
    """A request that cannot produce a verdict; becomes a dead letter of `error_type`."""

    def __init__(self, error_type: ErrorType, message: str, raw_output: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.error_type = error_type
        self.raw_output = raw_output
        self.attempts = attempts


@dataclass(frozen=True)
class Capacity:
    """How much work the classifier can hold at once; the batcher never exceeds it."""

    max_sequences: int
    max_tokens: int | None = None  # KV-cache tokens, when the engine knows them


@runtime_checkable
class Classifier(Protocol):
    name: str

    async def start(self) -> None: ...

    def capacity(self) -> Capacity: ...

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Classify one request; raise ClassificationFailed when no verdict is possible."""
        ...

    async def close(self) -> None: ...


# A classifier may also offer `classify_now(request) -> Classification | None`: an answer it
# can give at once, without waiting (a keyword match, a cache hit), or None to be asked
# through the batcher. The pipeline then skips the batcher and its queueing for that request.
ClassifyNow = Callable[[ClassifyRequest], "Classification | None"]


class KeywordClassifier:
    """Flags content matching any of a policy's `patterns` (case-insensitive regular expressions).

    Deterministic and instant: for pipelines without a model, for tests, and as a baseline.
    A policy without patterns never flags anything.
    """

    name = "keyword"

    def __init__(self, max_concurrency: int = 1024) -> None:
        self._max_concurrency = max_concurrency
        self._compiled: dict[str, list[re.Pattern[str]]] = {}

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self._max_concurrency)

    async def classify(self, request: ClassifyRequest) -> Classification:
        return self.classify_now(request)

    def classify_now(self, request: ClassifyRequest) -> Classification:
        policy = request.policy
        patterns = self._compiled.get(policy.ref)
        if patterns is None:
            patterns = [re.compile(p, re.IGNORECASE) for p in policy.patterns]
            self._compiled[policy.ref] = patterns
        for pattern in patterns:
            if pattern.search(request.event.content):
                return Classification(
                    violation=True,
                    category=next(iter(policy.categories), None),
                    confidence="high",
                    rationale=f"matched pattern {pattern.pattern!r}",
                    model=self.name,
                )
        return Classification(violation=False, rationale="no pattern matched", model=self.name)

    async def close(self) -> None:
        return None


def load_plugin(factory: str, options: dict[str, Any]) -> Classifier:
    """Build a classifier from `module:callable`, called with the configured options."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"classifier.factory must look like 'module:callable', not {factory!r}")
    target = getattr(importlib.import_module(module_name), attr)
    classifier = target(**options)
    if not isinstance(classifier, Classifier):
        raise TypeError(f"{factory} did not return a Classifier (needs name, start, capacity, classify, close)")
    return classifier


def build_classifier(settings: Settings, policies: PolicyStore) -> Classifier:
    """The classifier the `classifier` section names; raises ConfigError naming the key at fault."""
    from pydantic import ValidationError

    from consumer.config import ConfigError, format_validation_error

    c = settings.classifier
    try:
        if c.kind == "keyword":
            return KeywordClassifier(**c.options)
        if c.kind == "plugin":
            assert c.factory is not None
            return load_plugin(c.factory, c.options)
        if c.kind == "vllm":
            return _vllm(settings)
        from consumer.cascade import make_cascade

        return make_cascade(settings.cascade, _vllm(settings) if c.reasoner == "vllm" else None, policies)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, None).replace("\n  ", "\n  engine.")) from None
    except (ImportError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"classifier ({c.kind}): {exc}") from None


def _vllm(settings: Settings) -> Classifier:
    from consumer.engine import EngineSettings, make_vllm_classifier

    return make_vllm_classifier(EngineSettings(**settings.engine))
