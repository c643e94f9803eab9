"""The loop on one screen: consume -> decode -> route -> batch+classify -> produce -> commit.

Each step is delegated to its stage module; this module only wires them together. The poll
thread hands the event loop a batch of records at a time; a record whose answers are at
hand (a decode error, a keyword match, a cascade cache hit: the classifier's `classify_now`)
is decided and its output sent within that call, and only a record that needs the batcher
(the engine) gets a task of its own. Delivery reports are served on the loop too.

This module also owns the shutdown order that the at-least-once guarantee needs:

1. stop handing on new records (the source keeps polling, so the group membership holds);
2. let in-flight records finish, up to `pipeline.shutdown_deadline_s`;
3. flush the producer, so every output that can be delivered is;
4. commit the positions the tracker allows (only delivered records) and leave the group.

A fatal producer or consumer error skips straight to 4 and the run ends with a non-zero code;
nothing past what was delivered is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Message, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Status, StatusCode

from consumer import telemetry, verdict
from consumer.batcher import Batcher
from consumer.classify import Classification, ClassificationFailed, Classifier, ClassifyNow, ClassifyRequest
from consumer.config import Settings
from consumer.context import Conversations, Offenders
from consumer.decode import DecodeError, Decoder
from consumer.events import ContentEvent, ErrorType
from consumer.health import HealthServer
from consumer.offsets import OffsetTracker, Ticket
from consumer.output_budget import OutputBudget
from consumer.policy import PolicyStore, PolicyWatcher, most_severe
from consumer.route import Router
from consumer.sink import Sink, TransactionalSink
from consumer.source import Received, Source, read_tail

log = logging.getLogger(__name__)

# How often delivery reports are served while no records arrive: the added delivery latency.
SINK_SERVE_INTERVAL_S = 0.005
# How often the producer is served while no output awaits a report.
SINK_IDLE_SERVE_S = 0.5


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
            registry=self.metrics_registry,
        )
        self.health: HealthServer | None = None
        self._heartbeat = time.monotonic()
        self._classifier_ready = False
        self._engine_problem: str | None = None
        self._stopping: asyncio.Event | None = None
        self._outputs_sent: asyncio.Event | None = None  # set when an output was sent: reports to serve
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: str | None = None
        self._stop_requested = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.consumed = 0

    def stop(self) -> None:
        """Ask the pipeline to drain and stop; safe to call from any thread."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self, install_signal_handlers: bool = True) -> RunResult:
        cfg = self.settings
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._outputs_sent = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stopping.set)
        producer_config = cfg.kafka.producer_options | {"bootstrap.servers": cfg.kafka.bootstrap_servers}
        budget = OutputBudget(producer_config, cfg.kafka.verdict_topic, cfg.kafka.dead_letter_topic)
        await asyncio.to_thread(budget.load)
        problem = budget.check(cfg.pipeline.max_payload_bytes)
        if problem:  # a configuration error: nothing consumed, before anything started
            return RunResult(2, 0, 0, 0, problem)

        if cfg.telemetry.http_port is not None:
            self.health = HealthServer(
                cfg.telemetry.http_host, cfg.telemetry.http_port, self.metrics_registry, self._alive, self._ready
            )
            self.health.start()
        heartbeat = self._loop.create_task(self._beat(), name="heartbeat")

        await self.classifier.start()
        # What is loaded by now (a model's Python objects above all) lives as long as the
        # process: out of the collector's sight, full collections stay short.
        gc.freeze()
        self._classifier_ready = True
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
                budget=budget,
            )
        else:
            self.sink = (self._sink_factory or Sink)(
                producer_config,
                cfg.kafka.verdict_topic,
                cfg.kafka.dead_letter_topic,
                on_delivered=self.tracker.done_many,
                on_fatal=self._fail_threadsafe,
                delivery_retries=cfg.pipeline.delivery_retries,
                budget=budget,
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
        gauges.held_back = lambda: getattr(self.sink, "held_back", 0)
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
        serving = self._loop.create_task(self._serve_sink(), name="sink")
        self.batcher.start()
        self.source.start()
        log.info("consuming %s as group %s", ",".join(cfg.kafka.input_topics), cfg.kafka.group_id)

        await self._stopping.wait()
        if cfg.policies.reload_interval_s > 0:
            watcher.stop()
        await self._shutdown(serving)
        heartbeat.cancel()
        if self.health is not None:
            self.health.stop()
        self.telemetry.shutdown()
        # Only what the broker acknowledged (or, exactly once, what a committed transaction holds).
        verdicts, dead_letters = self.sink.verdicts_delivered, self.sink.dead_letters_delivered
        if self._fatal:
            return RunResult(1, self.consumed, verdicts, dead_letters, self._fatal)
        return RunResult(0, self.consumed, verdicts, dead_letters)

    async def _shutdown(self, serving: asyncio.Task[None]) -> None:
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
        serving.cancel()  # the flush below serves what is left
        await asyncio.gather(serving, return_exceptions=True)
        await self.batcher.close()
        undelivered = await asyncio.to_thread(self.sink.flush, max(1.0, deadline - time.monotonic()))
        if undelivered:
            log.warning("%d outputs undelivered at shutdown; their records were not committed", undelivered)
        await asyncio.to_thread(self.source.close)
        self.sink.close()
        await self.classifier.close()
        log.info("stopped: consumed %d; delivered verdicts %d, dead letters %d",
                 self.consumed, self.sink.verdicts_delivered, self.sink.dead_letters_delivered)

    async def _serve_sink(self) -> None:
        """Delivery reports, between batches of records (`_receive` serves after each batch
        too): every SINK_SERVE_INTERVAL_S while any are awaited, else every SINK_IDLE_SERVE_S
        (the producer's client errors, such as failed authentication, come the same way)."""
        assert self._outputs_sent is not None
        while True:
            if not self.sink.awaiting_reports():
                self._outputs_sent.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SINK_IDLE_SERVE_S):
                        await self._outputs_sent.wait()
            self._serve()
            await asyncio.sleep(SINK_SERVE_INTERVAL_S)

    def _serve(self) -> None:
        try:
            self.sink.serve()
        except Exception as exc:  # noqa: BLE001 - unserved reports would stall every commit: stop instead
            log.exception("serving the producer failed")
            self._fail(f"serving the producer failed: {type(exc).__name__}: {exc}")

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
        """A poll batch, on the loop. Each record is decided at once when every answer is at
        hand (a decode error, a keyword match, a cascade cache hit): no task, no await. The
        others wait for the batcher in a task of their own."""
        loop = asyncio.get_running_loop()
        consumed = self.telemetry.consumed
        self.consumed += len(received)
        for message, ticket in received:
            consumed[message.topic()] += 1
            record = _Record(message, ticket, self.telemetry.record_span(message))
            try:
                waiting = self._decide_now(record)
            except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
                self._internal_error(record, exc)
                waiting = None
            if waiting is None:
                record.span.end()
                continue
            task = loop.create_task(self._decide_later(record, *waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._serve()

    def _decide_now(self, record: _Record) -> tuple[list[ClassifyRequest], list[Classification | None]] | None:
        """Decode, keep the conversation, route and ask for instant answers. Returns None when
        the record's output was sent, else its requests and the answers found so far."""
        message, span = record.message, record.span
        topic = message.topic()
        try:
            event = self.decoder.decode(message.value(), fallback_event_id=f"{topic}-{message.partition()}-{message.offset()}")
        except DecodeError as exc:
            self._dead_letter(record, exc.error_type, str(exc))
            return None
        record.event = event
        if record.traced:
            span.set_attribute("safeguard.event_id", event.event_id)
            if self.telemetry.trace_content:
                span.set_attribute("safeguard.content", event.content)
        # What the classifier sees: the conversation so far, authors pseudonymised.
        view = self.conversations.observe(event)
        if event.metadata.get("event_type") == "delete":
            self._send_verdict(record, [], note="deleted: left the conversation")
            return None
        policies = self.router.policies_for(topic, event)
        if not policies:
            self._dead_letter(record, ErrorType.NO_POLICY, "no route or default policy matches")
            return None
        deadline = record.started + self.settings.pipeline.classify_timeout_s
        requests = [ClassifyRequest(view, policy, f"{event.event_id}/{policy.id}", deadline) for policy in policies]
        try:
            answers = [self._answer_now(request, record) for request in requests]
        except Exception as exc:  # noqa: BLE001 - a failing classifier costs this record only
            self._conclude(record, requests, [exc])
            return None
        if None in answers:
            return requests, answers
        self._conclude(record, requests, answers)
        return None

    async def _decide_later(
        self, record: _Record, requests: list[ClassifyRequest], answers: list[Classification | None]
    ) -> None:
        """Wait for the answers that need the batcher (the engine), then send the output."""
        try:
            missing = [i for i, answer in enumerate(answers) if answer is None]
            outcomes: list[object]
            if len(missing) == 1:  # the common case: no gather, whose tasks cost more than a cheap classification
                try:
                    outcomes = [await self._classify_later(requests[missing[0]], record.span)]
                except Exception as exc:  # noqa: BLE001 - handled in _conclude, as gather would return it
                    outcomes = [exc]
            else:
                outcomes = await asyncio.gather(
                    *(self._classify_later(requests[i], record.span) for i in missing), return_exceptions=True
                )
            completed: list[object] = list(answers)
            for i, outcome in zip(missing, outcomes):
                completed[i] = outcome
            self._conclude(record, requests, completed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
            self._internal_error(record, exc)
        finally:
            record.span.end()

    def _conclude(self, record: _Record, requests: list[ClassifyRequest], outcomes: list[object]) -> None:
        """The verdict from every policy's classification, or a dead letter for the first failure."""
        latency_ms = (time.monotonic() - record.started) * 1000
        results = []
        for request, outcome in zip(requests, outcomes):
            if isinstance(outcome, BaseException):
                failure = outcome if isinstance(outcome, ClassificationFailed) else ClassificationFailed(
                    ErrorType.CLASSIFIER_ERROR, f"{type(outcome).__name__}: {outcome}"
                )
                self._dead_letter(record, failure.error_type, str(failure), failure.raw_output, failure.attempts)
                return
            assert isinstance(outcome, Classification)
            results.append(verdict.policy_result(request.policy, outcome, latency_ms))
        self._send_verdict(record, results)

    def _answer_now(self, request: ClassifyRequest, record: _Record) -> Classification | None:
        """The classifier's instant answer (`classify_now`), or None if it needs the batcher."""
        if self._classify_now is None:
            return None
        started_ns = time.time_ns() if record.traced else 0
        started = time.monotonic()
        try:
            result = self._classify_now(request)
            if result is not None:
                self._check(result)
        except Exception as exc:
            if record.traced:
                failure = exc.error_type.value if isinstance(exc, ClassificationFailed) else None
                self._classify_span(request, record.span, started_ns, failure)
            raise
        if result is None:
            return None
        if record.traced:
            self._classify_span(request, record.span, started_ns, result=result)
        self._count_classification(request, result, started)
        return result

    async def _classify_later(self, request: ClassifyRequest, event_span: Span) -> Classification:
        """One (event, policy) classification through the batcher; with tracing on, in a child
        span of the event's, current while the classifier runs."""
        started = time.monotonic()
        if not event_span.is_recording():
            result = self._check(await self.batcher.classify(request))
        else:
            with self.telemetry.tracer.start_as_current_span(
                **_classify_span_options(request, event_span),
                record_exception=False,  # exception text can quote model output
                set_status_on_exception=False,
            ) as span:
                try:
                    result = self._check(await self.batcher.classify(request))
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
        span = self.telemetry.tracer.start_span(**_classify_span_options(request, event_span), start_time=started_ns)
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
        if self.telemetry.trace_content and result.reasoning:
            span.set_attribute("safeguard.reasoning", result.reasoning)

    def _check(self, result: object) -> Classification:
        if not isinstance(result, Classification):
            raise ClassificationFailed(
                ErrorType.UNPARSEABLE_OUTPUT,
                f"classifier {self.classifier.name} returned {type(result).__name__}, not a Classification",
                raw_output=repr(result)[:2000],
            )
        return result

    def _count_classification(self, request: ClassifyRequest, result: Classification, started: float) -> None:
        t = self.telemetry
        policy = request.policy.id
        t.engine_latency.record((time.monotonic() - started) * 1000, policy)
        if result.prompt_tokens:
            t.tokens[(policy, "prompt")] += result.prompt_tokens
            t.tokens[(policy, "cached")] += result.cached_tokens
            t.tokens[(policy, "completion")] += result.completion_tokens

    # -- outputs --------------------------------------------------------------------------------

    def _send_verdict(self, record: _Record, results: list[verdict.Document], note: str | None = None) -> None:
        event, message, span = record.event, record.message, record.span
        assert event is not None
        violation = any(r["violation"] for r in results)
        action, offences = self.offenders.record(
            event.community_id, event.author_id, violation, most_severe([r["action"] for r in results])
        )
        latency_ms = (time.monotonic() - record.started) * 1000
        document = verdict.verdict(
            event.event_id,
            verdict.source_of(message),
            violation,
            action,
            results,
            author_id=event.author_id,
            community_id=event.community_id,
            context_id=event.context_id,
            offender_violations=offences if self.offenders.enabled and event.author_id else None,
            note=note,
            latency_ms=latency_ms,
        )
        if record.traced:
            span.set_attributes({"safeguard.violation": violation, "safeguard.action": action})
        self.sink.send_verdict(document, message, record.ticket, telemetry.inject(span))
        self._outputs_sent.set()  # type: ignore[union-attr]
        counts = self.telemetry.verdicts
        for result in results:
            counts[(result["policy_id"], result["violation"], result["action"])] += 1
        self.telemetry.e2e_latency.record(latency_ms, "verdict")

    def _dead_letter(
        self,
        record: _Record,
        error_type: ErrorType,
        reason: str,
        raw_output: str | None = None,
        attempts: int = 1,
    ) -> None:
        event_id = record.event.event_id if record.event is not None else None
        letter = verdict.dead_letter(record.message, error_type, reason, event_id, raw_output, attempts)
        span = record.span
        if record.traced:
            span.set_status(Status(StatusCode.ERROR, error_type.value))
            span.set_attribute("error.type", error_type.value)
        self.sink.send_dead_letter(letter, record.message, record.ticket, telemetry.inject(span))
        self._outputs_sent.set()  # type: ignore[union-attr]
        self.telemetry.dead_letters[error_type.value] += 1
        self.telemetry.e2e_latency.record((time.monotonic() - record.started) * 1000, "dead_letter")

    def _internal_error(self, record: _Record, exc: Exception) -> None:
        message = record.message
        log.error("unexpected error on %s[%d]@%d", message.topic(), message.partition(), message.offset(),
                  exc_info=exc)  # fmt: skip
        try:
            self._dead_letter(record, ErrorType.CLASSIFIER_ERROR, f"internal error: {type(exc).__name__}")
        except Exception as again:  # noqa: BLE001 - no output possible: stop before committing past it
            self._fail(f"cannot send a dead letter for {message.topic()}[{message.partition()}]@{message.offset()}: "
                       f"{type(again).__name__}: {again}")  # fmt: skip


def _classify_span_options(request: ClassifyRequest, event_span: Span) -> dict[str, Any]:
    """Name, parent and attributes of a classification's span, a child of the event's."""
    return {
        "name": f"classify {request.policy.id}",
        "context": trace.set_span_in_context(event_span),
        "attributes": {"safeguard.policy.id": request.policy.id, "safeguard.policy.version": request.policy.version},
    }


class _Record:
    """One record on its way through the pipeline."""

    __slots__ = ("message", "ticket", "span", "traced", "started", "event")

    def __init__(self, message: Message, ticket: Ticket, span: Span):
        self.message = message
        self.ticket = ticket
        self.span = span
        self.traced = span.is_recording()
        self.started = time.monotonic()
        self.event: ContentEvent | None = None


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
