"""The loop on one screen: consume -> decode -> route -> batch+classify -> produce -> commit.

Each step is delegated to its stage module (the source in `consumer.kafka`, decode in
`consumer.decode`, the sink in `consumer.sinks`; chat, classify_step with the batcher, outputs
here; health and http for the probes); this module wires them together and holds the record's
path through them. The poll thread hands the event loop a batch of records at a time; a record whose answers are at
hand (a decode error, a keyword match, a cascade cache hit or cheap-stage decision: the
classifier's `classify_now_many`, asked once per batch) is decided and its output sent within
that call, and only a record that needs the batcher
(the engine) gets a task of its own. Delivery reports are served on the loop too.

This module also owns the shutdown order that the at-least-once guarantee needs:

1. stop handing on new records (the source keeps polling, so the group membership holds);
2. let in-flight records finish, up to `pipeline.shutdown_deadline_s`;
3. flush the producer, so every output that can be delivered is;
4. commit the positions the tracker allows (only delivered records) and leave the group.

A record that finds a dependency down (`consumer.errors.Unavailable`: the reasoner fleet, a
schema registry) is never a dead letter: it waits in the outage stage (`outage.py`, which
holds intake and fails `/readyz` meanwhile) and is asked again once the dependency is back. A
classifier that is gone for good (`consumer.errors.Fatal`) stops the run instead, the record
uncommitted.

A fatal producer or consumer error skips straight to 4 and the run ends with a non-zero code;
nothing past what was delivered is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span

from consumer.classify import (
    Classification,
    ClassificationFailed,
    Classifier,
    ClassifyRequest,
    CountsDecisions,
    ProbesDependency,
)
from consumer.config import Settings
from consumer.decode import DecodeError, DecodesAhead
from consumer.decode.factory import build_decoder
from consumer.errors import Fatal, Unavailable
from consumer.events import ErrorType
from consumer.kafka import roles
from consumer.kafka.budget import OutputBudget
from consumer.kafka.client import TopicPartition
from consumer.kafka.client_logs import BrokerLink, ClientLogger
from consumer.kafka.offsets import OffsetTracker, OutputJoin
from consumer.kafka.source import Received, Source
from consumer.pipeline import outputs
from consumer.pipeline.batcher import Batcher
from consumer.pipeline.chat import Conversations, Offenders, rebuild
from consumer.pipeline.classify_step import ClassifyStep
from consumer.pipeline.health import Health
from consumer.pipeline.http import HttpServer
from consumer.pipeline.outage import Outage
from consumer.pipeline.policy_topic import PolicyTopic
from consumer.pipeline.output_step import OutputStep, Record
from consumer.pipeline.shadow import Shadow, shadow_classifier
from consumer.pipeline.telemetry import Telemetry
from consumer.pipeline.telemetry.metrics import prometheus_meter_provider
from consumer.pipeline.telemetry.tracing import tracer_provider_from_env
from consumer.policy import PolicyStore, PolicyWatcher
from consumer.policy.exceptions import RoutingError
from consumer.policy.route import Router
from consumer.policy.topic import TopicPolicyStore
from consumer.review.desk import ReviewDesk
from consumer.sinks import fan_out
from consumer.sinks import roles as sink_roles
from consumer.sinks.kafka import KafkaSink, TransactionalSink, transactional_id

log = logging.getLogger(__name__)

# How often delivery reports are served while no records arrive: the added delivery latency.
SINK_SERVE_INTERVAL_S = 0.005
# How often the producer is served while no output awaits a report.
SINK_IDLE_SERVE_S = 0.5
# CPython collects its young generation every 700 net new objects. Records in flight hold tens
# each until their outputs are delivered: on the keyword path a collection every 30 records,
# finding nothing, 10 µs of a ~45 µs event (bench/, gc.callbacks). This path makes no reference
# cycles; above what records in flight hold, collections run only as the heap really grows.
GC_YOUNG_THRESHOLD = 100_000


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
        source_factory: roles.SourceFactory = Source.connect,
        sink_factory: sink_roles.SinkFactory | None = None,
        tracer_provider: TracerProvider | None = None,
    ):
        """`source_factory` and `sink_factory` replace the Kafka source and the configured sink
        (the output topics, and the files of `sinks.files`: a replay reads assigned partitions and
        writes where it is told); each is called with the options built from the settings and what
        the pipeline wires it to (`consumer.kafka.roles`, `consumer.sinks.roles`). Review runs
        when `review.enabled` and the sink carries review items (`CarriesReviewItems`); shadow
        candidates (`shadow.enabled`) only with the configured sink: a replay runs none.
        Exactly-once needs the transactional sink, which both sends the outputs and commits the
        offsets in one transaction: a replaced sink cannot, so `sink_factory` with
        `pipeline.delivery: exactly_once` is refused (ValueError) rather than run at-least-once.
        `tracer_provider`: where spans go, by default the one the OTEL_* variables describe."""
        if sink_factory is not None and settings.pipeline.delivery == "exactly_once":
            raise ValueError("pipeline.delivery exactly_once needs the transactional sink; a sink_factory cannot "
                             "join the offsets' transaction")  # fmt: skip
        self.settings = settings
        self.classifier = classifier
        self.policies = policies
        # The router reads the store per event, so a reload applies to the next event routed. A store
        # that follows the policy topic (a replay's is fixed) may be routed to policies only the topic
        # holds: the router is built once the topic is read (`run`).
        self.router: Router
        follows_topic = isinstance(policies, TopicPolicyStore) and settings.policies.topic is not None
        if not follows_topic:
            self.router = Router(settings.policies, policies.get)
        self.tracker = OffsetTracker()
        self.decoder = build_decoder(settings)
        # A registry format decodes each poll batch on the poll thread: a schema fetch never blocks the loop.
        self._decode_ahead = self.decoder.ahead if isinstance(self.decoder, DecodesAhead) else None
        self.conversations = Conversations(settings.chat)
        self.offenders = Offenders(settings.chat)
        self._source_factory = source_factory
        self._sink_factory = sink_factory or fan_out.configured(KafkaSink.open, settings.sinks.files)
        self.source: roles.RecordSource | None = None  # built by `run`
        meter_provider, self.metrics_registry = prometheus_meter_provider()
        self.telemetry = Telemetry.create(
            settings.kafka.group_id,
            meter_provider,
            tracer_provider or tracer_provider_from_env(),
            trace_content=settings.telemetry.trace_content,
            registry=self.metrics_registry,
        )
        self.telemetry.communities.top = settings.telemetry.community_labels
        self.telemetry.communities.rank_interval_s = settings.telemetry.community_rank_interval_s
        self.telemetry.expect(
            [t for t in settings.kafka.input_topics if not t.startswith("^")],
            policies.get().values(),
            [e.value for e in ErrorType],
        )
        for outcome in ("verdict", "dead_letter"):
            self.telemetry.e2e_latency.expect(outcome)
        for policy in policies.get().values():
            if policy.community is None:  # a community's own: once its community is labelled
                self.telemetry.engine_latency.expect(policy.key)
        self.reviews: ReviewDesk  # built by `run`, once the sink says whether it carries review items
        # Candidates beside the live policies on live traffic: not in a replay, whose sink is its own.
        self.shadow: Shadow | None = None  # built by `run`
        self._runs_shadows = settings.shadow.enabled and sink_factory is None
        self.outputs_done = OutputJoin(self.tracker.done_many)  # a verdict and its review items
        self.http: HttpServer | None = None
        # The brokers' reachability after start: one WARNING per change, and /readyz.
        self.link = BrokerLink(settings.kafka.bootstrap_servers)
        self.policy_topic = (
            PolicyTopic(settings, policies, self.link, self.telemetry.meter)
            if follows_topic and isinstance(policies, TopicPolicyStore) else None
        )  # fmt: skip
        # Records that find a dependency down wait here; intake holds meanwhile.
        self.outage = Outage(
            hold=lambda held: self.source.hold(held) if self.source is not None else None,
            fail=self._fail, timeout_s=settings.pipeline.outage_timeout_s,
            probe=classifier.probe if isinstance(classifier, ProbesDependency) else None,
            expected=["reasoner"] if settings.classifier.reasoner_place else [], meter=self.telemetry.meter,
        )  # fmt: skip
        self.health = Health(
            classifier, settings.telemetry.heartbeat_timeout_s, settings.telemetry.engine_health_interval_s,
            fatal=lambda: self._fatal, assigned=lambda: None if self.source is None else len(self.source.assigned),
            link=self.link, unavailable=self.outage.problem,
        )  # fmt: skip
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
        producer_config = cfg.kafka.producer_options | {"bootstrap.servers": cfg.kafka.bootstrap_servers,
                                                         "logger": ClientLogger("producer", self.link)}
        budget: OutputBudget
        if cfg.sinks.registered_outputs:  # Confluent's wire format with registered schemas (docs/registry.md)
            from consumer.sinks.registry import RegisteredBudget

            budget = RegisteredBudget(producer_config, cfg)
        else:
            budget = OutputBudget(producer_config, cfg.kafka.verdict_topic, cfg.kafka.dead_letter_topic)
        output_topics = [cfg.kafka.verdict_topic, cfg.kafka.dead_letter_topic]
        if cfg.review.enabled:
            output_topics.append(cfg.review.topic)
        try:
            await asyncio.to_thread(budget.load, output_topics)
        except Fatal as exc:  # a registered output's schema id not found: nothing consumed yet
            return RunResult(1, 0, 0, 0, str(exc))
        problem = budget.check(cfg.pipeline.max_payload_bytes)
        if problem:  # a configuration error: nothing consumed, before anything started
            return RunResult(2, 0, 0, 0, problem)

        if cfg.telemetry.http_port is not None:
            self.http = HttpServer(
                cfg.telemetry.http_host, cfg.telemetry.http_port, self.metrics_registry, self.health.alive, self.health.ready
            )
            self.http.start()
        heartbeat = self._loop.create_task(self.health.beat(), name="heartbeat")

        await self.classifier.start()
        # What is loaded by now (a model's Python objects above all) lives as long as the
        # process: out of the collector's sight, full collections stay short.
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        self.health.classifier_ready = True
        if self.policy_topic is not None:  # read whole before intake; /readyz says why while it cannot be
            unread = await self._read_policy_topic()
            if unread is not None:
                heartbeat.cancel()
                if self.http is not None:
                    self.http.stop()
                await self.classifier.close()
                self.telemetry.shutdown()
                return unread
        committer: roles.Committer | None = None
        self.sink: sink_roles.OutputSink
        if cfg.pipeline.delivery == "exactly_once":  # the constructor refused a sink factory for it
            self.sink = committer = TransactionalSink(
                producer_config,
                cfg.kafka.verdict_topic,
                cfg.kafka.dead_letter_topic,
                self.tracker,
                transactional_id=transactional_id(cfg.pipeline.transactional_id, cfg.kafka.group_id),
                on_fatal=self._fail_threadsafe,
                max_records=cfg.pipeline.transaction_max_records,
                budget=budget,
                on_done=self.outputs_done.done_many,  # a verdict and its review items, one transaction
            )
        else:
            self.sink = self._sink_factory(
                sink_roles.SinkOptions(
                    producer_config, cfg.kafka.verdict_topic, cfg.kafka.dead_letter_topic, cfg.pipeline.delivery_retries
                ),
                sink_roles.SinkWiring(
                    on_delivered=self.outputs_done.done_many, on_fatal=self._fail_threadsafe, budget=budget
                ),
            )
        # Human review needs a sink that carries review items (a replay's does not).
        self.reviews = ReviewDesk(
            cfg, self.classifier, self.policies.get, self.decoder.decode,
            enabled=cfg.review.enabled and isinstance(self.sink, sink_roles.CarriesReviewItems),
            meter=self.telemetry.meter, registry=self.metrics_registry,
        )  # fmt: skip
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
        self.classify = ClassifyStep(self.classifier, self.batcher, self.telemetry)
        if self._runs_shadows:
            self.shadow = Shadow(
                cfg.shadow, shadow_classifier(cfg, self.classifier, self.policies), self.classifier, self.policies.get,
                producer_config | {"logger": ClientLogger("shadow", self.link)}, self.telemetry.meter,
                cfg.pipeline.classify_timeout_s,
                has_reasoner=cfg.classifier.kind == "reasoner",
            )  # fmt: skip
            await self.shadow.start()
        self.output = OutputStep(self.sink, self.offenders, self.telemetry, self.outputs_done, cfg.review.topic,
                                 sent=self._outputs_sent.set)  # fmt: skip
        self.source = self._source_factory(
            roles.SourceOptions(
                bootstrap_servers=cfg.kafka.bootstrap_servers,
                group_id=cfg.kafka.group_id,
                client=cfg.kafka.consumer_options,
                topics=tuple(cfg.kafka.input_topics),
                max_in_flight_events=cfg.pipeline.max_in_flight_events,
                max_in_flight_bytes=cfg.pipeline.max_in_flight_bytes,
                commit_interval_s=cfg.pipeline.commit_interval_s,
                revoke_drain_s=cfg.pipeline.revoke_drain_s,
                statistics_interval_ms=cfg.telemetry.statistics_interval_ms,
            ),
            roles.SourceWiring(
                tracker=self.tracker,
                deliver=self._receive_threadsafe,
                on_fatal=self._fail_threadsafe,
                committer=committer,
                on_assigned=self._rebuild_chat_state,
                link=self.link,
            ),
        )
        gauges = self.telemetry.gauges
        gauges.in_flight = self.tracker.in_flight
        gauges.held_back = lambda: self.sink.held_back
        gauges.lag = lambda: self.source.lag
        gauges.policy_reloads = lambda: self.policies.reloads
        if isinstance(self.classifier, CountsDecisions):
            gauges.cascade = lambda: self.classifier.counters  # type: ignore[attr-defined]
        self.telemetry.observe_figures(self.batcher.FIGURES, self.batcher)
        watcher = PolicyWatcher(self.policies, cfg.policies.reload_interval_s)
        if cfg.policies.reload_interval_s > 0:
            watcher.start()
        if self.policy_topic is not None:
            self.policy_topic.start()
        await asyncio.to_thread(self.sink.start)
        if isinstance(self.sink, sink_roles.AsksBrokers):
            self.health.ask_brokers = self.sink.brokers_answer
        await asyncio.to_thread(self.reviews.start, self._loop, self._fail_threadsafe)
        serving = self._loop.create_task(self._serve_sink(), name="sink")
        self.batcher.start()
        self.source.start()
        log.info("consuming %s as group %s", ",".join(cfg.kafka.input_topics), cfg.kafka.group_id)

        await self._stopping.wait()
        if cfg.policies.reload_interval_s > 0:
            watcher.stop()
        if self.policy_topic is not None:
            self.policy_topic.stop()
        await self._shutdown(serving)
        heartbeat.cancel()
        if self.http is not None:
            self.http.stop()
        self.telemetry.shutdown()
        # Only what the broker acknowledged (or, exactly once, what a committed transaction holds).
        verdicts, dead_letters = self.sink.verdicts_delivered, self.sink.dead_letters_delivered
        if self._fatal:
            return RunResult(1, self.consumed, verdicts, dead_letters, self._fatal)
        return RunResult(0, self.consumed, verdicts, dead_letters)

    async def _read_policy_topic(self) -> RunResult | None:
        """The policy topic read whole (an outage meanwhile, `/readyz` failing), then the routes
        checked against the policies in force; the result to end the run with, if it must end."""
        assert self.policy_topic is not None and self._stopping is not None
        if not await self.policy_topic.read(self.outage, self._stopping):
            return RunResult(0, 0, 0, 0, "stopped before the policy topic was read")
        try:
            self.router = Router(self.settings.policies, self.policies.get)
        except RoutingError as exc:  # a configuration error: nothing consumed yet
            return RunResult(2, 0, 0, 0, f"{exc} (in the files and on policies.topic {self.policy_topic.reader.topic})")
        return None

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
        await self.outage.close()
        serving.cancel()  # the flush below serves what is left
        await asyncio.gather(serving, return_exceptions=True)
        self.output.observe()  # the verdicts of the last records, counted
        await self.batcher.close()
        if self.shadow is not None:
            await self.shadow.close(max(1.0, deadline - time.monotonic()))
        undelivered = await asyncio.to_thread(self.sink.flush, max(1.0, deadline - time.monotonic()))
        if undelivered:
            log.warning("%d outputs undelivered at shutdown; their records were not committed", undelivered)
        await asyncio.to_thread(self.source.close)
        await asyncio.to_thread(self.reviews.stop)
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
        self.output.observe()  # the verdicts sent since the last call, counted as one batch
        try:
            self.sink.serve()
        except Exception as exc:  # noqa: BLE001 - unserved reports would stall every commit: stop instead
            log.exception("serving the producer failed")
            self._fail(f"serving the producer failed: {type(exc).__name__}: {exc}")

    # -- chat state -----------------------------------------------------------------------------

    def _rebuild_chat_state(self, consumer_: Any, partitions: list[TopicPartition]) -> None:
        """On the poll thread, before the partitions' first records are handed on."""
        cfg = self.settings
        rebuild(
            consumer_, partitions, self.conversations, self.offenders,
            decode=self.decoder.decode,
            client=cfg.kafka.consumer_options | {"bootstrap.servers": cfg.kafka.bootstrap_servers,
                                                 "logger": ClientLogger("rebuild", self.link)},
            verdict_topic=cfg.kafka.verdict_topic, tail=cfg.chat.rebuild_records,
            count_offenders=self.offenders.enabled or any(
                p.offender_thresholds for p in self.policies.get().values()),
        )  # fmt: skip

    # -- from the stage threads ---------------------------------------------------------------

    def _receive_threadsafe(self, received: Received) -> None:
        assert self._loop is not None
        if self._decode_ahead is not None:
            self._decode_ahead([message for message, _ in received])
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
        """A poll batch, on the loop. Every record is decoded and routed first; then the
        classifier is asked once for all their instant answers (a decode error, a keyword
        match, a cascade cache hit or cheap-stage decision), and each record whose answers are
        all at hand is decided: no task, no await. The others wait for the batcher in a task
        of their own."""
        consumed = self.telemetry.consumed
        self.consumed += len(received)
        self.link.alive()  # records arrived: the brokers answer
        asking: list[tuple[Record, list[ClassifyRequest]]] = []
        spans = self.telemetry.record_spans([message for message, _ in received])
        for (message, ticket), span in zip(received, spans):
            consumed[message.topic()] += 1
            record = Record(message, ticket, span)
            try:
                requests = self._prepare(record)
            except Unavailable as exc:  # an outage, not the record's fault: it waits, whole
                self._spawn(self._prepare_after_outage(record, exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
                self._internal_error(record, exc)
                requests = None
            if requests is None:
                if record.traced:  # an unsampled span's end is a no-op
                    record.span.end()
            else:
                asking.append((record, requests))
        if asking:
            self._decide_now(asking)
        self._serve()

    def _prepare(self, record: Record) -> list[ClassifyRequest] | None:
        """Decode, keep the conversation, route. Returns None when the record's output was sent
        already (a dead letter, a deletion), else its requests, one per policy."""
        message, span = record.message, record.span
        topic = message.topic()
        try:
            event = self.decoder.decode(message)
        except DecodeError as exc:
            self.output.dead_letter(record, exc.error_type, str(exc))
            return None
        record.event = event
        if record.traced:
            span.set_attribute("safeguard.event_id", event.event_id)
            if self.telemetry.trace_content:
                span.set_attribute("safeguard.content", event.content)
        # What the classifier sees: the conversation so far, authors pseudonymised.
        view = self.conversations.observe_lazily(event)
        if event.metadata.get("event_type") == "delete":
            self.output.verdict(record, [], note="deleted: left the conversation")
            return None
        policies = self.router.policies_for(topic, event)
        if not policies:
            self.output.dead_letter(record, ErrorType.NO_POLICY, "no route or default policy matches")
            return None
        deadline = record.started + self.settings.pipeline.classify_timeout_s
        return [ClassifyRequest(view, policy, f"{event.event_id}/{policy.key}", deadline) for policy in policies]

    def _decide_now(self, asking: list[tuple[Record, list[ClassifyRequest]]]) -> None:
        """Ask once for the instant answers of a batch's requests; send the output of every record
        whose answers are all at hand, and start a task for each of the others."""
        requests = [request for _, rs in asking for request in rs]
        spans = [record.span for record, rs in asking for _ in rs]
        answers = self.classify.now_many(requests, spans)
        at = 0
        for record, rs in asking:
            mine, at = answers[at : at + len(rs)], at + len(rs)
            waiting = False
            for i, answer in enumerate(mine):
                if answer is None:
                    waiting = True
                elif isinstance(answer, Unavailable):  # asked again through the batcher, outage waited out
                    self.outage.report(answer)
                    mine[i], waiting = None, True
                elif isinstance(answer, BaseException):  # a dead letter now: the answers missing could not change that
                    rs, mine, waiting = [rs[i]], [answer], False
                    break
            if waiting:
                self._spawn(self._decide_later(record, rs, mine))
                continue
            try:
                self._conclude(record, rs, mine)
            except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
                self._internal_error(record, exc)
            if record.traced:
                record.span.end()

    async def _decide_later(self, record: Record, requests: list[ClassifyRequest], answers: list[object]) -> None:
        """Wait for the answers that need the batcher (the engine), then send the output."""
        try:
            missing = [i for i, answer in enumerate(answers) if answer is None]
            outcomes: list[object]
            if len(missing) == 1:  # the common case: no gather, whose tasks cost more than a cheap classification
                try:
                    outcomes = [await self._classify_through_outages(requests[missing[0]], record.span)]
                except Exception as exc:  # noqa: BLE001 - handled in _conclude, as gather would return it
                    outcomes = [exc]
            else:
                outcomes = await asyncio.gather(
                    *(self._classify_through_outages(requests[i], record.span) for i in missing),
                    return_exceptions=True,
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
            if record.traced:
                record.span.end()

    async def _classify_through_outages(self, request: ClassifyRequest, span: Span) -> Classification:
        """`classify.later`, outages waited out: on `Unavailable` the request waits for its
        dependency and is asked again, with a fresh deadline (the wait was not the request's). So
        is a request that failed as `classifier_error` while an outage began or went on: its time
        went to the outage (a deadline spent queued behind it, a connection cut by it)."""
        waited: set[str] = set()
        while True:
            downtime_s = self.outage.downtime_s()
            try:
                result = await self.classify.later(request, span)
            except Unavailable as exc:
                self.outage.report(exc)
                waited.add(exc.dependency)
                await self.outage.wait(exc.dependency)
                request.deadline = time.monotonic() + self.settings.pipeline.classify_timeout_s
                continue
            except ClassificationFailed as exc:
                if exc.error_type is not ErrorType.CLASSIFIER_ERROR or self.outage.downtime_s() == downtime_s:
                    raise
                await self.outage.wait()
                request.deadline = time.monotonic() + self.settings.pipeline.classify_timeout_s
                continue
            except Fatal as exc:
                # The classifier is gone for good (an engine core that died): the run stops, and the
                # record, never concluded, stays uncommitted for the restart to read again.
                self._fail(f"classifier {self.classifier.name}: {exc}")
                await asyncio.Event().wait()  # until the shutdown cancels this record's task
            for dependency in waited:
                self.outage.answered(dependency)
            return result

    async def _prepare_after_outage(self, record: Record, outage: Unavailable) -> None:
        """A record whose preparing (decoding) found a dependency down: prepared again once it is
        back, then decided through the batcher."""
        try:
            while True:
                self.outage.report(outage)
                await self.outage.wait(outage.dependency)
                if self._decode_ahead is not None:  # a registry's fetch may block: off the loop, as on intake
                    await asyncio.to_thread(self._decode_ahead, [record.message])
                try:
                    requests = self._prepare(record)
                except Unavailable as again:
                    outage = again
                    continue
                self.outage.answered(outage.dependency)
                break
        except asyncio.CancelledError:
            record.span.end()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost the record or the process
            self._internal_error(record, exc)
            requests = None
        if requests is None:
            if record.traced:
                record.span.end()
            return
        await self._decide_later(record, requests, [None] * len(requests))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a record's remaining work as a task of its own (cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _conclude(self, record: Record, requests: list[ClassifyRequest], outcomes: list[object]) -> None:
        """The verdict from every policy's classification, or a dead letter for the first failure."""
        latency_ms = (time.monotonic() - record.started) * 1000
        assert record.event is not None
        community = self.router.community(record.event.community_id)
        overrides = community.actions if community is not None else None
        results = []
        for request, outcome in zip(requests, outcomes):
            if isinstance(outcome, BaseException):
                failure = outcome if isinstance(outcome, ClassificationFailed) else ClassificationFailed(
                    ErrorType.CLASSIFIER_ERROR, f"{type(outcome).__name__}: {outcome}"
                )
                self.output.dead_letter(record, failure.error_type, str(failure), failure.raw_output, failure.attempts,
                                        request.policy)  # fmt: skip
                return
            assert isinstance(outcome, Classification)
            policy = request.policy
            # The community's baseline_actions replace entries of a platform policy's actions map.
            actions = overrides.get(policy.id) if overrides and policy.community is None else None
            results.append(outputs.policy_result(policy, outcome, latency_ms, actions))
        items = self.reviews.open(record.event, requests, record.message, results, outcomes)  # type: ignore[arg-type]
        if items:
            # What a reviewer is shown of the author's history: the violations before this event.
            offences = self.offenders.count(record.event.community_id, record.event.author_id,
                                            thresholds=community.offender_thresholds if community else None)
            for item in items:
                item.author_violations = offences
            self.output.review_items(record, items)
        self.reviews.remember(requests, record.event, record.message, results)
        self.output.verdict(record, results, community=community)
        if self.shadow is not None:  # after the verdict, which never waits for a candidate
            self.shadow.compare(record.message, record.event, requests, results)

    def _internal_error(self, record: Record, exc: Exception) -> None:
        message = record.message
        with trace.use_span(record.span, end_on_exit=False):  # the log line carries the record's trace id
            log.error("unexpected error on %s[%d]@%d", message.topic(), message.partition(), message.offset(),
                      exc_info=exc)  # fmt: skip
        try:
            self.output.dead_letter(record, ErrorType.CLASSIFIER_ERROR, f"internal error: {type(exc).__name__}")
        except Exception as again:  # noqa: BLE001 - no output possible: stop before committing past it
            self._fail(f"cannot send a dead letter for {message.topic()}[{message.partition()}]@{message.offset()}: "
                       f"{type(again).__name__}: {again}")  # fmt: skip
