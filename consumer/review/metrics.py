"""The review loop's metrics, read from `ReviewState` at scrape time (registered by the pipeline).

- `safeguard_review_open{policy, reason}`: review items without a decision;
- `safeguard_review_decisions_total{policy, stage, agreed}`: decisions, and whether the person
  agreed with the machine stage that answered;
- `safeguard_review_disagreement_right_total{policy, stage, side}`: for disagreement reviews,
  which side the person found right (`cheap`: the stage, `reasoner`: the shadow check);
- `safeguard_review_decision_latency_seconds`: review item created to decision taken (histogram).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from consumer.review.state import LATENCY_BUCKETS_S, ReviewState

DISAGREEMENT_SIDES = ("cheap", "reasoner")  # the cheap stage was right, or the reasoner's shadow check


def register(
    meter: Meter,
    state: ReviewState,
    registry: Any = None,
    disagreements: Callable[[], Iterable[tuple[str, str]]] = tuple,
) -> None:
    """`disagreements`: the (policy, stage) pairs whose disagreement reviews may come (the policies
    in force times the cheap stages, where review opens them); their counters show at 0 from the
    start, so an alert on them sees the series before the first decision."""

    def open_reviews(_: CallbackOptions) -> Iterable[Observation]:
        for (policy, reason), count in state.open_reviews().items():
            yield Observation(count, {"policy": policy, "reason": reason})

    def decisions(_: CallbackOptions) -> Iterable[Observation]:
        for (policy, stage, agreed), count in list(state.agreement.items()):
            yield Observation(count, {"policy": policy, "stage": stage, "agreed": str(agreed).lower()})

    def right(_: CallbackOptions) -> Iterable[Observation]:
        # Both sides of every (policy, stage) that has decisions, at 0 until counted: a rate()
        # over the series then starts at the first decision, not at the first disagreement.
        pairs = {(policy, stage) for policy, stage, _ in list(state.agreement)} | set(disagreements())
        counts = Counter({(policy, stage, side): 0 for policy, stage in pairs for side in DISAGREEMENT_SIDES})
        counts.update(dict(state.disagreement_right))
        for (policy, stage, side), count in counts.items():
            yield Observation(count, {"policy": policy, "stage": stage, "side": side})

    meter.create_observable_gauge("safeguard.review.open", [open_reviews], description="reviews awaiting a person")
    meter.create_observable_counter(
        "safeguard.review.decisions", [decisions], description="decisions, and whether the person agreed with the machine"
    )
    meter.create_observable_counter(
        "safeguard.review.disagreement_right", [right],
        description="disagreement reviews: which side the person found right",
    )  # fmt: skip
    if registry is not None:
        registry.register(_LatencyCollector(state))


class _LatencyCollector:
    """Decision latency as a Prometheus histogram, from the counts the state keeps."""

    def __init__(self, state: ReviewState):
        self._state = state

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily

        counts = list(self._state.latency_buckets)
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
        yield HistogramMetricFamily(
            "safeguard_review_decision_latency_seconds", "review item created to decision taken",
            buckets=buckets, sum_value=self._state.latency_sum_s,
        )  # fmt: skip
