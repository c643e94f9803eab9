"""The loop on one screen: consume -> decode -> route -> batch+classify -> produce -> commit.

Each step is delegated to its stage module; this module only wires them together and owns
the shutdown order that the at-least-once guarantee needs:

1. stop handing on new records (the source keeps polling, so the group membership holds);
2. let in-flight records finish, up to `pipeline.shutdown_deadline_s`;
3. flush the producer, so every output that can be delivered is;
4. commit the positions the tracker allows (only delivered records) and leave the group.

A fatal producer or consumer error skips straight to 4 and the run ends with a non-zero code;
nothing past what was delivered is committed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from confluent_kafka import Message, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Status, StatusCode

import consumer
from consumer import telemetry
from consumer.batcher import Batcher
from consumer.classify import Classification, ClassificationFailed, Classifier, ClassifyNow, ClassifyRequest
from consumer.config import Settings
from consumer.context import SEVERITY, Conversations, Offenders
from consumer.decode import DecodeError, Decoder
from consumer.events import (
    ContentEvent,
    DeadLetter,
    DeadLetterError,
    ErrorType,
    OriginalRecord,
    PolicyResult,
    SourceRecord,
    Verdict,
)
from consumer.health import HealthServer
from consumer.offsets import OffsetTracker, Ticket
from consumer.policy import Policy, PolicyStore, PolicyWatcher, most_severe
from consumer.route import Router
from consumer.sink import Sink, TransactionalSink
from consumer.source import Received, Source, read_tail

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int
    consumed: int
    verdicts: int
    dead_letters: int
    reason: str = ""


class Pipeline:
    """One consumer instance. `run()` returns when stopped (signal, `stop()`, or a fatal error)."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        policies: PolicyStore,
        source_factory: Callable[..., Source] = Source.connect,
        sink_factory: Callable[..., Sink] | None = None,
        tracer_provider: TracerProvider | None = None,
    ):
        """`source_factory` and `sink_factory` replace the Kafka source and the at-least-once sink
        (a replay reads assigned partitions and may write to a file); `tracer_provider`: where
        spans go, by default the one the OTEL_* variables describe."""
        self.settings = settings
        self.classifier = classifier
        self._classify_now: ClassifyNow | None = getattr(classifier, "classify_now", None)
        self.policies = policies
        # The router reads the store per event, so a reload applies to the next event routed.
        self.router = Router(settings.policies, policies.get)
        self.tracker = OffsetTracker()
        self.decoder = Decoder(settings.pipeline.max_payload_bytes, settings.decode.field_mapping)
        self.conversations = Conversations(settings.chat)
        self.offenders = Offenders(settings.chat)
        self._source_factory = source_factory
        self._sink_factory = sink_factory
        meter_provider, self.metrics_registry = telemetry.prometheus_meter_provider()
        self.telemetry = telemetry.Telemetry.create(
            settings.kafka.group_id,
            meter_provider,
            tracer_provider or telemetry.tracer_provider_from_env(),
            trace_content=settings.telemetry.trace_content,
        )
        self.health: HealthServer | None = None
        self._heartbeat = time.monotonic()
        self._classifier_ready = False
        self._engine_problem: str | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: str | None = None
        self._stop_requested = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.consumed = 0
        self.verdicts = 0
        self.dead_letters = 0

    def stop(self) -> None:
        """Ask the pipeline to drain and stop; safe to call from any thread."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self, install_signal_handlers: bool = True) -> RunResult:
        cfg = self.settings
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stopping.set)

        if cfg.telemetry.http_port is not None:
            self.health = HealthServer(
                cfg.telemetry.http_host, cfg.telemetry.http_port, self.metrics_registry, self._alive, self._ready
            )
            self.health.start()
        heartbeat = self._loop.create_task(self._beat(), name="heartbeat")

        await self.classifier.start()
        self._classifier_ready = True
        producer_config = cfg.kafka.producer_options | {"bootstrap.servers": cfg.kafka.bootstrap_servers}
        committer = None
        if cfg.pipeline.delivery == "exactly_once" and self._sink_factory is None:
            self.sink = committer = TransactionalSink(
                producer_config,
                cfg.kafka.verdict_topic,
                cfg.kafka.dead_letter_topic,
                self.tracker,
                transactional_id=cfg.pipeline.transactional_id or f"{cfg.kafka.group_id}-{socket.gethostname()}",
                on_fatal=self._fail_threadsafe,
                max_records=cfg.pipeline.transaction_max_records,
            )
        else:
            self.sink = (self._sink_factory or Sink)(
                producer_config,
                cfg.kafka.verdict_topic,
                cfg.kafka.dead_letter_topic,
                on_delivered=self.tracker.done,
                on_fatal=self._fail_threadsafe,
                delivery_retries=cfg.pipeline.delivery_retries,
            )
        self.batcher = Batcher(
            self.classifier,
            max_batch_size=cfg.pipeline.max_batch_size,
            max_wait_s=cfg.pipeline.max_batch_wait_ms / 1000,
            timeout_s=cfg.pipeline.classify_timeout_s,
            max_batch_tokens=cfg.pipeline.max_batch_tokens,
            completion_tokens=cfg.pipeline.completion_tokens_estimate,
            latency_target_s=(
                cfg.pipeline.adaptive_latency_target_ms / 1000 if cfg.pipeline.adaptive_latency_target_ms else None
            ),
        )
        self.source = self._source_factory(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.group_id,
            cfg.kafka.consumer_options,
            topics=cfg.kafka.input_topics,
            tracker=self.tracker,
            deliver=self._receive_threadsafe,
            on_fatal=self._fail_threadsafe,
            max_in_flight_events=cfg.pipeline.max_in_flight_events,
            max_in_flight_bytes=cfg.pipeline.max_in_flight_bytes,
            commit_interval_s=cfg.pipeline.commit_interval_s,
            revoke_drain_s=cfg.pipeline.revoke_drain_s,
            statistics_interval_ms=cfg.telemetry.statistics_interval_ms,
            committer=committer,
            on_assigned=self._rebuild_chat_state,
        )
        gauges = self.telemetry.gauges
        gauges.in_flight = self.tracker.in_flight
        gauges.lag = lambda: self.source.lag
        gauges.policy_reloads = lambda: self.policies.reloads
        gauges.cascade = lambda: getattr(self.classifier, "counters", {})
        b = self.batcher
        gauges.batcher = lambda: {
            "avg_batch_size": b.avg_batch_size, "avg_batch_tokens": b.avg_batch_tokens,
            "in_flight_requests": b.in_flight, "in_flight_tokens": b.in_flight_tokens, "window": b.window,
            "queued": b.queued, "avg_queue_wait_s": b.avg_queue_wait_s,
        }  # fmt: skip
        watcher = PolicyWatcher(self.policies, cfg.policies.reload_interval_s)
        if cfg.policies.reload_interval_s > 0:
            watcher.start()
        await asyncio.to_thread(self.sink.start)
        self.batcher.start()
        self.source.start()
        log.info("consuming %s as group %s", ",".join(cfg.kafka.input_topics), cfg.kafka.group_id)

        await self._stopping.wait()
        if cfg.policies.reload_interval_s > 0:
            watcher.stop()
        await self._shutdown()
        heartbeat.cancel()
        if self.health is not None:
            self.health.stop()
        self.telemetry.shutdown()
        if self._fatal:
            return RunResult(1, self.consumed, self.verdicts, self.dead_letters, self._fatal)
        return RunResult(0, self.consumed, self.verdicts, self.dead_letters)

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self.settings.pipeline.shutdown_deadline_s
        self.source.stop_accepting()
        if not self._fatal:
            drained = await asyncio.to_thread(self.tracker.wait_until_drained, max(0.0, deadline - time.monotonic()))
            if not drained:
                log.warning("shutdown deadline passed with %d records in flight; they will be read again",
                            self.tracker.in_flight())
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.batcher.close()
        undelivered = await asyncio.to_thread(self.sink.flush, max(1.0, deadline - time.monotonic()))
        if undelivered:
            log.warning("%d outputs undelivered at shutdown; their records were not committed", undelivered)
        await asyncio.to_thread(self.source.close)
        self.sink.close()
        await self.classifier.close()
        log.info("stopped: consumed %d, verdicts %d, dead letters %d",
                 self.consumed, self.verdicts, self.dead_letters)

    # -- chat state -----------------------------------------------------------------------------

    def _rebuild_chat_state(self, consumer_: object, partitions: list) -> None:
        """Read back a bounded tail so conversations and offender counts survive restarts.

        Runs on the poll thread before the partitions' first records are handed on.
        """
        cfg = self.settings
        tail = cfg.chat.rebuild_records
        if not tail or not (self.conversations.enabled or self.offenders.enabled):
            return
        client = cfg.kafka.consumer_options | {"bootstrap.servers": cfg.kafka.bootstrap_servers}
        assigned = {(tp.topic, tp.partition) for tp in partitions}
        if self.conversations.enabled:
            committed = consumer_.committed(partitions, timeout=10)  # type: ignore[attr-defined]
            ranges = [(tp.topic, tp.partition, tp.offset - tail, tp.offset) for tp in committed if tp.offset > 0]
            for message in read_tail(client, ranges):
                try:
                    self.conversations.remember(self.decoder.decode(message.value(), "rebuild"))
                except DecodeError:
                    continue
        if self.offenders.enabled:
            topic = cfg.kafka.verdict_topic
            metadata = consumer_.list_topics(topic, timeout=10)  # type: ignore[attr-defined]
            ranges = []
            for partition in metadata.topics[topic].partitions if topic in metadata.topics else ():
                _, high = consumer_.get_watermark_offsets(  # type: ignore[attr-defined]
                    TopicPartition(topic, partition), timeout=10
                )
                ranges.append((topic, partition, high - tail, high))
            verdicts = (orjson.loads(m.value()) for m in read_tail(client, ranges))
            self.offenders.replay(
                v for v in verdicts if (v.get("source", {}).get("topic"), v.get("source", {}).get("partition")) in assigned
            )
        log.info("rebuilt chat state for %d partitions: %d conversations, %d authors",
                 len(partitions), len(self.conversations), len(self.offenders))

    # -- health ---------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Marks the loop alive every second, and asks the classifier for its health (an engine
        whose core died) every `telemetry.engine_health_interval_s`, so /healthz fails and the
        orchestrator restarts it."""
        check_health = getattr(self.classifier, "check_health", None)
        interval = self.settings.telemetry.engine_health_interval_s
        next_check = time.monotonic() + interval
        while True:
            self._heartbeat = time.monotonic()
            if check_health is not None and self._classifier_ready and self._heartbeat >= next_check:
                next_check = self._heartbeat + interval
                try:
                    await check_health()
                    self._engine_problem = None
                except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
                    self._engine_problem = f"classifier {self.classifier.name} unhealthy: {type(exc).__name__}: {exc}"
                    log.error("%s", self._engine_problem)
            await asyncio.sleep(1.0)

    def _alive(self) -> tuple[bool, str]:
        if not self._classifier_ready:
            return True, "starting"  # loading a model may hold the loop; the startup probe covers it
        stalled = time.monotonic() - self._heartbeat
        if stalled > self.settings.telemetry.heartbeat_timeout_s:
            return False, f"event loop unresponsive for {stalled:.0f}s"
        if self._fatal:
            return False, f"stopping after a fatal error: {self._fatal}"
        if self._engine_problem:
            return False, self._engine_problem
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if not self._classifier_ready:
            return False, f"classifier {self.classifier.name} starting"
        source = getattr(self, "source", None)
        if source is None or not source.assigned:
            return False, "waiting for a partition assignment"
        return True, f"ok: {len(source.assigned)} partitions assigned"

    # -- from the stage threads ---------------------------------------------------------------

    def _receive_threadsafe(self, received: Received) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._receive, received)

    def _fail_threadsafe(self, reason: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail, reason)

    def _fail(self, reason: str) -> None:
        if self._fatal is None:
            self._fatal = reason
        assert self._stopping is not None
        self._stopping.set()

    # -- one record -----------------------------------------------------------------------------

    def _receive(self, received: Received) -> None:
        loop = asyncio.get_running_loop()
        consumed = self.telemetry.consumed
        for message, ticket in received:
            self.consumed += 1
            consumed[message.topic()] += 1
            task = loop.create_task(self._process(message, ticket))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, message: Message, ticket: Ticket) -> None:
        started = time.monotonic()
        span = self.telemetry.event_span(
            telemetry.extract(message.headers()), message.topic(), message.partition(), message.offset(), message.key()
        )
        try:
            await self._decide(message, ticket, span, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
            log.exception("unexpected error on %s[%d]@%d", message.topic(), message.partition(), message.offset())
            await self._dead_letter(
                message, ticket, span, started, ErrorType.CLASSIFIER_ERROR, f"internal error: {type(exc).__name__}"
            )
        finally:
            span.end()

    async def _decide(self, message: Message, ticket: Ticket, span: Span, started: float) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        try:
            event = self.decoder.decode(message.value(), fallback_event_id=f"{topic}-{partition}-{offset}")
        except DecodeError as exc:
            await self._dead_letter(message, ticket, span, started, exc.error_type, str(exc))
            return
        span.set_attribute("safeguard.event_id", event.event_id)
        if self.telemetry.trace_content:
            span.set_attribute("safeguard.content", event.content)
        # What the classifier sees: the conversation so far, authors pseudonymised.
        view = self.conversations.observe(event)
        if event.metadata.get("event_type") == "delete":
            await self._send_verdict(message, ticket, span, started, event, [], note="deleted: left the conversation")
            return
        policies = self.router.policies_for(topic, event)
        if not policies:
            await self._dead_letter(
                message, ticket, span, started, ErrorType.NO_POLICY, "no route or default policy matches", event
            )
            return
        try:
            results = await self._classify(view, policies, span, started)
        except ClassificationFailed as exc:
            await self._dead_letter(
                message, ticket, span, started, exc.error_type, str(exc), event, exc.raw_output, exc.attempts
            )
            return
        await self._send_verdict(message, ticket, span, started, event, results)

    async def _send_verdict(
        self,
        message: Message,
        ticket: Ticket,
        span: Span,
        started: float,
        event: ContentEvent,
        results: list[PolicyResult],
        note: str | None = None,
    ) -> None:
        violation = any(r.violation for r in results)
        action, offences = self.offenders.record(
            event.community_id, event.author_id, violation, most_severe([r.action for r in results])
        )
        verdict = Verdict(
            event_id=event.event_id,
            source=_source_record(message),
            violation=violation,
            action=action,
            severity=SEVERITY.get(action, "low"),
            results=results,
            author_id=event.author_id,
            community_id=event.community_id,
            context_id=event.context_id,
            offender_violations=offences if self.offenders.enabled and event.author_id else None,
            note=note,
            latency_ms=(time.monotonic() - started) * 1000,
            consumer_version=consumer.__version__,
        )
        span.set_attributes({"safeguard.violation": verdict.violation, "safeguard.action": verdict.action})
        await self.sink.send_verdict(verdict, message.key(), ticket, telemetry.inject(span))
        self.verdicts += 1
        for result in results:
            self.telemetry.verdicts[(result.policy_id, result.violation, result.action)] += 1
        self.telemetry.e2e_latency.record(verdict.latency_ms, {"safeguard.outcome": "verdict"})

    async def _classify(
        self, event: ContentEvent, policies: list[Policy], span: Span, started: float
    ) -> list[PolicyResult]:
        deadline = started + self.settings.pipeline.classify_timeout_s
        requests = [
            ClassifyRequest(event=event, policy=p, request_id=f"{event.event_id}/{p.id}", deadline=deadline)
            for p in policies
        ]
        if len(requests) == 1:  # the common case: no gather, whose tasks cost more than a cheap classification
            try:
                outcomes: list[object] = [await self._classify_one(requests[0], span)]
            except Exception as exc:  # noqa: BLE001 - handled below, as gather would return it
                outcomes = [exc]
        else:
            outcomes = await asyncio.gather(*(self._classify_one(r, span) for r in requests), return_exceptions=True)
        results = []
        for request, outcome in zip(requests, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, ClassificationFailed):
                    raise outcome
                raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, f"{type(outcome).__name__}: {outcome}")
            results.append(
                PolicyResult(
                    policy_id=request.policy.id,
                    policy_version=request.policy.version,
                    violation=outcome.violation,
                    category=outcome.category,
                    rule_ids=outcome.rule_ids,
                    confidence=outcome.confidence,
                    rationale=outcome.rationale,
                    action=request.policy.action_for(outcome.violation, outcome.category),
                    reasoning=outcome.reasoning,
                    model=outcome.model,
                    stage=outcome.stage,
                    latency_ms=(time.monotonic() - started) * 1000,
                )
            )
        return results

    async def _classify_one(self, request: ClassifyRequest, event_span: Span) -> Classification:
        """One (event, policy) classification; with tracing on, in a child span of the event's."""
        t = self.telemetry
        started = time.monotonic()
        if not event_span.is_recording():
            result = await self._checked(request)
        else:
            with t.tracer.start_as_current_span(
                f"classify {request.policy.id}",
                context=trace.set_span_in_context(event_span),
                attributes={"safeguard.policy.id": request.policy.id, "safeguard.policy.version": request.policy.version},
                record_exception=False,  # exception text can quote model output
                set_status_on_exception=False,
            ) as span:
                try:
                    result = await self._checked(request)
                except ClassificationFailed as exc:
                    span.set_status(Status(StatusCode.ERROR, exc.error_type.value))
                    raise
                span.set_attributes(
                    {"safeguard.model": result.model, "gen_ai.usage.input_tokens": result.prompt_tokens,
                     "gen_ai.usage.output_tokens": result.completion_tokens,
                     "safeguard.cached_tokens": result.cached_tokens, "safeguard.violation": result.violation}
                )  # fmt: skip
                if t.trace_content and result.reasoning:
                    span.set_attribute("safeguard.reasoning", result.reasoning)
        t.engine_latency.record((time.monotonic() - started) * 1000, {"safeguard.policy.id": request.policy.id})
        if result.prompt_tokens:
            policy = request.policy.id
            t.tokens[(policy, "prompt")] += result.prompt_tokens
            t.tokens[(policy, "cached")] += result.cached_tokens
            t.tokens[(policy, "completion")] += result.completion_tokens
        return result

    async def _checked(self, request: ClassifyRequest) -> Classification:
        result = self._classify_now(request) if self._classify_now is not None else None
        if result is None:
            result = await self.batcher.classify(request)
        if not isinstance(result, Classification):
            raise ClassificationFailed(
                ErrorType.UNPARSEABLE_OUTPUT,
                f"classifier {self.classifier.name} returned {type(result).__name__}, not a Classification",
                raw_output=repr(result)[:2000],
            )
        return result

    async def _dead_letter(
        self,
        message: Message,
        ticket: Ticket,
        span: Span,
        started: float,
        error_type: ErrorType,
        reason: str,
        event: ContentEvent | None = None,
        raw_output: str | None = None,
        attempts: int = 1,
    ) -> None:
        letter = DeadLetter(
            error=DeadLetterError(type=error_type, message=reason, raw_output=raw_output),
            source=_source_record(message),
            original=OriginalRecord.capture(message.key(), message.value(), message.headers()),
            event_id=event.event_id if event else None,
            attempts=attempts,
            failed_at=datetime.now(timezone.utc),
            consumer_version=consumer.__version__,
        )
        span.set_status(Status(StatusCode.ERROR, error_type.value))
        span.set_attribute("error.type", error_type.value)
        await self.sink.send_dead_letter(letter, message.key(), ticket, telemetry.inject(span))
        self.dead_letters += 1
        self.telemetry.dead_letters[error_type.value] += 1
        self.telemetry.e2e_latency.record((time.monotonic() - started) * 1000, {"safeguard.outcome": "dead_letter"})


def _source_record(message: Message) -> SourceRecord:
    ts_type, ts = message.timestamp()
    return SourceRecord(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        timestamp_ms=ts if ts_type else None,
    )


class BackgroundPipeline:
    """Runs a Pipeline on its own thread and asyncio loop (the demo, in-process tests)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(self.pipeline.run(install_signal_handlers=False))

    def start(self) -> BackgroundPipeline:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> RunResult:
        self.pipeline.stop()
        self._thread.join(timeout)
        if self._thread.is_alive() or self.result is None:
            raise RuntimeError("the pipeline did not stop in time")
        return self.result

    def __enter__(self) -> BackgroundPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()
