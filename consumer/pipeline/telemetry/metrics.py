"""Metrics: the pipeline's counters and gauges as OpenTelemetry instruments read by a Prometheus
reader, and two latency histograms counted in plain Python (`LatencyHistogram`) in the same
registry; `consumer.pipeline.http` serves them on `/metrics`.

A stage that exports figures of its own declares them beside the figures themselves (`Figure`,
e.g. `Batcher.FIGURES`); `PipelineMetrics.observe_figures` makes one gauge of each, so a
figure's name is written once.

Verdicts and dead letters are also counted per policy version and community label (the drift
watch, `deploy/prometheus/drift-rules.yaml`): one counter key per result carries them all, and
each exported metric sums the keys it needs at scrape time, so the hot path counts once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider

from consumer.pipeline.telemetry.drift import OTHER, CommunityLabels

# Seconds, Prometheus's base unit.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_KINDS = ("prompt", "cached", "completion")


@dataclass(frozen=True)
class Figure:
    """One figure a stage exports as a gauge: read from the stage's `attribute` at scrape time."""

    attribute: str
    description: str
    unit: str = ""


@dataclass
class Gauges:
    """Callbacks the observable instruments read at scrape time (set by the pipeline)."""

    in_flight: Callable[[], int] = lambda: 0
    held_back: Callable[[], int] = lambda: 0
    lag: Callable[[], dict[tuple[str, int], int]] = dict
    policy_reloads: Callable[[], int] = lambda: 0
    cascade: Callable[[], dict[str, Any]] = dict  # policy id -> consumer.classify.cascade PolicyCounters


@dataclass
class PipelineMetrics:
    """The metric instruments one pipeline reports to, and the plain counters they read."""

    meter: Meter
    gauges: Gauges = field(default_factory=Gauges)

    def __post_init__(self) -> None:
        m = self.meter
        # Counted in plain dicts on the hot path and read by observable counters at scrape time:
        # an SDK `Counter.add` per record costs more than the rest of a cheap record's handling.
        self.consumed: Counter[str] = Counter()  # by topic
        # By (policy id, violation, action, policy version, stage, community label). A None stage
        # is a classifier without a cascade (exported as "none"); a None community is a key no
        # drift series shows (a series expected before it happens, or the counts of a community
        # that lost its label).
        self.verdicts: Counter[tuple[str, bool, str, str, str | None, str | None]] = Counter()
        # By (error.type, policy id, policy version, community label); "" for no policy (the
        # record failed before one was asked).
        self.dead_letters: Counter[tuple[str, str, str, str | None]] = Counter()
        self.communities = CommunityLabels(evicted=self.evict)
        self.tokens: Counter[tuple[str, str]] = Counter()  # by (policy id, kind)
        m.create_observable_counter(
            "safeguard.events.consumed", [self._observe_consumed], description="records read from input topics"
        )
        m.create_observable_counter(
            "safeguard.verdicts", [self._observe_verdicts], description="verdicts by policy and outcome"
        )
        m.create_observable_counter(
            "safeguard.dead_letters", [self._observe_dead_letters], description="dead letters by error.type"
        )
        m.create_observable_counter(
            "safeguard.policy.results", [self._observe_policy_results],
            description="policy results by policy version, community (top N, the rest: other), stage and violation",
        )  # fmt: skip
        m.create_observable_counter(
            "safeguard.policy.dead_letters", [self._observe_policy_dead_letters],
            description="dead letters by error.type, policy version (none: before classification) and community",
        )  # fmt: skip
        m.create_observable_counter(
            "safeguard.tokens", [self._observe_tokens], description="tokens by kind: prompt, cached, completion"
        )
        self.e2e_latency = LatencyHistogram(
            "safeguard_event_duration_seconds", "consumed to output sent", "safeguard_outcome"
        )
        self.engine_latency = LatencyHistogram(
            "safeguard_classify_duration_seconds", "one classification, queue wait included", "safeguard_policy_id"
        )
        m.create_observable_counter(
            "safeguard.policy.reloads", [self._observe_reloads], description="policy sets reloaded"
        )
        m.create_observable_gauge("safeguard.in_flight", [self._observe_in_flight], description="records in flight")
        m.create_observable_counter(
            "safeguard.outputs.held_back", [self._observe_held_back],
            description="outputs that waited for room in the producer's queue: the broker is slower than the consumer",
        )  # fmt: skip
        m.create_observable_gauge(
            "safeguard.consumer.lag", [self._observe_lag], description="messages behind the end, per partition"
        )
        m.create_observable_counter(
            "safeguard.cascade.decided", [self._observe_decided], description="events decided, by policy and stage"
        )
        for kind in ("cache_hit", "escalation", "shadow_disagreement"):
            m.create_observable_gauge(
                f"safeguard.cascade.{kind}_ratio", [self._cascade_rate(kind)],
                description=f"per policy: the {kind.replace('_', ' ')} rate (0 to 1)",
            )  # fmt: skip
        m.create_observable_gauge(
            "safeguard.cascade.calibration_error", [self._observe_calibration],
            description="expected calibration error of each learned stage, per policy",
        )  # fmt: skip

    def _observe_consumed(self, _: CallbackOptions) -> Iterable[Observation]:
        for topic, count in list(self.consumed.items()):
            yield Observation(count, {"messaging.destination.name": topic})

    def _observe_verdicts(self, _: CallbackOptions) -> Iterable[Observation]:
        totals: Counter[tuple[str, bool, str]] = Counter()
        for (policy, violation, action, *_), count in list(self.verdicts.items()):
            totals[(policy, violation, action)] += count
        for (policy, violation, action), count in totals.items():
            yield Observation(
                count,
                {"safeguard.policy.id": policy, "safeguard.violation": str(violation).lower(), "safeguard.action": action},
            )

    def _observe_policy_results(self, _: CallbackOptions) -> Iterable[Observation]:
        totals: Counter[tuple[str, str, str, str, bool]] = Counter()
        for (policy, violation, _action, version, stage, community), count in list(self.verdicts.items()):
            if community is not None:
                totals[(policy, version, community, stage or "none", violation)] += count
        for (policy, version, community, stage, violation), count in totals.items():
            yield Observation(count, {
                "safeguard.policy.id": policy, "safeguard.policy.version": version, "safeguard.community": community,
                "safeguard.stage": stage, "safeguard.violation": str(violation).lower(),
            })  # fmt: skip

    def _observe_dead_letters(self, _: CallbackOptions) -> Iterable[Observation]:
        totals: Counter[str] = Counter()
        for (error_type, *_), count in list(self.dead_letters.items()):
            totals[error_type] += count
        for error_type, count in totals.items():
            yield Observation(count, {"error.type": error_type})

    def _observe_policy_dead_letters(self, _: CallbackOptions) -> Iterable[Observation]:
        for (error_type, policy, version, community), count in list(self.dead_letters.items()):
            if community is not None:
                yield Observation(count, {
                    "error.type": error_type, "safeguard.policy.id": policy or "none",
                    "safeguard.policy.version": version or "none", "safeguard.community": community,
                })  # fmt: skip

    def evict(self, communities: set[str]) -> None:
        """Fold the counts of communities that lost their label into keys no drift series shows,
        and their own policies' series into `other` (`CommunityLabels.policy_series`): the totals
        keep them, the cardinality stays bounded. Runs on the event loop, as the counting."""
        owned = tuple(f"{community}/" for community in communities)
        for (policy, violation, action, version, stage, community) in list(self.verdicts):
            if community in communities or policy.startswith(owned):
                folded = (OTHER, OTHER) if policy.startswith(owned) else (policy, version)
                count = self.verdicts.pop((policy, violation, action, version, stage, community))
                self.verdicts[(folded[0], violation, action, folded[1], stage,
                               None if community in communities else community)] += count  # fmt: skip
        for (error_type, policy, version, community) in list(self.dead_letters):
            if community in communities or policy.startswith(owned):
                folded = (OTHER, OTHER) if policy.startswith(owned) else (policy, version)
                count = self.dead_letters.pop((error_type, policy, version, community))
                self.dead_letters[(error_type, *folded, None if community in communities else community)] += count
        for (policy, kind) in [key for key in self.tokens if key[0].startswith(owned)]:
            self.tokens[(OTHER, kind)] += self.tokens.pop((policy, kind))
        self.engine_latency.fold(owned, OTHER)

    def _observe_tokens(self, _: CallbackOptions) -> Iterable[Observation]:
        for (policy, kind), count in list(self.tokens.items()):
            yield Observation(count, {"safeguard.policy.id": policy, "safeguard.token.kind": kind})

    def _observe_held_back(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.held_back())

    def _observe_in_flight(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.in_flight())

    def _observe_lag(self, _: CallbackOptions) -> Iterable[Observation]:
        for (topic, partition), lag in self.gauges.lag().items():
            yield Observation(lag, {"messaging.destination.name": topic, "messaging.destination.partition.id": str(partition)})

    def _observe_decided(self, _: CallbackOptions) -> Iterable[Observation]:
        for policy, counters in self.gauges.cascade().items():
            for stage, count in counters.decided.items():
                yield Observation(count, {"safeguard.policy.id": policy, "safeguard.stage": stage})

    def _cascade_rate(self, kind: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for policy, c in self.gauges.cascade().items():
                yield Observation(getattr(c, f"{kind}_rate"), {"safeguard.policy.id": policy})

        return observe

    def _observe_calibration(self, _: CallbackOptions) -> Iterable[Observation]:
        for policy, c in self.gauges.cascade().items():
            for stage, error in c.calibration_error.items():
                if error is not None:
                    yield Observation(error, {"safeguard.policy.id": policy, "safeguard.stage": stage})

    def _observe_reloads(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.policy_reloads())

    def observe_figures(self, declared: Mapping[str, Figure], stage: object) -> None:
        """One gauge per figure `stage` declares (metric name -> `Figure`), read from it at scrape time."""
        for name, figure in declared.items():
            self.meter.create_observable_gauge(
                name, [self._figure(stage, figure.attribute)], unit=figure.unit, description=figure.description
            )

    @staticmethod
    def _figure(stage: object, attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(getattr(stage, attribute))

        return observe

    def expect(self, topics: Iterable[str], policies: Iterable[Any], error_types: Iterable[str]) -> None:
        """Every counter's series at 0 from the start, so a rate() or an alert on a series that
        has not happened yet (no dead letter so far) works: the named input topics, each
        policy's verdict outcomes and token kinds, every dead-letter error.type."""
        for topic in topics:
            self.consumed.setdefault(topic, 0)
        for error_type in error_types:
            self.dead_letters.setdefault((error_type, "", "", None), 0)
        for policy in policies:
            if policy.community is not None:  # its series appear once its community is labelled
                continue
            outcomes = {(False, policy.action_for(False, None)), (True, policy.action_for(True, None))}
            outcomes.update((True, policy.action_for(True, category)) for category in policy.categories)
            for violation, action in outcomes:
                self.verdicts.setdefault((policy.id, violation, action, policy.version, None, None), 0)
            for kind in TOKEN_KINDS:
                self.tokens.setdefault((policy.id, kind), 0)


class LatencyHistogram:
    """A latency histogram by one label, counted in plain lists and exposed to Prometheus as a
    collector of the registry.

    Not an SDK Histogram: its `record` costs about 20 µs (attribute hashing, locks,
    measurement objects), more than everything else a cheaply decided record costs. Recorded
    on the event loop only; a scrape reads the lists as they are.
    """

    def __init__(self, name: str, description: str, label: str, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.name = name
        self.description = description
        self.label = label
        self.bounds = bounds
        # label value -> [count per bucket..., count above the last bound, sum of the values]
        self._series: dict[str, list[float]] = {}

    def record(self, value: float, label_value: str, count: int = 1) -> None:
        """`count` observations of `value` (a batch decided together: one call, not one per record)."""
        series = self._series.get(label_value)
        if series is None:
            series = self._series[label_value] = [0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += count  # the first bucket whose bound is >= value
        series[-1] += value * count

    def record_many(self, values: list[float], label_value: str) -> None:
        """Each of `values` once (a batch's latencies): one label lookup for all of them."""
        series = self._series.get(label_value)
        if series is None:
            series = self._series[label_value] = [0] * (len(self.bounds) + 2)
        bounds = self.bounds
        for value in values:
            series[bisect_left(bounds, value)] += 1
        series[-1] += sum(values)

    def fold(self, prefixes: tuple[str, ...], into: str) -> None:
        """Add the series whose label starts with one of `prefixes` into the series `into`."""
        for label_value in [value for value in self._series if value.startswith(prefixes)]:
            folded = self._series.pop(label_value)
            target = self._series.setdefault(into, [0] * (len(self.bounds) + 2))
            for i, count in enumerate(folded):
                target[i] += count

    def expect(self, label_value: str) -> None:
        """The series at 0 before its first observation."""
        self._series.setdefault(label_value, [0] * (len(self.bounds) + 2))

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.description, labels=[self.label])
        for label_value, series in list(self._series.items()):
            series = list(series)
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), series[:-1]):
                cumulative += int(count)
                buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
            family.add_metric([label_value], buckets, series[-1])
        yield family


def prometheus_meter_provider() -> tuple[MeterProvider, Any]:
    """A MeterProvider whose metrics a Prometheus registry exposes; returns (provider, registry)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    # A registry of its own, so two pipelines in one process (tests) do not share series.
    registry = CollectorRegistry()
    # No otel_scope_* labels on every series: one scope (this consumer) says nothing.
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    return MeterProvider(metric_readers=[reader]), registry
