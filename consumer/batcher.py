"""The batcher: owns "never more requests in flight than the classifier can hold".

Requests are gathered into micro-batches (up to `max_batch_size`, waiting at most
`max_wait_s` for a batch to fill), ordered by policy inside a batch so that requests sharing
a policy prefix reach the engine together and find it in vLLM's prefix cache, and started
as soon as the classifier has a free slot (`Capacity.max_sequences`).

Failures: a `ClassificationFailed` is final (the classifier did its own retries). Any other
exception, or a request outliving its deadline, is retried with backoff up to
`retries` times and then becomes `ClassificationFailed(classifier_error)`.
"""

from __future__ import annotations

import asyncio
import logging

from tenacity import AsyncRetrying, RetryError, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from consumer.classify import Classification, ClassificationFailed, Classifier, ClassifyRequest
from consumer.events import ErrorType

log = logging.getLogger(__name__)

_Item = tuple[ClassifyRequest, "asyncio.Future[Classification]"]


class Batcher:
    def __init__(
        self,
        classifier: Classifier,
        max_batch_size: int,
        max_wait_s: float,
        timeout_s: float,
        retries: int = 2,
    ):
        self._classifier = classifier
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._timeout_s = timeout_s
        self._retries = retries
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(classifier.capacity().max_sequences)
        self._running: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._form_batches(), name="batcher")

    async def classify(self, request: ClassifyRequest) -> Classification:
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.batches += 1
            batch.sort(key=lambda item: item[0].policy.ref)
            for request, future in batch:
                await self._slots.acquire()
                task = loop.create_task(self._run(request, future))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run(self, request: ClassifyRequest, future: asyncio.Future[Classification]) -> None:
        try:
            result = await self._classify_with_retries(request)
        except ClassificationFailed as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)
        finally:
            self._slots.release()

    async def _classify_with_retries(self, request: ClassifyRequest) -> Classification:
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._retries + 1),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                retry=retry_if_not_exception_type(ClassificationFailed),
            ):
                with attempt:
                    attempts += 1
                    return await asyncio.wait_for(self._classifier.classify(request), self._timeout_s)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            reason = "timed out" if isinstance(cause, asyncio.TimeoutError) else f"{type(cause).__name__}: {cause}"
            log.warning("classifier failed %d times on %s: %s", attempts, request.request_id, reason)
            raise ClassificationFailed(
                ErrorType.CLASSIFIER_ERROR, f"classifier {self._classifier.name} failed: {reason}", attempts=attempts
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover
