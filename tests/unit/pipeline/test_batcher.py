"""The batcher's rules, through its public interface, with small classifiers that record what they see."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.classify import Capacity, Classification, ClassificationFailed, ClassifyRequest
from consumer.errors import Unavailable
from consumer.events import ContentEvent, ErrorType
from consumer.pipeline.batcher import Batcher
from consumer.policy import Policy

POLICY_A = Policy(id="a", version="1", text="Flag insults.\n" * 20)
POLICY_B = Policy(id="b", version="1", text="Flag spam and scams.\n" * 40)


def request(i: int, policy: Policy = POLICY_A, content: str = "hello there") -> ClassifyRequest:
    event = ContentEvent(event_id=f"e{i}", content=content)
    return ClassifyRequest(event=event, policy=policy, request_id=f"e{i}/{policy.id}")


class Recorder:
    """Records start order and concurrency; each request takes `latency_s`."""

    name = "recorder"

    def __init__(self, max_sequences: int = 1000, max_tokens: int | None = None, latency_s: float = 0.0):
        self._capacity = Capacity(max_sequences=max_sequences, max_tokens=max_tokens)
        self.latency_s = latency_s
        self.started: list[tuple[float, str]] = []  # (time, request id)
        self.concurrent = 0
        self.peak = 0

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return self._capacity

    async def classify(self, req: ClassifyRequest) -> Classification:
        self.started.append((time.monotonic(), req.request_id))
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.concurrent -= 1
        return Classification(violation=False, model=self.name)

    async def close(self) -> None:
        return None


async def classify_all(batcher: Batcher, requests: list[ClassifyRequest]) -> list[Classification]:
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.classify(r) for r in requests))
    finally:
        await batcher.close()


def test_a_full_batch_starts_at_once_and_batches_hold_at_most_max_batch_size():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=4, max_wait_s=10.0, timeout_s=5)
    began = time.monotonic()
    results = asyncio.run(classify_all(batcher, [request(i) for i in range(12)]))
    assert len(results) == 12
    assert time.monotonic() - began < 5, "full batches must not wait for max_wait_s"
    assert batcher.batches == 3
    assert batcher.last_batch_size == 4
    assert batcher.avg_batch_size == 4.0


def test_a_partial_batch_waits_max_wait_then_starts():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=64, max_wait_s=0.2, timeout_s=5)

    async def scenario() -> float:
        batcher.start()
        began = time.monotonic()
        await asyncio.gather(*(batcher.classify(request(i)) for i in range(3)))
        await batcher.close()
        return recorder.started[0][0] - began

    waited = asyncio.run(scenario())
    assert 0.18 <= waited < 1.0
    assert batcher.batches == 1 and batcher.last_batch_size == 3
    assert batcher.last_queue_wait_s >= 0.18


def test_requests_arriving_within_max_wait_join_the_same_batch():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=64, max_wait_s=0.2, timeout_s=5)

    async def scenario() -> None:
        batcher.start()
        first = asyncio.ensure_future(batcher.classify(request(0)))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.classify(request(1)))
        await batcher.close()

    asyncio.run(scenario())
    assert batcher.batches == 1 and batcher.last_batch_size == 2


def test_the_token_budget_closes_a_batch_before_the_count_does():
    recorder = Recorder()
    probe = Batcher(recorder, max_batch_size=64, max_wait_s=10.0, timeout_s=5)
    per_request = probe.estimate_tokens(request(0))
    batcher = Batcher(
        recorder, max_batch_size=64, max_wait_s=0.5, timeout_s=5, max_batch_tokens=int(per_request * 2.5)
    )
    began = time.monotonic()
    asyncio.run(classify_all(batcher, [request(i) for i in range(10)]))
    # Four batches are full by tokens and start at once; the last two wait for company.
    assert recorder.started[7][0] - began < 0.3, "a batch at its token budget must not wait for max_wait_s"
    assert recorder.started[8][0] - began >= 0.45
    assert batcher.batches == 5
    assert batcher.last_batch_tokens == 2 * per_request
    assert batcher.avg_batch_tokens <= per_request * 2.5


def test_a_request_larger_than_the_token_budget_still_forms_a_batch_of_one():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=64, max_wait_s=0.01, timeout_s=5, max_batch_tokens=10)
    asyncio.run(classify_all(batcher, [request(0, content="x" * 3000)]))
    assert batcher.batches == 1 and batcher.last_batch_tokens > 10


def test_token_estimate_counts_the_policy_once_per_version_and_the_content_by_length():
    batcher = Batcher(Recorder(), max_batch_size=8, max_wait_s=0, timeout_s=5)
    short, long = batcher.estimate_tokens(request(0)), batcher.estimate_tokens(request(1, content="y" * 3000))
    assert long - short >= 900  # 3000 characters at no more than ~3 characters a token
    assert batcher.estimate_tokens(request(2, POLICY_B)) != short


def test_never_more_sequences_in_flight_than_the_classifier_holds():
    recorder = Recorder(max_sequences=5, latency_s=0.002)
    batcher = Batcher(recorder, max_batch_size=16, max_wait_s=0.001, timeout_s=5)
    asyncio.run(classify_all(batcher, [request(i) for i in range(200)]))
    assert len(recorder.started) == 200
    assert recorder.peak == 5, "the window must be used to the full, never beyond"
    assert batcher.peak_in_flight == 5
    assert batcher.in_flight == 0 and batcher.in_flight_tokens == 0


def test_never_more_tokens_in_flight_than_the_kv_cache_holds():
    probe = Batcher(Recorder(), max_batch_size=8, max_wait_s=0, timeout_s=5)
    per_request = probe.estimate_tokens(request(0)) + 100  # 100: the completion allowance below
    recorder = Recorder(max_sequences=64, max_tokens=3 * per_request, latency_s=0.002)
    batcher = Batcher(recorder, max_batch_size=16, max_wait_s=0.001, timeout_s=5, completion_tokens=100)
    asyncio.run(classify_all(batcher, [request(i) for i in range(60)]))
    assert recorder.peak == 3
    assert batcher.peak_in_flight_tokens == 3 * per_request


def test_a_request_larger_than_the_kv_cache_runs_alone_instead_of_starving():
    recorder = Recorder(max_sequences=8, max_tokens=50, latency_s=0.01)
    batcher = Batcher(recorder, max_batch_size=8, max_wait_s=0.001, timeout_s=5)
    results = asyncio.run(classify_all(batcher, [request(i) for i in range(4)]))
    assert len(results) == 4
    assert recorder.peak == 1


def test_requests_of_one_policy_start_together_oldest_policy_first():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=64, max_wait_s=0.01, timeout_s=5)
    interleaved = [request(i, POLICY_B if i % 2 else POLICY_A) for i in range(40)]
    asyncio.run(classify_all(batcher, interleaved))
    order = [request_id.split("/")[1] for _, request_id in recorder.started]
    assert order == ["a"] * 20 + ["b"] * 20
    # Within a policy, arrival order is kept.
    assert [rid for _, rid in recorder.started][:3] == ["e0/a", "e2/a", "e4/a"]


def test_adaptive_window_narrows_when_latency_passes_the_target_and_widens_when_it_recovers():
    recorder = Recorder(max_sequences=32, latency_s=0.03)
    batcher = Batcher(recorder, max_batch_size=32, max_wait_s=0.001, timeout_s=5, latency_target_s=0.01)
    assert batcher.concurrency_limit == 32

    async def scenario() -> tuple[int, int]:
        batcher.start()
        await asyncio.gather(*(batcher.classify(request(i)) for i in range(300)))
        narrowed = batcher.concurrency_limit
        recorder.latency_s = 0.0
        await asyncio.gather(*(batcher.classify(request(i)) for i in range(300, 1500)))
        await batcher.close()
        return narrowed, batcher.concurrency_limit

    narrowed, recovered = asyncio.run(scenario())
    assert narrowed <= 4, "slow answers must halve the window repeatedly"
    assert recovered > narrowed, "fast answers must widen it again"
    assert recovered <= 32


def test_adaptive_window_stays_at_capacity_while_latency_is_within_the_target():
    recorder = Recorder(max_sequences=8, latency_s=0.001)
    batcher = Batcher(recorder, max_batch_size=8, max_wait_s=0.001, timeout_s=5, latency_target_s=1.0)
    asyncio.run(classify_all(batcher, [request(i) for i in range(100)]))
    assert batcher.concurrency_limit == 8 and recorder.peak == 8


class Flaky(Recorder):
    def __init__(self, failures: int, error: BaseException):
        super().__init__()
        self.failures = failures
        self.error = error
        self.calls = 0

    async def classify(self, req: ClassifyRequest) -> Classification:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return Classification(violation=True, model=self.name)


def test_other_errors_are_retried_then_succeed():
    flaky = Flaky(failures=2, error=RuntimeError("engine hiccup"))
    batcher = Batcher(flaky, max_batch_size=8, max_wait_s=0, timeout_s=5, retries=2)
    [result] = asyncio.run(classify_all(batcher, [request(0)]))
    assert result.violation and flaky.calls == 3


def test_errors_past_the_retries_become_classifier_error_with_the_attempt_count():
    flaky = Flaky(failures=10, error=RuntimeError("engine down"))
    batcher = Batcher(flaky, max_batch_size=8, max_wait_s=0, timeout_s=5, retries=2)
    with pytest.raises(ClassificationFailed) as failed:
        asyncio.run(classify_all(batcher, [request(0)]))
    assert failed.value.error_type is ErrorType.CLASSIFIER_ERROR
    assert failed.value.attempts == 3 and "RuntimeError: engine down" in str(failed.value)
    assert batcher.in_flight == 0


def test_classification_failed_is_final_and_not_retried():
    flaky = Flaky(failures=10, error=ClassificationFailed(ErrorType.UNPARSEABLE_OUTPUT, "no answer"))
    batcher = Batcher(flaky, max_batch_size=8, max_wait_s=0, timeout_s=5, retries=2)
    with pytest.raises(ClassificationFailed) as failed:
        asyncio.run(classify_all(batcher, [request(0)]))
    assert failed.value.error_type is ErrorType.UNPARSEABLE_OUTPUT and flaky.calls == 1


def test_an_outage_goes_back_to_the_caller_untouched_and_frees_its_slot():
    flaky = Flaky(failures=10, error=Unavailable("reasoner", "no endpoint answers"))
    batcher = Batcher(flaky, max_batch_size=8, max_wait_s=0, timeout_s=5, retries=2)
    with pytest.raises(Unavailable) as down:
        asyncio.run(classify_all(batcher, [request(0)]))
    assert down.value.dependency == "reasoner" and flaky.calls == 1  # the pipeline waits it out, not the batcher
    assert batcher.in_flight == 0


def test_an_attempt_outliving_the_timeout_is_retried_then_fails_as_timed_out():
    slow = Recorder(latency_s=1.0)
    batcher = Batcher(slow, max_batch_size=8, max_wait_s=0, timeout_s=0.05, retries=1)
    with pytest.raises(ClassificationFailed) as failed:
        asyncio.run(classify_all(batcher, [request(0)]))
    assert failed.value.attempts == 2 and "timed out" in str(failed.value)
    assert slow.concurrent == 0, "a timed-out attempt is cancelled, so it stops holding a slot"


def test_close_cancels_running_and_queued_requests():
    slow = Recorder(max_sequences=1, latency_s=30)
    batcher = Batcher(slow, max_batch_size=8, max_wait_s=0, timeout_s=60)

    async def scenario() -> list[object]:
        batcher.start()
        calls = [asyncio.ensure_future(batcher.classify(request(i))) for i in range(3)]
        await asyncio.sleep(0.05)
        await batcher.close()
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert slow.concurrent == 0


def test_a_request_runs_in_its_callers_context_so_the_retry_warning_carries_its_trace():
    import logging

    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from consumer.pipeline.telemetry.logs import JsonLogFormatter

    lines: list[str] = []

    class Formatted(logging.Handler):  # formats at emit time, in the logging call's context
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonLogFormatter().format(record))

    class Failing(Recorder):
        async def classify(self, req: ClassifyRequest) -> Classification:
            raise RuntimeError("engine gone")

    span = NonRecordingSpan(SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False, trace_flags=TraceFlags(1)))
    handler = Formatted(level=logging.WARNING)
    logging.getLogger("consumer.pipeline.batcher").addHandler(handler)

    async def scenario() -> None:
        batcher = Batcher(Failing(), max_batch_size=4, max_wait_s=0.001, timeout_s=5, retries=0)
        batcher.start()
        try:
            with trace.use_span(span, end_on_exit=False), pytest.raises(ClassificationFailed):
                await batcher.classify(request(1))
        finally:
            await batcher.close()

    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("consumer.pipeline.batcher").removeHandler(handler)
    assert len(lines) == 1 and "engine gone" in lines[0]
    assert f'"trace_id":"{0xABC:032x}"' in lines[0] and f'"span_id":"{0xDEF:016x}"' in lines[0]
