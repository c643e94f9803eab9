"""The drift watch against the real broker: the per-version, per-community series a real
pipeline's /metrics exports, counted exactly, with the community labels bounded as the
settings say, and the names and labels the alerting rules read (deploy/prometheus) really
exported, so that the rules, their promtool unit tests and the exporter cannot drift apart."""

from __future__ import annotations

import re
import time
from pathlib import Path

import orjson
import pytest
import yaml

from consumer import stages
from consumer.classify import ClassificationFailed
from consumer.classify.keyword import KeywordClassifier
from consumer.events import ErrorType
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.kafka_helpers import Collector, create_topics, event_json, http_get, produce, unique, wait_for
from tests.runner import settings_for

pytestmark = pytest.mark.kafka

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
SERIES = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class GarblingClassifier(KeywordClassifier):
    """The keyword classifier, but content saying "garbled" gets an answer that cannot be read."""

    def classify_now_many(self, requests):
        return [ClassificationFailed(ErrorType.UNPARSEABLE_OUTPUT, "unreadable answer") if "garbled" in r.content
                else self.classify_now(r) for r in requests]  # fmt: skip


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if match and match[1].startswith("safeguard_"):
            found.append((match[1], dict(LABEL.findall(match[2])), float(match[3])))
    return found


def total(scraped: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for n, have, value in scraped if n == name and labels.items() <= have.items())


def what_the_rules_read() -> dict[str, set[str]]:
    """Each exported metric the rules and their unit tests' input series name, with the label
    names used with it (in selectors, `by (...)` and the input series)."""
    rules = yaml.safe_load((PROMETHEUS / "drift-rules.yaml").read_text(encoding="utf-8"))
    tests = yaml.safe_load((PROMETHEUS / "drift-rules.test.yaml").read_text(encoding="utf-8"))
    read: dict[str, set[str]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for label in by.split(",")}
            for name, selector in re.findall(r"\b(safeguard_\w+_total)(?:\{([^}]*)\})?", expr):
                read.setdefault(name, set()).update(grouped, (key for key, _ in LABEL.findall(selector)))
    for test in tests["tests"]:
        for series in test["input_series"]:
            name, labels = re.match(r"(\w+)\{(.*)\}", series["series"]).groups()
            read.setdefault(name, set()).update(key for key, _ in LABEL.findall(labels))
    return read


def test_drift_series_count_each_version_and_the_top_community_and_the_rules_read_what_is_exported(kafka, policies_dir):
    topic, group = unique("drift"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    # One community gets a label of its own; rankings every 3 s.
    settings = settings_for(kafka, group, topic, policies_dir,
                            telemetry={"community_labels": 1, "community_rank_interval_s": 3})  # fmt: skip
    policy = PolicyStore(settings.policies.directory).get()["chat-harassment"]
    pipeline = Pipeline(settings, GarblingClassifier(), PolicyStore(settings.policies.directory))
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(pipeline) as running:
            wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/readyz")[0] == 200,
                     timeout=60, message="ready")  # fmt: skip
            # Before the first ranking: 10 events of big (4 violations), 2 of small, all `other`.
            first = [event_json(i, "kys" if i < 4 else None, community_id="big") for i in range(10)]
            first += [event_json(10 + i, community_id="small") for i in range(2)]
            produce(kafka, topic, first)
            outputs.until(12, timeout=60)
            time.sleep(3.5)  # past the ranking interval: big is the top community
            # After it: 6 of big (3 violations) under its own label, 3 of small (1 violation)
            # and 2 without a community under `other`; 2 dead letters: one unreadable answer for
            # big, one record that is no JSON.
            second = [event_json(20 + i, "kys" if i < 3 else None, community_id="big") for i in range(6)]
            second += [event_json(30 + i, "kys" if i < 1 else None, community_id="small") for i in range(3)]
            second += [event_json(40 + i) for i in range(2)] + [b"{not json"]
            second += [event_json(50, "garbled", community_id="big")]
            produce(kafka, topic, second)
            messages = outputs.until(25, timeout=60)
            wait_for(lambda: pipeline.tracker.in_flight() == 0, timeout=30, message="all outputs delivered")
            text = http_get(pipeline.http.port, "/metrics")[1]
            running.stop()
    finally:
        outputs.close()

    verdicts = [orjson.loads(m.value()) for m in messages if m.topic() == f"{topic}.verdicts"]
    assert len(verdicts) == 23
    # The keyword classifier is no cascade: its results name no stage, exported as "none".
    assert {result["stage"] for verdict in verdicts for result in verdict["results"]} == {None}
    scraped = parse(text)
    results = "safeguard_policy_results_total"
    version = dict(safeguard_policy_id="chat-harassment", safeguard_policy_version=policy.version)
    assert total(scraped, results, **version, safeguard_community="big") == 6
    assert total(scraped, results, **version, safeguard_community="big", safeguard_violation="true") == 3
    assert total(scraped, results, **version, safeguard_community="other") == 10 + 2 + 3 + 2
    assert total(scraped, results, **version, safeguard_community="other", safeguard_violation="true") == 4 + 1
    assert total(scraped, results, **version, safeguard_stage="none") == 23
    assert {labels["safeguard_community"] for name, labels, _ in scraped if name == results} == {"big", "other"}
    letters = "safeguard_policy_dead_letters_total"
    assert total(scraped, letters, error_type="invalid_json", safeguard_policy_id="none",
                 safeguard_policy_version="none", safeguard_community="other") == 1  # fmt: skip
    assert total(scraped, letters, error_type="unparseable_output", **version, safeguard_community="big") == 1
    assert total(scraped, letters) == 2
    # The older figures are unchanged by the drift keys.
    assert total(scraped, "safeguard_verdicts_total", safeguard_violation="true") == 8
    assert total(scraped, "safeguard_dead_letters_total", error_type="invalid_json") == 1

    # Every metric and label the rules and their unit tests read is really exported, with the
    # same label names, and the stage values the rules compare with are stage names.
    exported = {}
    for name, labels, _ in scraped:
        exported.setdefault(name, set()).update(labels)
    read = what_the_rules_read()
    assert set(read) == {results, letters}
    for name, labels in read.items():
        assert labels == exported[name], (name, labels, exported[name])
    rules = (PROMETHEUS / "drift-rules.yaml").read_text(encoding="utf-8")
    assert set(re.findall(r'safeguard_stage!?="(\w+)"', rules)) == {stages.UNDECIDED}
