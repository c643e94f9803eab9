"""The batcher: owns "never more requests in flight than the classifier can hold".

Guarantees:
- **Capacity.** Requests started and not yet finished (retries and their back-off included)
  never exceed the concurrency limit: at most `Capacity.max_sequences`, and, when the
  classifier reports `Capacity.max_tokens` (its KV-cache tokens), at most that many estimated
  tokens. A request too large for the token bound on its own starts only when nothing else is
  in flight, so it is never starved; the engine then decides (it rejects or preempts).
- **Micro-batches.** A batch closes when it holds `max_batch_size` requests, when adding the
  next request would pass `max_batch_tokens` estimated prompt tokens, or `max_wait_s` after
  its oldest request arrived, whichever comes first. Under load the queue is already full and
  batches close at once; the wait only matters when requests trickle in.
- **Policy grouping.** A batch is filled policy by policy, starting with the policy whose
  oldest request has waited longest, and its requests are started in that order, so requests
  sharing a policy prefix reach the engine together and find it in vLLM's prefix cache.
  Within a policy, requests start in arrival order.
- **Adaptive concurrency limit** (`latency_target_s` set): the limit starts at the capacity and
  follows the observed classifier latency by AIMD: each request finishing within the target
  raises it by about one request per limit's worth of completions; one finishing later halves
  it, at most once per limit's worth of completions. It never exceeds the capacity nor falls below one. Use it
  when the engine is shared or its speed varies (long reasoning, mixed policies) and a
  latency bound matters more than the last few percent of throughput.

Token estimates are cheap on purpose: a policy's tokens are counted once per policy version
(plus the harmony frame), content is estimated from its length. Each request in flight is
charged its whole prompt plus `completion_tokens` for its answer, which over-states what
vLLM holds when the policy prefix is shared: the bound errs on the safe side.

Failures: a `ClassificationFailed` is final (the classifier did its own retries); an
`Unavailable` (an outage, the pipeline's to wait out) and a `Fatal` (the engine is gone: the
run stops) go back to the caller untouched. Any other
exception, or an attempt outliving `timeout_s`, is retried with exponential back-off
(50 ms doubling, at most 2 s) up to `retries` times and then becomes
`ClassificationFailed(classifier_error)`.

Metrics are plain attributes and properties (batches, batch sizes and tokens, in flight,
queued, queue wait, classifier latency), read by whoever exports them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from dataclasses import dataclass

from consumer.classify import Classification, ClassificationFailed, Classifier, ClassifyRequest
from consumer.errors import Fatal, Unavailable
from consumer.events import ErrorType
from consumer.pipeline.telemetry.metrics import Figure
from consumer.policy import count_tokens

log = logging.getLogger(__name__)

# The system message (identity, reasoning effort) and the message frames around the policy
# and the content; generous, so the estimate stays on the safe side.
PROMPT_FRAME_TOKENS = 64
# o200k_base averages about 4 characters a token on English chat; 3 over-estimates it.
CHARS_PER_TOKEN = 3
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
AIMD_DECREASE = 0.5


@dataclass(slots=True)
class _Pending:
    request: ClassifyRequest
    tokens: int
    future: asyncio.Future[Classification]
    arrived: float
    # The caller's context (its span above all): the request runs in it, so what the classifier
    # and the retries log carries the record's trace ids.
    context: contextvars.Context


class Batcher:
    """Micro-batches classification requests and keeps them within the classifier's capacity.

    The guarantees are in this module's docstring: the in-flight bound (requests and
    estimated tokens), when a batch closes, grouping by policy, the adaptive concurrency limit.
    """

    # What the metrics exporter shows of the batcher, one gauge each, read from these attributes.
    FIGURES = {
        "safeguard.batcher.batch_size": Figure("avg_batch_size", "requests per micro-batch, recent average"),
        "safeguard.batcher.batch_tokens": Figure(
            "avg_batch_tokens", "estimated prompt tokens per micro-batch, recent average"),
        "safeguard.batcher.in_flight_requests": Figure("in_flight", "requests the classifier holds"),
        "safeguard.batcher.in_flight_tokens": Figure(
            "in_flight_tokens", "estimated KV-cache tokens of the requests in flight"),
        "safeguard.batcher.concurrency_limit": Figure(
            "concurrency_limit", "requests the batcher lets the classifier hold"),
        "safeguard.batcher.queued_requests": Figure("queued", "requests waiting for a micro-batch"),
        "safeguard.batcher.queue_wait": Figure(
            "avg_queue_wait_s", "time a request waits for its micro-batch, recent average", unit="s"),
    }  # fmt: skip

    def __init__(
        self,
        classifier: Classifier,
        max_batch_size: int,
        max_wait_s: float,
        timeout_s: float,
        retries: int = 2,
        *,
        max_batch_tokens: int | None = None,
        completion_tokens: int = 0,
        latency_target_s: float | None = None,
    ):
        self._classifier = classifier
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._timeout_s = timeout_s
        self._retries = retries
        self._max_batch_tokens = max_batch_tokens
        self._completion_tokens = completion_tokens
        self._latency_target_s = latency_target_s
        capacity = classifier.capacity()
        self._max_sequences = capacity.max_sequences
        self._max_tokens = capacity.max_tokens
        self._limit = float(capacity.max_sequences)
        self._completions_since_decrease = 0
        self._prefix_tokens: dict[str, int] = {}
        self._queues: dict[str, deque[_Pending]] = {}
        self._wake: asyncio.Future[None] | None = None
        self._wake_at = (1, 1)  # (queued requests, queued tokens) that wake the batch former
        self._space: asyncio.Future[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Metrics.
        self.batches = 0
        self.batched_requests = 0
        self.batched_tokens = 0
        self.last_batch_size = 0
        self.last_batch_tokens = 0
        self.queued = 0
        self.queued_tokens = 0
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.peak_in_flight = 0
        self.peak_in_flight_tokens = 0
        self.started = 0
        self.queue_wait_total_s = 0.0
        self.last_queue_wait_s = 0.0

    # -- metrics ---------------------------------------------------------------------------

    @property
    def concurrency_limit(self) -> int:
        """Requests allowed in flight now: the capacity, or less in adaptive mode."""
        return max(1, int(self._limit))

    @property
    def avg_batch_size(self) -> float:
        return self.batched_requests / self.batches if self.batches else 0.0

    @property
    def avg_batch_tokens(self) -> float:
        return self.batched_tokens / self.batches if self.batches else 0.0

    @property
    def avg_queue_wait_s(self) -> float:
        return self.queue_wait_total_s / self.started if self.started else 0.0

    # -- interface -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._form_batches(), name="batcher")

    async def classify(self, request: ClassifyRequest) -> Classification:
        loop = self._loop or asyncio.get_running_loop()
        tokens = self.estimate_tokens(request)
        item = _Pending(request, tokens, loop.create_future(), loop.time(), contextvars.copy_context())
        queue = self._queues.get(request.policy.ref)
        if queue is None:
            queue = self._queues[request.policy.ref] = deque()
        queue.append(item)
        self.queued += 1
        self.queued_tokens += tokens
        wake = self._wake
        if wake is not None and (self.queued >= self._wake_at[0] or self.queued_tokens >= self._wake_at[1]):
            self._wake = None
            if not wake.done():
                wake.set_result(None)
        return await item.future

    def estimate_tokens(self, request: ClassifyRequest) -> int:
        """Estimated prompt tokens of a request: its policy prefix plus its content."""
        policy = request.policy
        prefix = self._prefix_tokens.get(policy.ref)
        if prefix is None:
            prefix = self._prefix_tokens[policy.ref] = count_tokens(policy.text) + PROMPT_FRAME_TOKENS
        event = request.event
        chars = len(event.content)
        for message in event.context:
            chars += len(message.content)
        return prefix + chars // CHARS_PER_TOKEN + 1

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        for queue in self._queues.values():
            for item in queue:
                item.future.cancel()
        self._queues.clear()

    # -- forming and starting batches ------------------------------------------------------

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        token_budget = self._max_batch_tokens or 1 << 62
        while True:
            if not self.queued:
                await self._wait_for((1, 1), None)
            oldest = min(q[0].arrived for q in self._queues.values())
            fill_by = oldest + self._max_wait_s
            if self.queued < self._max_batch_size and self.queued_tokens < token_budget and fill_by > loop.time():
                await self._wait_for((self._max_batch_size, token_budget), fill_by)
            batch = self._take_batch(token_budget)
            if not batch:
                continue  # every queued caller had given up
            self.batches += 1
            self.last_batch_size = len(batch)
            self.last_batch_tokens = sum(item.tokens for item in batch)
            self.batched_requests += len(batch)
            self.batched_tokens += self.last_batch_tokens
            try:
                for item in batch:
                    await self._start(item)
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()  # a no-op for those already started
                raise

    async def _start(self, item: _Pending) -> None:
        """Start one request as soon as the concurrency limit has room for it."""
        loop = asyncio.get_running_loop()
        held = item.tokens + self._completion_tokens
        while not self._fits(held):
            self._space = loop.create_future()
            await self._space
        if item.future.done():
            return  # its caller gave up while the batch waited for room
        now = loop.time()
        self.last_queue_wait_s = now - item.arrived
        self.queue_wait_total_s += self.last_queue_wait_s
        self.started += 1
        self.in_flight += 1
        self.in_flight_tokens += held
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.peak_in_flight_tokens = max(self.peak_in_flight_tokens, self.in_flight_tokens)
        task = loop.create_task(self._run(item, held, now), context=item.context)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _wait_for(self, wake_at: tuple[int, int], deadline: float | None) -> None:
        """Sleep until enough is queued (`wake_at`: requests, tokens) or `deadline` passes."""
        loop = asyncio.get_running_loop()
        self._wake_at = wake_at
        self._wake = wake = loop.create_future()
        try:
            if deadline is None:
                await wake
            else:
                async with asyncio.timeout_at(deadline):
                    await wake
        except TimeoutError:
            pass
        finally:
            self._wake = None

    def _take_batch(self, token_budget: int) -> list[_Pending]:
        batch: list[_Pending] = []
        tokens = 0
        while self._queues and len(batch) < self._max_batch_size:
            ref = min(self._queues, key=lambda r: self._queues[r][0].arrived)
            queue = self._queues[ref]
            while queue and len(batch) < self._max_batch_size:
                item = queue[0]
                if batch and tokens + item.tokens > token_budget:
                    return batch
                queue.popleft()
                self.queued -= 1
                self.queued_tokens -= item.tokens
                if item.future.done():
                    continue  # cancelled by its caller while queued
                batch.append(item)
                tokens += item.tokens
            if not queue:
                del self._queues[ref]
        return batch

    def _fits(self, tokens: int) -> bool:
        if self.in_flight >= self.concurrency_limit:
            return False
        return self._max_tokens is None or self.in_flight == 0 or self.in_flight_tokens + tokens <= self._max_tokens

    # -- one request -----------------------------------------------------------------------

    async def _run(self, item: _Pending, held: int, started: float) -> None:
        try:
            result = await self._classify_with_retries(item.request)
        except asyncio.CancelledError:
            item.future.cancel()  # closing: the caller must not wait for an answer that never comes
            raise
        except (ClassificationFailed, Unavailable, Fatal) as exc:
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            if not item.future.done():
                item.future.set_result(result)
        finally:
            self._finish(held, asyncio.get_running_loop().time() - started)

    def _finish(self, held: int, latency_s: float) -> None:
        self.in_flight -= 1
        self.in_flight_tokens -= held
        if self._latency_target_s is not None:
            self._adapt(latency_s)
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)

    def _adapt(self, latency_s: float) -> None:
        self._completions_since_decrease += 1
        if latency_s > self._latency_target_s:  # type: ignore[operator]
            # One decrease per limit's worth of completions: the requests that finish late
            # together were all started under the old limit, and one halving answers them all.
            if self._completions_since_decrease >= self._limit:
                self._limit = max(1.0, self._limit * AIMD_DECREASE)
                self._completions_since_decrease = 0
        else:
            self._limit = min(float(self._max_sequences), self._limit + 1.0 / self._limit)

    async def _classify_with_retries(self, request: ClassifyRequest) -> Classification:
        attempts = 0
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await self._classifier.classify(request)
            except (ClassificationFailed, Unavailable, Fatal):
                raise
            except Exception as exc:  # noqa: BLE001 - any classifier failure is retried, then a dead letter
                if attempts > self._retries:
                    reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                    log.warning("classifier failed %d times on %s: %s", attempts, request.request_id, reason)
                    raise ClassificationFailed(
                        ErrorType.CLASSIFIER_ERROR,
                        f"classifier {self._classifier.name} failed: {reason}",
                        attempts=attempts,
                    ) from None
            await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempts - 1)))
