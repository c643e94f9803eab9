"""The classify step: one (event, policy) request answered, traced and counted.

A request is answered at once where the classifier can (`classify_now`: a keyword match, a
cache hit), else through the batcher. With tracing on, each classification is a child span
of its event's span: current while the batcher and classifier run, or recorded after the
fact with its real start time for an instant answer. Whatever the classifier returns is
checked to be a `Classification`; anything else is an unparseable-output failure.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from consumer.classify import AnswersAtOnce, Classification, ClassificationFailed, Classifier, ClassifyRequest
from consumer.events import ErrorType
from consumer.pipeline.batcher import Batcher
from consumer.pipeline.telemetry import Telemetry


class ClassifyStep:
    def __init__(self, classifier: Classifier, batcher: Batcher, telemetry: Telemetry):
        self._classifier = classifier
        self._classify_now = classifier.classify_now if isinstance(classifier, AnswersAtOnce) else None
        self._batcher = batcher
        self._telemetry = telemetry

    def now(self, request: ClassifyRequest, event_span: Span) -> Classification | None:
        """The classifier's instant answer (`classify_now`), or None if it needs the batcher."""
        if self._classify_now is None:
            return None
        traced = event_span.is_recording()
        started_ns = time.time_ns() if traced else 0
        started = time.monotonic()
        try:
            result = self._classify_now(request)
            if result is not None:
                self._check(result)
        except Exception as exc:
            if traced:
                failure = exc.error_type.value if isinstance(exc, ClassificationFailed) else None
                self._classify_span(request, event_span, started_ns, failure)
            raise
        if result is None:
            return None
        if traced:
            self._classify_span(request, event_span, started_ns, result=result)
        self._count_classification(request, result, started)
        return result

    async def later(self, request: ClassifyRequest, event_span: Span) -> Classification:
        """One (event, policy) classification through the batcher; with tracing on, in a child
        span of the event's, current while the classifier runs."""
        started = time.monotonic()
        if not event_span.is_recording():
            result = self._check(await self._batcher.classify(request))
        else:
            with self._telemetry.tracer.start_as_current_span(
                **_span_options(request, event_span),
                record_exception=False,  # exception text can quote model output
                set_status_on_exception=False,
            ) as span:
                try:
                    result = self._check(await self._batcher.classify(request))
                except ClassificationFailed as exc:
                    span.set_status(Status(StatusCode.ERROR, exc.error_type.value))
                    raise
                self._describe(span, result)
        self._count_classification(request, result, started)
        return result

    def _classify_span(
        self,
        request: ClassifyRequest,
        event_span: Span,
        started_ns: int,
        failure: str | None = None,
        result: Classification | None = None,
    ) -> None:
        """The child span of a classification that answered at once, recorded after the fact."""
        span = self._telemetry.tracer.start_span(**_span_options(request, event_span), start_time=started_ns)
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, failure))
        if result is not None:
            self._describe(span, result)
        span.end()

    def _describe(self, span: Span, result: Classification) -> None:
        span.set_attributes(
            {"safeguard.model": result.model, "gen_ai.usage.input_tokens": result.prompt_tokens,
             "gen_ai.usage.output_tokens": result.completion_tokens,
             "safeguard.cached_tokens": result.cached_tokens, "safeguard.violation": result.violation}
        )  # fmt: skip
        if self._telemetry.trace_content and result.reasoning:
            span.set_attribute("safeguard.reasoning", result.reasoning)

    def _check(self, result: object) -> Classification:
        if not isinstance(result, Classification):
            raise ClassificationFailed(
                ErrorType.UNPARSEABLE_OUTPUT,
                f"classifier {self._classifier.name} returned {type(result).__name__}, not a Classification",
                raw_output=repr(result)[:2000],
            )
        return result

    def _count_classification(self, request: ClassifyRequest, result: Classification, started: float) -> None:
        t = self._telemetry
        policy = request.policy.id
        t.engine_latency.record(time.monotonic() - started, policy)
        if result.prompt_tokens:
            t.tokens[(policy, "prompt")] += result.prompt_tokens
            t.tokens[(policy, "cached")] += result.cached_tokens
            t.tokens[(policy, "completion")] += result.completion_tokens


def _span_options(request: ClassifyRequest, event_span: Span) -> dict[str, Any]:
    """Name, parent and attributes of a classification's span, a child of the event's."""
    return {
        "name": f"classify {request.policy.id}",
        "context": trace.set_span_in_context(event_span),
        "attributes": {"safeguard.policy.id": request.policy.id, "safeguard.policy.version": request.policy.version},
    }
