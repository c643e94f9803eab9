"""The classify step: (event, policy) requests answered, traced and counted.

A poll batch's requests are answered at once where the classifier can, all in one call
(`classify_now_many`: keyword matches, cache hits, the cascade's lexical stage) or one by one
(`classify_now`), else each through the batcher. With tracing on, each classification is a child span
of its event's span: current while the batcher and classifier run, or recorded after the
fact with its real start time for an instant answer. Whatever the classifier returns is
checked to be a `Classification`; anything else is an unparseable-output failure.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from consumer.classify import (
    AnswersAtOnce,
    AnswersManyAtOnce,
    Classification,
    ClassificationFailed,
    Classifier,
    ClassifyRequest,
)
from consumer.events import ErrorType
from consumer.pipeline.batcher import Batcher
from consumer.pipeline.telemetry import Telemetry
from consumer.pipeline.telemetry.tracing import UnsampledSpan, start_child


class ClassifyStep:
    def __init__(self, classifier: Classifier, batcher: Batcher, telemetry: Telemetry):
        self._classifier = classifier
        self._classify_now = classifier.classify_now if isinstance(classifier, AnswersAtOnce) else None
        self._classify_now_many = classifier.classify_now_many if isinstance(classifier, AnswersManyAtOnce) else None
        self._batcher = batcher
        self._telemetry = telemetry

    def now_many(self, requests: list[ClassifyRequest], event_spans: list[Span]) -> list[object]:
        """Instant answers for a poll batch's requests (`event_spans[i]`: the span of the event
        of `requests[i]`), in one call where the classifier answers many at once: per request a
        `Classification`, an exception (that request's failure) or None (ask `later`)."""
        if self._classify_now_many is None:
            outcomes: list[object] = []
            for request, span in zip(requests, event_spans):
                try:
                    outcomes.append(self.now(request, span))
                except Exception as exc:  # noqa: BLE001 - a failing classifier costs this record only
                    outcomes.append(exc)
            return outcomes
        # Most batches are all unsampled: their spans' types are read in C, not one call each.
        traced = set(map(type, event_spans)) != {UnsampledSpan} and any(s.is_recording() for s in event_spans)
        started_ns = time.time_ns() if traced else 0
        started = time.monotonic()
        try:
            outcomes = list(self._classify_now_many(requests))
            if len(outcomes) != len(requests):
                raise RuntimeError(f"{len(outcomes)} answers to {len(requests)} requests")
        except Exception as exc:  # noqa: BLE001 - a failing classifier costs this batch's records only
            outcomes = [exc] * len(requests)
        elapsed_s = time.monotonic() - started
        answered: Counter[str] = Counter()
        for i, outcome in enumerate(outcomes):
            if outcome is None:
                continue
            request = requests[i]
            if not isinstance(outcome, BaseException):
                try:
                    outcome = outcomes[i] = self._check(outcome)
                except ClassificationFailed as exc:
                    outcome = outcomes[i] = exc
            if isinstance(outcome, BaseException):
                if traced and event_spans[i].is_recording():
                    failure = outcome.error_type.value if isinstance(outcome, ClassificationFailed) else None
                    self._classify_span(request, event_spans[i], started_ns, failure)
                continue
            if traced and event_spans[i].is_recording():
                self._classify_span(request, event_spans[i], started_ns, result=outcome)
            series = self._series(request)
            answered[series] += 1
            if outcome.prompt_tokens:
                self._count_tokens(series, outcome)
        for policy_id, count in answered.items():
            # Each waited for the whole batch's call: the latency of every one of them.
            self._telemetry.engine_latency.record(elapsed_s, policy_id, count)
        return outcomes

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
                _span_name(request),
                context=trace.set_span_in_context(event_span),
                attributes=_policy_attributes(request),
                record_exception=False,  # exception text can quote model output
                set_status_on_exception=False,
            ) as span:
                try:
                    result = self._check(await self._batcher.classify(request))
                except ClassificationFailed as exc:
                    span.set_status(Status(StatusCode.ERROR, exc.error_type.value))
                    raise
                span.set_attributes(self._description(result))
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
        attributes = _policy_attributes(request)
        if result is not None:
            attributes.update(self._description(result))
        span = start_child(self._telemetry.tracer, event_span, _span_name(request), attributes, started_ns)
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, failure))
        span.end()

    def _description(self, result: Classification) -> dict[str, Any]:
        """A classification span's attributes from its result."""
        described: dict[str, Any] = {
            "safeguard.model": result.model, "gen_ai.usage.input_tokens": result.prompt_tokens,
            "gen_ai.usage.output_tokens": result.completion_tokens, "safeguard.cached_tokens": result.cached_tokens,
            "safeguard.violation": result.violation,
        }  # fmt: skip
        if self._telemetry.trace_content and result.reasoning:
            described["safeguard.reasoning"] = result.reasoning
        return described

    def _check(self, result: object) -> Classification:
        if not isinstance(result, Classification):
            raise ClassificationFailed(
                ErrorType.UNPARSEABLE_OUTPUT,
                f"classifier {self._classifier.name} returned {type(result).__name__}, not a Classification",
                raw_output=repr(result)[:2000],
            )
        return result

    def _series(self, request: ClassifyRequest) -> str:
        """The policy label of its metrics: by key, as two communities may use one id; bounded
        (`CommunityLabels.policy_series`)."""
        return self._telemetry.communities.policy_series(request.policy.key, request.policy.community)

    def _count_classification(self, request: ClassifyRequest, result: Classification, started: float) -> None:
        policy = self._series(request)
        self._telemetry.engine_latency.record(time.monotonic() - started, policy)
        if result.prompt_tokens:
            self._count_tokens(policy, result)

    def _count_tokens(self, policy: str, result: Classification) -> None:
        tokens = self._telemetry.tokens
        tokens[(policy, "prompt")] += result.prompt_tokens
        tokens[(policy, "cached")] += result.cached_tokens
        tokens[(policy, "completion")] += result.completion_tokens


def _span_name(request: ClassifyRequest) -> str:
    return f"classify {request.policy.id}"


def _policy_attributes(request: ClassifyRequest) -> dict[str, Any]:
    return {"safeguard.policy.id": request.policy.id, "safeguard.policy.version": request.policy.version}
