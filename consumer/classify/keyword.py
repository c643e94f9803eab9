"""The keyword classifier: each policy's `patterns` as case-insensitive regular expressions."""

from __future__ import annotations

import re
from collections.abc import Sequence

from consumer.classify import Capacity, Classification, ClassifyRequest

_NO_MATCH = Classification(violation=False, rationale="no pattern matched", model="keyword")


class KeywordClassifier:
    """Flags content matching any of a policy's `patterns` (case-insensitive regular expressions).

    Deterministic and instant: for pipelines without a model, for tests, and as a baseline.
    A policy without patterns never flags anything.
    """

    name = "keyword"

    def __init__(self, max_concurrency: int = 1024) -> None:
        self._max_concurrency = max_concurrency
        # policy ref -> (any pattern at all, or None when the patterns cannot be joined; each pattern)
        self._compiled: dict[str, tuple[re.Pattern[str] | None, list[re.Pattern[str]]]] = {}

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self._max_concurrency)

    async def classify(self, request: ClassifyRequest) -> Classification:
        return self.classify_now(request)

    def classify_now_many(self, requests: Sequence[ClassifyRequest]) -> list[Classification]:
        return [self.classify_now(request) for request in requests]

    def classify_now(self, request: ClassifyRequest) -> Classification:
        policy = request.policy
        compiled = self._compiled.get(policy.ref)
        if compiled is None:
            compiled = self._compiled[policy.ref] = _compile(policy.patterns)
        any_pattern, patterns = compiled
        content = request.content
        if any_pattern is not None and any_pattern.search(content) is None:
            return _NO_MATCH  # most content: one search instead of one per pattern
        for pattern in patterns:
            if pattern.search(content):
                return Classification(
                    violation=True,
                    category=next(iter(policy.categories), None),
                    confidence="high",
                    rationale=f"matched pattern /{pattern.pattern}/",  # as written, not repr's doubled backslashes
                    model=self.name,
                )
        return _NO_MATCH

    async def close(self) -> None:
        return None


def _compile(sources: Sequence[str]) -> tuple[re.Pattern[str] | None, list[re.Pattern[str]]]:
    """Each pattern, and all of them as one alternation where that means the same (no groups,
    whose numbers a join would shift)."""
    patterns = [re.compile(p, re.IGNORECASE) for p in sources]
    if not patterns or any(p.groups for p in patterns):
        return None, patterns
    try:
        return re.compile("|".join(f"(?:{p})" for p in sources), re.IGNORECASE), patterns
    except re.error:  # e.g. a pattern's leading global flags, which only work at the start
        return None, patterns
