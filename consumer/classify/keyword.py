"""The keyword classifier: each policy's `patterns` as case-insensitive regular expressions."""

from __future__ import annotations

import re

from consumer.classify import Capacity, Classification, ClassifyRequest


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
                    rationale=f"matched pattern /{pattern.pattern}/",  # as written, not repr's doubled backslashes
                    model=self.name,
                )
        return Classification(violation=False, rationale="no pattern matched", model=self.name)

    async def close(self) -> None:
        return None
