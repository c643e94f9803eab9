"""Classifiers for tests, loadable with `classifier.kind: plugin` (also in a subprocess)."""

from __future__ import annotations

import asyncio
import base64
import random
import time

from consumer.classify import Capacity, Classification, ClassifyRequest
from consumer.errors import Fatal, Unavailable


class SlowClassifier:
    """Says "no violation" after `delay_s`; flags content containing `flag_word`."""

    name = "slow-test"

    def __init__(self, delay_s: float = 0.0, max_concurrency: int = 64, flag_word: str = "badword"):
        self.delay_s = delay_s
        self.max_concurrency = max_concurrency
        self.flag_word = flag_word
        self.calls = 0
        self.requests: list[ClassifyRequest] = []
        self.active = 0
        self.peak = 0  # most requests in progress at once

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self.max_concurrency)

    async def classify(self, request: ClassifyRequest) -> Classification:
        self.calls += 1
        self.requests.append(request)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.active -= 1
        violation = self.flag_word in request.event.content
        return Classification(violation=violation, category="test" if violation else None, model=self.name)

    async def close(self) -> None:
        return None


def slow(delay_s: float = 0.0, max_concurrency: int = 64) -> SlowClassifier:
    return SlowClassifier(delay_s=delay_s, max_concurrency=max_concurrency)


class FlakyClassifier:
    """Misbehaves on a fixed 10% of events, chosen by content: `raise` (always raises),
    `hang` (never answers), `garbage` (answers something that is not a Classification),
    and `transient` (raises on the first attempt only). Everything else is instant."""

    name = "flaky-test"

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=64)

    async def classify(self, request: ClassifyRequest) -> Classification:
        content = request.event.content
        self.attempts[request.request_id] = self.attempts.get(request.request_id, 0) + 1
        if content.startswith("raise"):
            raise RuntimeError("engine exploded")
        if content.startswith("hang"):
            await asyncio.sleep(3600)
        if content.startswith("garbage"):
            return {"violation": "maybe"}  # type: ignore[return-value]
        if content.startswith("transient") and self.attempts[request.request_id] == 1:
            raise ConnectionError("first attempt fails")
        return Classification(violation=False, model=self.name)

    async def close(self) -> None:
        return None


class OutageClassifier:
    """Answers at once, except while `down` (from the start, or once `down_after` requests were
    answered): then every request raises `Unavailable("reasoner")`, as the remote reasoner does
    when no endpoint of its fleet answers. No probe: the records waiting are retried at the hint,
    and the first one answered says the reasoner is back."""

    name = "outage-test"

    def __init__(self, down: bool = False, down_after: int | None = None) -> None:
        self.down = down
        self.down_after = down_after
        self.refused = 0  # requests that found it down
        self.answered = 0

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=32)

    async def classify(self, request: ClassifyRequest) -> Classification:
        await asyncio.sleep(0.005)  # a classification takes a moment, so an outage finds records in flight
        if self.down_after is not None and self.answered >= self.down_after:
            self.down, self.down_after = True, None
        if self.down:
            self.refused += 1
            raise Unavailable("reasoner", "no endpoint of the stand-in fleet answers", retry_after_s=0.1)
        self.answered += 1
        return Classification(violation=False, model=self.name)

    async def close(self) -> None:
        return None


class DeadEngineClassifier(OutageClassifier):
    """Answers `dies_after` requests, then raises `Fatal` for every request, as the in-process engine
    does once its core died (by count, not by a test's timing: a fast run must not finish first)."""

    name = "dead-engine-test"

    def __init__(self, dies_after: int) -> None:
        super().__init__()
        self.dies_after = dies_after

    async def classify(self, request: ClassifyRequest) -> Classification:
        if self.answered >= self.dies_after:
            raise Fatal("the vLLM engine core died")
        return await super().classify(request)


class UnserialisableClassifier:
    """Answers with a rationale no JSON encoder takes: a bug on the output path, which must
    cost that record only (a dead letter) and log one ERROR inside the record's span."""

    name = "unserialisable"

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=8)

    def classify_now(self, request: ClassifyRequest) -> Classification:
        return Classification(violation=False, rationale=object(), model=self.name)  # type: ignore[arg-type]

    async def classify(self, request: ClassifyRequest) -> Classification:
        return self.classify_now(request)

    async def close(self) -> None:
        return None


def unserialisable() -> UnserialisableClassifier:
    return UnserialisableClassifier()


class LongRationaleClassifier:
    """Flags content containing "explain" with a rationale of `rationale_bytes` of random text
    (which lz4 cannot shrink, so the broker sees its full size); instant."""

    name = "long-rationale-test"

    def __init__(self, rationale_bytes: int = 1_500_000):
        self.rationale_bytes = rationale_bytes

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=64)

    async def classify(self, request: ClassifyRequest) -> Classification:
        if "explain" not in request.event.content:
            return Classification(violation=False, model=self.name)
        noise = random.Random(request.event.event_id).randbytes(self.rationale_bytes)
        rationale = base64.b64encode(noise).decode()[: self.rationale_bytes]
        return Classification(violation=True, category="test", rationale=rationale, model=self.name)

    async def close(self) -> None:
        return None


class _StallBeforeCommit:
    """A transactional producer whose `commit_transaction` first flushes (the outputs are then
    on the broker, in the open transaction), writes `marker`, and never returns."""

    def __init__(self, producer: object, marker: str):
        self._producer = producer
        self._marker = marker

    def __getattr__(self, name: str) -> object:
        return getattr(self._producer, name)

    def __len__(self) -> int:  # outputs not yet delivered (a special method: __getattr__ does not see it)
        return len(self._producer)  # type: ignore[arg-type]

    def commit_transaction(self, *args: object) -> None:
        self._producer.flush()  # type: ignore[attr-defined]
        with open(self._marker, "w") as out:
            out.write("a transaction with outputs is open")
        time.sleep(3600)


def stall_in_transaction(marker: str, kind: str | None = None):
    """The keyword classifier, in a process whose first transaction with outputs (with `kind`:
    with an output of that kind, e.g. `review_item`) stalls just before its commit (exactly-once),
    so that a test can SIGKILL it with the transaction open."""
    from consumer.classify.keyword import KeywordClassifier
    from consumer.sinks import kafka as sink

    commit = sink.TransactionalSink._commit_transaction

    def stalled(self, consumer, batch, offsets):  # type: ignore[no-untyped-def]
        if batch and (kind is None or any(output.kind == kind for ticket in batch for output in self._held[ticket])):
            self._producer = _StallBeforeCommit(self._producer, marker)
        return commit(self, consumer, batch, offsets)

    sink.TransactionalSink._commit_transaction = stalled  # type: ignore[method-assign]
    return KeywordClassifier()


class SlowKeywordClassifier:
    """The keyword classifier (each policy's patterns) after `delay_s`, at most `max_concurrency`
    at once: policy-driven and deterministic like `keyword`, latency-bound like a served reasoner."""

    def __init__(self, delay_s: float, max_concurrency: int):
        from consumer.classify.keyword import KeywordClassifier

        self._keyword = KeywordClassifier()
        self.name = "slow-keyword-test"
        self.delay_s = delay_s
        self.max_concurrency = max_concurrency

    async def start(self) -> None:
        await self._keyword.start()

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self.max_concurrency)

    async def classify(self, request: ClassifyRequest) -> Classification:
        await asyncio.sleep(self.delay_s)
        return await self._keyword.classify(request)

    async def close(self) -> None:
        await self._keyword.close()


def slow_keyword(delay_s: float = 0.02, max_concurrency: int = 8) -> SlowKeywordClassifier:
    return SlowKeywordClassifier(delay_s=delay_s, max_concurrency=max_concurrency)


def stall_in_review_transaction(marker: str):
    """The keyword classifier, in a process whose review loop stalls (exactly-once) in its first
    transaction with outputs, just before its commit: corrected verdicts written, decision offsets
    sent, nothing committed; so that a test can SIGKILL it there."""
    from consumer.classify.keyword import KeywordClassifier
    from consumer.review.loop import ReviewLoop

    transact = ReviewLoop._transact

    def stalled(self, outputs, messages):  # type: ignore[no-untyped-def]
        if outputs:
            self._producer = _StallBeforeCommit(self._producer, marker)
        return transact(self, outputs, messages)

    ReviewLoop._transact = stalled  # type: ignore[method-assign]
    return KeywordClassifier()
