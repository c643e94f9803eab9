"""The dashboard's policy health panel: each policy version's results as the consumer's drift
metrics count them.

The console is a process of its own; the figures live in the consumer's. With
`review.console.metrics_url` set (the consumer's `/metrics`, `telemetry.http_port`), the dashboard
reads it when it is shown and sums the drift series (`safeguard_policy_results_total`,
`safeguard_policy_dead_letters_total`, the ones `deploy/prometheus/drift-rules.yaml` alerts on)
over communities, per policy version: results, the share of found violations (an undecided guess
is none, as in the verdict), the undecided share, dead letters, and the stage mix. They are counts
since that consumer started, over the communities the drift series export (the top ones and
`other`); the alerts compare windows, this panel shows where each version stands. A consumer that
does not answer within a couple of seconds leaves the panel saying so; the rest of the dashboard
does not wait longer than that.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from consumer import stages

RESULTS = "safeguard_policy_results_total"
DEAD_LETTERS = "safeguard_policy_dead_letters_total"
READ_TIMEOUT_S = 2.0
MAX_BYTES = 8 << 20  # a scrape larger than this is not a consumer's /metrics


@dataclass
class PolicyHealth:
    """One policy version's results since the consumer started."""

    policy_id: str
    version: str
    results: int = 0
    violations: int = 0
    undecided: int = 0
    dead_letters: int = 0
    stages: Counter[str] = field(default_factory=Counter)

    @property
    def violation_share(self) -> float:
        return self.violations / self.results if self.results else 0.0

    @property
    def undecided_share(self) -> float:
        return self.undecided / self.results if self.results else 0.0


def policy_health(text: str) -> list[PolicyHealth]:
    """The drift series of a Prometheus exposition, summed per policy version (sorted by policy, version)."""
    found: dict[tuple[str, str], PolicyHealth] = {}

    def of(labels: dict[str, str]) -> PolicyHealth:
        key = (labels.get("safeguard_policy_id", "none"), labels.get("safeguard_policy_version", "none"))
        return found.setdefault(key, PolicyHealth(*key))

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            count = int(sample.value)
            if sample.name == RESULTS:
                health = of(sample.labels)
                stage = sample.labels.get("safeguard_stage", "none")
                health.results += count
                health.stages[stage] += count
                if stage == stages.UNDECIDED:
                    health.undecided += count
                elif sample.labels.get("safeguard_violation") == "true":
                    health.violations += count
            elif sample.name == DEAD_LETTERS and sample.labels.get("safeguard_policy_id", "none") != "none":
                of(sample.labels).dead_letters += count  # a record that never reached a policy is no policy's
    return [found[key] for key in sorted(found)]


def read_policy_health(url: str, timeout_s: float = READ_TIMEOUT_S) -> tuple[list[PolicyHealth], str | None]:
    """The panel's rows from the consumer's /metrics, or no rows and why (blocking: call it off the event loop)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - an http(s) URL from the config
            text = answer.read(MAX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [], f"the consumer's metrics at {url} did not answer ({getattr(exc, 'reason', exc)})"
    if len(text) > MAX_BYTES:
        return [], f"the answer of {url} is larger than {MAX_BYTES >> 20} MiB: not a consumer's /metrics"
    try:
        return policy_health(text.decode("utf-8", "replace")), None
    except ValueError as exc:
        return [], f"the answer of {url} is not Prometheus text ({exc})"
