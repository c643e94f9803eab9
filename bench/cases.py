"""The benchmark cases that run in the consumer's own environment, one per process.

`python -m bench.cases CASE SPEC_JSON` runs one case against the broker and topics of the
spec and prints `RESULT {json}` as its last line. The orchestrator is bench.pipeline_bench.

- raw: consume -> produce the same bytes, flush and commit every COMMIT_EVERY records;
- hand: the loop a user writes by hand for our job: consume, decode (orjson), validate
  (ContentEvent), an instant verdict, produce keyed like the input, flush and commit every
  COMMIT_EVERY records (at least once, like ours);
- keyword-floor: the keyword case's own work (our decoder, classifier, verdict documents,
  delivery reports, offset tracker) in one loop written by hand, without the pipeline: what
  ours costs above it is the pipeline's own;
- ours: safeguard-consumer's Pipeline with an instant classifier;
- keyword, cascade-lexical, cascade-embedding: the Pipeline with the classifiers users run
  without a GPU: `classifier.kind: keyword`, and the cascade with `reasoner: none` (cache
  and lexical stage; cache, lexical and embedding stages), trained from the policy's examples;
- engine-sat / engine-half: ours against SimulatedEngine, on a backlog (saturation) and on a
  live stream at half the engine's throughput.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import sys
import threading
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError

from bench.workload import POLICY_ID, REPO, Meter, Spec, chat_events, instant_verdict, report
from consumer.classify import Capacity, Classification, ClassifyRequest
from consumer.classify.keyword import KeywordClassifier
from consumer.config import load_settings
from consumer.decode import wire
from consumer.events import ContentEvent
from consumer.kafka import records
from consumer.kafka.client import PARTITION_UA
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.roles import SourceFactory, SourceOptions, SourceWiring
from consumer.kafka.options import PRODUCER_DEFAULTS
from consumer.kafka.source import CONSUMER_DEFAULTS, Source
from consumer.pipeline import outputs
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from consumer.pipeline.telemetry.tracing import tracer_provider_from_env
from consumer.sinks.roles import SinkFactory

COMMIT_EVERY = 1000
STAGE_CASES = ("ours", "keyword", "cascade-lexical", "cascade-embedding")  # the cases `--stages` splits
CONSUMER = {**CONSUMER_DEFAULTS, "enable.auto.commit": False}


# -- 1 and 2: the Kafka client alone, and the loop written by hand ---------------------------------


def run_loop(spec: Spec, transform: bool) -> dict[str, Any]:
    consumer = Consumer({**CONSUMER, "bootstrap.servers": spec.bootstrap, "group.id": spec.group})
    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": spec.bootstrap})
    consumer.subscribe([spec.input_topic])
    meter = Meter()
    delivered = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            raise KafkaException(err)
        delivered[0] += 1

    positions: dict[int, int] = {}
    uncommitted = 0

    def commit() -> None:
        producer.flush()  # at least once: only what the broker acknowledged is committed
        consumer.commit(
            offsets=[TopicPartition(spec.input_topic, p, o) for p, o in positions.items()], asynchronous=False
        )

    consumed = 0
    while delivered[0] < spec.events:
        for msg in consumer.consume(500, 0.1):
            if msg.error() is not None:
                continue
            meter.first_record()
            consumed += 1
            if transform:
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                try:
                    event = ContentEvent.model_validate(orjson.loads(msg.value()))
                except (orjson.JSONDecodeError, ValidationError):
                    out, value = spec.dead_letter_topic, msg.value()
                else:
                    out = spec.output_topic
                    value = instant_verdict(event.event_id, topic, partition, offset, msg.timestamp()[1])
            else:
                out, value, partition, offset = spec.output_topic, msg.value(), msg.partition(), msg.offset()
            while True:
                try:
                    producer.produce(out, value=value, key=msg.key(), on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.01)
            positions[partition] = offset + 1
            uncommitted += 1
        producer.poll(0)
        if uncommitted >= COMMIT_EVERY or consumed >= spec.events:
            commit()
            uncommitted = 0
    meter.done()
    consumer.close()
    return meter.result(spec.events)


class _FloorReport:
    """A delivery report held as the sink holds its own (`consumer.sinks.kafka._Report`): the
    client releases it when the output is delivered."""

    __slots__ = ("delivered", "ticket", "sent")

    def __init__(self, delivered: list[Any], ticket: Any):
        self.delivered, self.ticket, self.sent = delivered, ticket, False

    def __call__(self, err: Any, _msg: Any) -> None:
        raise KafkaException(err)  # a failed delivery: the case fails

    def __del__(self) -> None:
        if self.sent:
            self.delivered.append(self.ticket)


def run_keyword_floor(spec: Spec) -> dict[str, Any]:
    """The keyword case's own work in one loop written by hand: our decoder, the keyword
    classifier, our verdict documents, a `traceparent` for each output, delivery reports held as
    the sink holds them, our offset tracker and a commit a second. Not here: the pipeline's
    stages, its event loop and poll thread, sampled spans, metrics, routing, the conversation,
    offender counts and the size budget. What ours costs above this is the pipeline's own."""
    consumer = Consumer({**CONSUMER, "bootstrap.servers": spec.bootstrap, "group.id": spec.group})
    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": spec.bootstrap, "delivery.report.only.error": True})
    consumer.subscribe([spec.input_topic])
    policy = PolicyStore(REPO / "policies").get()[POLICY_ID]
    classifier = KeywordClassifier()
    tracker = OffsetTracker()
    meter = Meter()
    delivered: list[Any] = []
    done = 0
    committed_at = time.monotonic()
    while done < spec.events:
        batch = [m for m in consumer.consume(500, 0.1) if m.error() is None]
        if batch:
            meter.first_record()
        tickets = tracker.track_many([(m.topic(), m.partition(), m.offset(), len(m.value())) for m in batch])
        for message, ticket in zip(batch, tickets):
            started = time.monotonic()
            event = wire.read_json(message.value(), message)
            if event is None:
                raise SystemExit("the bench's input decodes on the fast way")
            outcome = classifier.classify_now(ClassifyRequest(event, policy, event.event_id))
            latency_ms = (time.monotonic() - started) * 1000
            result = outputs.policy_result(policy, outcome, latency_ms)
            document = outputs.verdict(event.event_id, records.source_of(message), outcome.violation,
                                       result["action"], [result], event.author_id, event.community_id,
                                       event.context_id, None, None, latency_ms)  # fmt: skip
            parent = b"00-%032x-%016x-00" % (random.getrandbits(128), random.getrandbits(64))
            report = _FloorReport(delivered, ticket)
            producer.produce(spec.output_topic, orjson.dumps(document), message.key(), PARTITION_UA, report, None, 0,
                             [("traceparent", parent)])  # fmt: skip
            report.sent = True
            del report  # the client holds the last reference
        producer.poll(0)
        if delivered:
            done += len(delivered)
            tracker.done_many(delivered)
            delivered.clear()
        if time.monotonic() - committed_at >= 1.0 or done >= spec.events:
            positions = tracker.commit_positions()
            if positions:
                offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]
                consumer.commit(offsets=offsets, asynchronous=True)
                tracker.mark_committed(positions)
            committed_at = time.monotonic()
    meter.done()
    consumer.close()
    return meter.result(spec.events)


# -- 4 and 5: ours --------------------------------------------------------------------------------


class InstantClassifier:
    """Answers at once (as keyword matches and cache hits do): what the pipeline costs without
    any engine. `classify_now` lets the pipeline skip the batcher, as it does for those."""

    name = "instant"
    _answer = Classification(violation=False, model="instant")

    def __init__(self, max_sequences: int = 1024) -> None:
        self._capacity = Capacity(max_sequences=max_sequences)

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return self._capacity

    async def classify(self, request: ClassifyRequest) -> Classification:
        return self._answer

    def classify_now(self, request: ClassifyRequest) -> Classification:
        return self._answer

    async def close(self) -> None:
        return None


class SimulatedEngine:
    """An engine of fixed capacity: `max_sequences` slots, latency from a prefill/decode token model.

    A request occupies a slot for `uncached prompt tokens x prefill_s + completion_tokens x
    decode_s`; the policy prefix is computed once per policy version (prefix cache). Requests
    beyond the slots wait in the engine's own queue, as vLLM's do; `overfilled` counts them,
    which a batcher that keeps its promise never causes.
    """

    name = "simulated"

    def __init__(
        self,
        max_sequences: int = 256,
        prefill_s: float = 20e-6,
        decode_s: float = 8e-3,
        completion_tokens: int = 32,
    ) -> None:
        self.max_sequences = max_sequences
        self.prefill_s = prefill_s
        self.decode_s = decode_s
        self.completion_tokens = completion_tokens
        self._slots: asyncio.Semaphore | None = None
        self._cached: set[str] = set()
        self.active = 0
        self.overfilled = 0
        self.busy_s = 0.0
        self.first_start: float | None = None
        self.last_end = 0.0
        self.own_latency_s: dict[str, float] = {}

    @property
    def throughput(self) -> float:
        """Requests per second at full occupancy, for chat-sized content."""
        return self.max_sequences / (30 * self.prefill_s + self.completion_tokens * self.decode_s)

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_sequences)

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self.max_sequences)

    async def classify(self, request: ClassifyRequest) -> Classification:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        submitted = loop.time()
        self.active += 1
        self.overfilled = max(self.overfilled, self.active - self.max_sequences)
        try:
            async with self._slots:
                started = loop.time()
                if self.first_start is None:
                    self.first_start = started
                uncached = len(request.event.content) // 4 + 1
                if request.policy.ref not in self._cached:
                    self._cached.add(request.policy.ref)
                    uncached += len(request.policy.text) // 4
                service = uncached * self.prefill_s + self.completion_tokens * self.decode_s
                await asyncio.sleep(service)
                self.last_end = loop.time()
                self.busy_s += self.last_end - started
        finally:
            self.active -= 1
        self.own_latency_s[request.event.event_id] = loop.time() - submitted
        return Classification(violation=False, model=self.name, completion_tokens=self.completion_tokens)

    async def close(self) -> None:
        return None

    def utilisation(self) -> float:
        if self.first_start is None or self.last_end <= self.first_start:
            return 0.0
        return self.busy_s / (self.max_sequences * (self.last_end - self.first_start))


def build_pipeline(
    spec: Spec, classifier: Any, source_factory: SourceFactory = Source.connect, sink_factory: SinkFactory | None = None
) -> tuple[Meter, Pipeline]:
    """Our Pipeline on the spec's topics, its source metered from the first record read;
    `source_factory` and `sink_factory` as `Pipeline` takes them (bench/loop_path.py: memory)."""
    settings = load_settings(
        None,
        {
            "kafka.bootstrap_servers": spec.bootstrap,
            "kafka.group_id": spec.group,
            "kafka.input_topics": [spec.input_topic],
            "kafka.verdict_topic": spec.output_topic,
            "kafka.dead_letter_topic": spec.dead_letter_topic,
            "policies.directory": str(REPO / "policies"),
            "policies.default": "chat-harassment",
            "policies.reload_interval_s": 0,
            "telemetry.http_port": 0,  # any free port: cases may run beside a consumer on 8080
            **{f"pipeline.{k}": v for k, v in spec.options.get("pipeline", {}).items()},
            **spec.options.get("settings", {}),  # pipeline_bench --set
        },
    )
    meter = Meter()

    def metered_source(options: SourceOptions, wiring: SourceWiring) -> Source:
        def first_then_deliver(received: Any) -> None:
            meter.first_record()
            wiring.deliver(received)

        return source_factory(options, dataclasses.replace(wiring, deliver=first_then_deliver))

    provider = tracer_provider_from_env()
    if provider is not None and spec.options.get("counted"):
        # The exporter's first use (its connection, what it loads) before the window (bench.callgrind).
        sampled = SpanContext(1, 1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))  # followed
        provider.get_tracer("bench").start_span("warm-up", trace.set_span_in_context(NonRecordingSpan(sampled))).end()
        provider.force_flush()
    return meter, Pipeline(settings, classifier, PolicyStore(settings.policies.directory), source_factory=metered_source,
                           sink_factory=sink_factory, tracer_provider=provider)  # fmt: skip


async def run_until_done(spec: Spec, meter: Meter, pipeline: Pipeline) -> None:
    """Run the pipeline until every input record's output was acknowledged, then stop it.

    The end is seen where the pipeline hands acknowledged records on (`outputs_done`, on its event
    loop), so watching costs the case nothing: a thread that looked every 2 ms took the GIL from
    the loop 500 times a second, about 1 µs an event of the keyword case (each wake-up 60 µs of
    process CPU on this machine, measured beside a busy thread). A `--baseline` checkout from
    before `outputs_done` is still watched that way."""
    join = getattr(pipeline, "outputs_done", None)
    if join is not None:
        hand_on = join.done_many

        def done_many(tickets: Any) -> None:
            hand_on(tickets)
            if not meter.end_wall and pipeline.consumed >= spec.events and pipeline.tracker.in_flight() == 0:
                if spec.options.get("counted") and pipeline.telemetry.provider is not None:
                    pipeline.telemetry.provider.force_flush()  # the window's spans exported in it (bench.callgrind)
                meter.done()
                pipeline.stop()

        join.done_many = done_many  # the sink is wired to it when `run` starts
    else:

        def stop_when_done() -> None:
            while not (pipeline.consumed >= spec.events and pipeline.tracker.in_flight() == 0):
                time.sleep(0.002)
            meter.done()
            pipeline.stop()

        threading.Thread(target=stop_when_done, daemon=True).start()
    result = await pipeline.run(install_signal_handlers=False)
    if result.exit_code != 0:
        raise RuntimeError(f"the pipeline failed: {result.reason}")


def run_ours(
    spec: Spec, classifier: Any, source_factory: SourceFactory = Source.connect, sink_factory: SinkFactory | None = None
) -> tuple[Meter, Pipeline]:
    meter, pipeline = build_pipeline(spec, classifier, source_factory, sink_factory)
    asyncio.run(run_until_done(spec, meter, pipeline))
    return meter, pipeline


def batcher_figures(pipeline: Pipeline) -> dict[str, Any]:
    b = pipeline.batcher
    return {
        "batches": b.batches,
        "avg_batch_size": round(b.avg_batch_size, 1),
        "avg_batch_tokens": round(b.avg_batch_tokens),
        "peak_in_flight": b.peak_in_flight,
        "avg_queue_wait_ms": round(b.avg_queue_wait_s * 1000, 2),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def read_verdicts(spec: Spec, expected: int) -> list[tuple[dict[str, Any], int]]:
    """(verdict, its CreateTime in ms) for every verdict of the run."""
    consumer = Consumer(
        {**CONSUMER, "bootstrap.servers": spec.bootstrap, "group.id": spec.group + "-reader"}
    )
    consumer.subscribe([spec.output_topic])
    found: list[tuple[dict[str, Any], int]] = []
    deadline = time.monotonic() + 120
    while len(found) < expected and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            if msg.error() is None:
                found.append((orjson.loads(msg.value()), msg.timestamp()[1]))
    consumer.close()
    return found


def run_engine_saturated(spec: Spec) -> dict[str, Any]:
    engine = SimulatedEngine(**spec.options.get("engine", {}))
    meter, pipeline = run_ours(spec, engine)
    verdicts = read_verdicts(spec, spec.events)
    in_consumer = [v["latency_ms"] for v, _ in verdicts]
    return meter.result(
        spec.events,
        engine_capacity_per_s=round(engine.throughput, 1),
        utilisation=round(engine.utilisation(), 4),
        overfilled=engine.overfilled,
        p50_in_consumer_ms=round(percentile(in_consumer, 50), 1),
        p99_in_consumer_ms=round(percentile(in_consumer, 99), 1),
        **batcher_figures(pipeline),
    )


def run_engine_half_load(spec: Spec) -> dict[str, Any]:
    """A live producer at half the engine's throughput; latency from input to verdict CreateTime."""
    engine = SimulatedEngine(**spec.options.get("engine", {}))
    rate = engine.throughput / 2
    events = chat_events(spec.events, seed=11, start_id=10_000_000)

    meter, pipeline = build_pipeline(spec, engine)

    def produce_at_rate() -> None:
        # Start once the partitions are assigned: a backlog from before would measure a burst.
        while not getattr(pipeline, "source", None) or not pipeline.source.assigned:
            time.sleep(0.01)
        # linger 0: the input's timestamp is taken when it is handed over, so waiting in this
        # producer's queue is not counted against the consumer.
        producer = Producer({"bootstrap.servers": spec.bootstrap, "linger.ms": 0})
        began = time.perf_counter()
        for i, (key, value) in enumerate(events):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.produce(spec.input_topic, value=value, key=key)
            producer.poll(0)
        producer.flush(30)

    feeder = threading.Thread(target=produce_at_rate, daemon=True)
    feeder.start()
    asyncio.run(run_until_done(spec, meter, pipeline))
    feeder.join()
    verdicts = read_verdicts(spec, spec.events)
    end_to_end, added, added_in_consumer, transport = [], [], [], []
    for verdict, created_ms in verdicts:
        e2e = created_ms - verdict["source"]["timestamp_ms"]
        own_ms = engine.own_latency_s[verdict["event_id"]] * 1000
        end_to_end.append(e2e)
        added.append(e2e - own_ms)
        # Split: from the loop receiving the record to its output (ours), and before that
        # (producer, broker, fetch: Kafka's own, which a bare consumer sees too).
        added_in_consumer.append(verdict["latency_ms"] - own_ms)
        transport.append(e2e - verdict["latency_ms"])
    own = [s * 1000 for s in engine.own_latency_s.values()]
    return meter.result(
        spec.events,
        offered_per_s=round(rate, 1),
        utilisation=round(engine.utilisation(), 4),
        overfilled=engine.overfilled,
        p50_e2e_ms=round(percentile(end_to_end, 50), 1),
        p99_e2e_ms=round(percentile(end_to_end, 99), 1),
        p50_engine_ms=round(percentile(own, 50), 1),
        p99_engine_ms=round(percentile(own, 99), 1),
        p50_added_ms=round(percentile(added, 50), 1),
        p99_added_ms=round(percentile(added, 99), 1),
        p99_added_in_consumer_ms=round(percentile(added_in_consumer, 99), 1),
        p99_before_consumer_ms=round(percentile(transport, 99), 1),
        **batcher_figures(pipeline),
    )


def cpu_classifier(name: str) -> Any:
    """The classifier of a case that runs what a CPU-only user runs (`safeguard-consumer run`)."""
    if name == "keyword":
        from consumer.classify.keyword import KeywordClassifier

        return KeywordClassifier()
    from consumer.classify.cascade import CascadeSettings, make_cascade

    settings = CascadeSettings(lexical=True, embedding=name == "cascade-embedding")
    return make_cascade(settings, None, PolicyStore(REPO / "policies"))


def cascade_figures(classifier: Any) -> dict[str, Any]:
    """What decided the cascade's answers: the share per stage, all policies together."""
    counters = getattr(classifier, "counters", None)
    if not counters:
        return {}
    decided: dict[str, int] = {}
    for c in counters.values():
        for stage, n in c.decided.items():
            decided[stage] = decided.get(stage, 0) + n
    total = sum(decided.values()) or 1
    return {f"decided_{stage}": round(n / total, 3) for stage, n in decided.items() if n}


def run_case(name: str, spec: Spec) -> dict[str, Any]:
    if name in ("keyword", "cascade-lexical", "cascade-embedding"):
        classifier = cpu_classifier(name)
        meter, pipeline = run_ours(spec, classifier)
        return meter.result(spec.events, **batcher_figures(pipeline), **cascade_figures(classifier))
    if name == "raw":
        return run_loop(spec, transform=False)
    if name == "hand":
        return run_loop(spec, transform=True)
    if name == "keyword-floor":
        return run_keyword_floor(spec)
    if name == "ours":
        meter, pipeline = run_ours(spec, InstantClassifier())
        return meter.result(spec.events, **batcher_figures(pipeline))
    if name == "engine-sat":
        return run_engine_saturated(spec)
    if name == "engine-half":
        return run_engine_half_load(spec)
    raise SystemExit(f"unknown case {name!r}")


def main(argv: list[str]) -> None:
    name, spec = argv[0], Spec.from_json(argv[1])
    if spec.options.get("counted"):
        random.seed(0)  # trace ids and the sampler's draws: the same records sampled in every run (bench.instructions)
    profile, py_spy = spec.options.get("profile"), spec.options.get("stages")
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        result = run_case(name, spec)
        profiler.stop()
        with open(profile, "w", encoding="utf-8") as out:
            out.write(profiler.output_text(unicode=True, color=False, show_all=False))
    elif py_spy and name in STAGE_CASES:
        from bench.stage_split import Sampler, stages_us

        sampler = Sampler(py_spy)
        result = run_case(name, spec)
        samples = sampler.stop()
        if "cpu_us_main" in result:
            result["stages_us"] = stages_us(samples, result["cpu_us_main"])
    else:
        result = run_case(name, spec)
    report(result)


if __name__ == "__main__":
    main(sys.argv[1:])
