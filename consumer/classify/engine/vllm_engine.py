"""`VllmClassifier`: gpt-oss-safeguard on vLLM's in-process asynchronous engine.

One request's path: the harmony prompt (consumer.classify.engine.prompt) goes to `AsyncLLM.generate`
as token ids; generated tokens stream back as deltas into a harmony `StreamableParser`,
which splits them into the analysis and final channels; the final channel is parsed into a
verdict (consumer.classify.engine.answer).

Failures end in `ClassificationFailed`:
- an engine error or a timed-out attempt is retried with exponential backoff (tenacity) up
  to `max_engine_retries` times, then becomes `classifier_error`; a dead engine and a
  passed deadline are not retried;
- a completion without a parseable final answer is retried up to
  `max_unparseable_retries` times, then becomes `unparseable_output` carrying the raw
  completion (harmony markup included).
Message content and model output are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from consumer.classify import Capacity, Classification, ClassificationFailed, ClassifyRequest
from consumer.classify.engine.answer import Channels, CompletionReader, UnparseableAnswer, classification, parse_answer
from consumer.classify.engine.prompt import PromptError, PromptRenderer
from consumer.classify.engine.settings import EngineSettings
from consumer.classify.engine.vocab import harmony_encoding
from consumer.errors import Fatal
from consumer.events import ErrorType

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 8.0


class AttemptTimedOut(Exception):
    """One attempt ran past its time limit and was aborted in the engine."""


@dataclass
class Completion:
    """One finished generation: its harmony channels, raw tokens and token counts."""

    channels: Channels
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from vLLM's prefix cache
    attempts: int  # engine attempts it took (timeouts and engine errors are retried)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class VllmClassifier:
    """Classifies with gpt-oss-safeguard in an in-process vLLM `AsyncLLM`.

    Guarantees: every `classify` call returns a Classification or raises
    ClassificationFailed, or `Fatal` once the engine core died (never another exception type); an attempt that outlives the
    request's deadline or `request_timeout_s` is aborted inside the engine, so it stops
    using a sequence slot; `capacity()` reports what the started engine holds
    (`max_num_seqs`, KV-cache tokens); `close()` shuts the engine core down.
    """

    name = "vllm"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._engine: AsyncLLM | None = None
        self._renderer: PromptRenderer | None = None
        self._stop_token_ids: list[int] = []
        self._capacity = Capacity(max_sequences=settings.max_num_seqs)
        self._max_model_len = settings.max_model_len

    async def start(self) -> None:
        """Load the harmony vocabulary, then the model; raises if either cannot be loaded."""
        encoding = harmony_encoding()
        self._renderer = PromptRenderer(encoding)
        self._stop_token_ids = encoding.stop_tokens_for_assistant_actions()
        s = self.settings
        args = AsyncEngineArgs(
            model=s.model,
            served_model_name=s.model_name,
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_memory_bytes=s.kv_cache_memory_bytes,
            tensor_parallel_size=s.tensor_parallel_size,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=s.enforce_eager,
            async_scheduling=s.async_scheduling,
            skip_tokenizer_init=s.skip_tokenizer_init,
            disable_log_stats=True,
        )
        started = time.monotonic()
        self._engine = AsyncLLM.from_engine_args(args)
        config = self._engine.vllm_config
        cache = config.cache_config
        kv_tokens = cache.kv_cache_size_tokens or (cache.num_gpu_blocks or 0) * cache.block_size or None
        self._max_model_len = config.model_config.max_model_len
        self._capacity = Capacity(max_sequences=config.scheduler_config.max_num_seqs, max_tokens=kv_tokens)
        log.info(
            "vLLM engine ready in %.1f s: model=%s max_num_seqs=%d kv_cache_tokens=%s max_model_len=%d",
            time.monotonic() - started,
            s.model_name,
            self._capacity.max_sequences,
            kv_tokens,
            self._max_model_len,
        )

    def capacity(self) -> Capacity:
        return self._capacity

    @property
    def renderer(self) -> PromptRenderer:
        """The prompt renderer the engine uses (available after `start`)."""
        if self._renderer is None:
            raise RuntimeError("the vLLM classifier is not started")
        return self._renderer

    def unfinished_requests(self) -> int:
        """Requests the engine holds right now (running or queued), aborted ones excluded."""
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    async def check_health(self) -> None:
        """Raise when the engine is not started or its core has died."""
        if self._engine is None:
            raise RuntimeError("the vLLM engine is not started")
        await self._engine.check_health()

    async def classify(self, request: ClassifyRequest) -> Classification:
        attempts = 0
        for _ in range(self.settings.max_unparseable_retries + 1):
            completion = await self.complete(request, first_attempt=attempts + 1)
            attempts += completion.attempts
            problem = completion.channels.problem
            if problem is None and completion.channels.final is not None:
                try:
                    return classification(parse_answer(completion.channels.final), completion, self.settings.model_name,
                                          self.settings.keep_reasoning)  # fmt: skip
                except UnparseableAnswer as exc:
                    problem = str(exc)
            # The problem text may quote model output, which can echo content: not logged.
            log.info("request %s: no parseable answer after attempt %d", request.request_id, attempts)
        raise ClassificationFailed(
            ErrorType.UNPARSEABLE_OUTPUT,
            f"no parseable final answer after {attempts} attempt(s): {problem}",
            raw_output=harmony_encoding().decode(completion.token_ids),
            attempts=attempts,
        )

    async def complete(self, request: ClassifyRequest, first_attempt: int = 1) -> Completion:
        """Generate one completion for `request`, retrying engine errors and timeouts.

        Raises ClassificationFailed(classifier_error) when the retries are spent, the deadline
        has passed or the engine died, and ClassificationFailed(payload_too_large) when the
        prompt alone fills `max_model_len`. `first_attempt` numbers the engine request ids
        (`<request_id>#<n>`, which must not repeat while an aborted attempt drains) and the
        attempts a failure reports.
        """
        engine = self._require_engine()
        assert self._renderer is not None
        try:
            prompt = self._renderer.render(request.policy, request.event)
        except PromptError as exc:
            raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, str(exc), attempts=first_attempt) from exc
        room = self._max_model_len - len(prompt)
        if room < 1:
            raise ClassificationFailed(
                ErrorType.PAYLOAD_TOO_LARGE,
                f"prompt of {len(prompt)} tokens leaves no room for an answer within max_model_len "
                f"{self._max_model_len}",
                attempts=first_attempt,
            )
        sampling = SamplingParams(
            max_tokens=min(self.settings.max_tokens, room),
            temperature=self.settings.temperature,
            stop_token_ids=self._stop_token_ids,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            skip_special_tokens=False,
        )
        used = 0

        def deadline_passed(_: RetryCallState) -> bool:
            return request.deadline is not None and time.monotonic() >= request.deadline

        retrying = AsyncRetrying(
            retry=retry_if_exception_type((EngineGenerateError, AttemptTimedOut)),
            stop=stop_after_attempt(self.settings.max_engine_retries + 1) | deadline_passed,
            wait=wait_exponential(multiplier=self.settings.retry_backoff_s, max=_MAX_BACKOFF_S),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_id = f"{request.request_id}#{first_attempt + used}"
                    used += 1
                    completion = await self._generate(engine, prompt, sampling, attempt_id, request.deadline)
        except AttemptTimedOut as exc:
            raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, str(exc), attempts=first_attempt - 1 + used) from exc
        except EngineDeadError as exc:
            # Not this request's fault, and no request succeeds after it: the run stops (exit 1)
            # with the request uncommitted, and the restart (the orchestrator's) reads it again.
            raise Fatal("the vLLM engine core died") from exc
        except Exception as exc:  # any other failure still ends as a dead letter, never a crash
            raise ClassificationFailed(
                ErrorType.CLASSIFIER_ERROR,
                f"vLLM request failed: {type(exc).__name__}: {exc}",
                attempts=first_attempt - 1 + used,
            ) from exc
        completion.attempts = used
        return completion

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            log.info("vLLM engine shut down")

    def _require_engine(self) -> AsyncLLM:
        if self._engine is None:
            raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, "the vLLM engine is not started")
        return self._engine

    async def _generate(
        self,
        engine: AsyncLLM,
        prompt: list[int],
        sampling: SamplingParams,
        attempt_id: str,
        deadline: float | None,
    ) -> Completion:
        """One engine request, streamed into the harmony reader and aborted at its time limit."""
        limit = self.settings.request_timeout_s
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        if limit <= 0:
            raise AttemptTimedOut(f"deadline passed before attempt {attempt_id} started")
        reader = CompletionReader(harmony_encoding())
        token_ids: list[int] = []
        cached_tokens = 0
        truncated = False
        stream = engine.generate(TokensPrompt(prompt_token_ids=prompt), sampling, attempt_id)
        try:
            async with asyncio.timeout(limit), contextlib.aclosing(stream):
                async for output in stream:
                    if output.num_cached_tokens is not None:
                        cached_tokens = output.num_cached_tokens
                    delta = output.outputs[0].token_ids
                    token_ids.extend(delta)
                    truncated = output.outputs[0].finish_reason == "length"
                    if not reader.feed(delta):
                        # No longer valid harmony: stop paying for tokens (closing the stream aborts it).
                        break
        except TimeoutError:
            # Cancelling the stream already aborts it inside vLLM; abort by id as well, so the
            # sequence slot is released even if that path changes.
            await engine.abort(attempt_id)
            raise AttemptTimedOut(f"attempt {attempt_id} ran past its {limit:.3f} s limit and was aborted") from None
        return Completion(
            channels=reader.channels(truncated=truncated),
            token_ids=token_ids,
            prompt_tokens=len(prompt),
            cached_tokens=cached_tokens,
            attempts=1,
        )
