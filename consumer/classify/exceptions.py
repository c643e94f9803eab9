"""The classify layer's errors, each in the consumer's family (`consumer.errors`).

- `ClassificationFailed` is a `RecordFault`: this (event, policy) request cannot produce a
  verdict and becomes a dead letter of its `error_type`; the records after it go on.
- `EngineUnavailable`, `CascadeUnavailable`, `EmbeddingUnavailable` are `Fatal` despite their
  names: a library or model the configured classifier needs is not installed here, which no
  wait repairs (they stay `RuntimeError`s too, as callers have caught them).
"""

from __future__ import annotations

from consumer.errors import Fatal, RecordFault
from consumer.events import ErrorType


class ClassificationFailed(RecordFault):
    """A request that cannot produce a verdict; becomes a dead letter of `error_type`."""

    def __init__(self, error_type: ErrorType, message: str, raw_output: str | None = None, attempts: int = 1):
        super().__init__(error_type, message)
        self.raw_output = raw_output
        self.attempts = attempts


class EngineUnavailable(Fatal, RuntimeError):
    """vLLM (or openai_harmony) is not installed in this environment."""


class CascadeUnavailable(Fatal, RuntimeError):
    """A configured stage's libraries are not installed in this environment."""


class EmbeddingUnavailable(Fatal, RuntimeError):
    """sentence-transformers (or the configured model) is not available."""
