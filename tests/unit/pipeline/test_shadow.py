"""The shadow stage through its public interface: the sample follows the record's coordinates,
flips are named by direction and category, candidates pair with the live policy in force (one
whose live policy is missing is logged once and ignored), a busy engine costs a measurement and
never a wait, and no candidate is ever routed as a live policy."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from consumer.classify import Capacity, Classification, ClassifyRequest
from consumer.classify.keyword import KeywordClassifier
from consumer.config import PolicySettings, load_settings
from consumer.config.shadow import ShadowSettings
from consumer.events import ContentEvent
from consumer.kafka.admin import TopicNeed
from consumer.pipeline import outputs
from consumer.pipeline.preflight import run_needs
from consumer.pipeline.shadow import Shadow, flip_category, flip_of, sampled, shadow_classifier
from consumer.pipeline.shadow_report import ShadowReport
from consumer.policy import Policy, PolicyStore
from consumer.policy.route import Router, RoutingError
from tests.conftest import REPO

LIVE = Policy(id="chat", version="live1", text="...", categories={"harassment": "", "hate": ""}, patterns=("kys",))
CANDIDATE = Policy(id="chat-v2", version="cand1", text="...", categories={"harassment": "", "hate": ""},
                   patterns=("kys", "loser"), shadow_of="chat")  # fmt: skip


class FakeMessage:
    def __init__(self, offset: int, topic: str = "chat", partition: int = 0):
        self._offset, self._topic, self._partition = offset, topic, partition

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_000_000_000)


class WaitingClassifier(KeywordClassifier):
    """Never answers at once: every candidate waits for `classify`, which waits for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    def classify_now_many(self, requests):
        return [None] * len(requests)

    async def classify(self, request: ClassifyRequest) -> Classification:
        await self.release.wait()
        return self.classify_now(request)

    def capacity(self) -> Capacity:
        return Capacity(1)


def shadow_stage(policies, classifier=None, **settings) -> Shadow:
    """`policies`: the policies in force, or what returns them (a store that reloads)."""
    live = classifier or KeywordClassifier()
    current = policies if callable(policies) else (lambda: policies)
    return Shadow(ShadowSettings(enabled=True, **settings), live, live, current,
                  {"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 1000, "log_level": 0},
                  MeterProvider().get_meter("test"), timeout_s=5, has_reasoner=False)  # fmt: skip


def compare(shadow: Shadow, offset: int, content: str, community: str | None = None, live: Policy = LIVE) -> None:
    event = ContentEvent(event_id=f"e{offset}", content=content, community_id=community)
    request = ClassifyRequest(event, live, f"e{offset}/{live.id}")
    result = outputs.policy_result(live, KeywordClassifier().classify_now(request), 1.0)
    shadow.compare(FakeMessage(offset), event, [request], [result])  # type: ignore[arg-type]


def test_the_sample_follows_the_record_coordinates():
    picks = [sampled("chat", 3, offset, 0.1) for offset in range(20_000)]
    assert picks == [sampled("chat", 3, offset, 0.1) for offset in range(20_000)]  # a re-read picks the same
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert picks != [sampled("chat", 4, offset, 0.1) for offset in range(20_000)]  # another partition, another pick
    assert not any(sampled("chat", 0, offset, 0.0) for offset in range(1000))
    assert all(sampled("chat", 0, offset, 1.0) for offset in range(1000))


@pytest.mark.parametrize(("live", "candidate", "flip", "category"), [
    ((False, None), (True, "hate"), "safe_to_violation", "hate"),
    ((True, "harassment"), (False, None), "violation_to_safe", "harassment"),
    ((True, "harassment"), (True, "hate"), "category_changed", "hate"),
    ((True, None), (False, None), "violation_to_safe", "none"),
    ((True, "hate"), (True, "hate"), None, None),
    ((False, "safe"), (False, None), None, None),  # a safe answer's category means nothing
])  # fmt: skip
def test_a_flip_is_named_by_its_direction_and_the_violations_category(live, candidate, flip, category):
    live_answer = {"violation": live[0], "category": live[1]}
    candidate_answer = {"violation": candidate[0], "category": candidate[1]}
    assert flip_of(live_answer, candidate_answer) == flip
    if flip is not None:
        assert flip_category(flip, live_answer, candidate_answer) == category


def test_a_candidate_is_never_routed_and_a_route_naming_one_is_refused():
    policies = {"chat": LIVE, "chat-v2": CANDIDATE}
    settings = PolicySettings(routes=[{"topics": ["chat"], "policies": ["chat"]}], default="chat")
    router = Router(settings, lambda: policies)
    event = ContentEvent(event_id="e", content="hi")
    assert [p.id for p in router.policies_for("chat", event)] == ["chat"]
    with pytest.raises(RoutingError, match=r"shadow candidates.*chat-v2 \(shadow_of chat\)"):
        Router(PolicySettings(routes=[{"policies": ["chat", "chat-v2"]}]), lambda: policies)
    with pytest.raises(RoutingError, match="chat-v2"):
        Router(PolicySettings(default="chat-v2"), lambda: policies)
    # An edit that makes a routed policy a candidate: from the next event on it decides nothing.
    policies["chat"] = Policy(id="chat", version="live2", text="...", shadow_of="chat-v0")
    assert router.policies_for("chat", event) == []
    assert Router(PolicySettings(default="chat"), lambda: {"chat": LIVE}).policies_for("x", event) == [LIVE]


def test_sampled_events_are_compared_and_their_flips_counted():
    async def scenario() -> Shadow:
        shadow = shadow_stage({"chat": LIVE, "chat-v2": CANDIDATE}, sample_fraction=1.0)
        compare(shadow, 0, "you loser")  # the candidate alone flags it
        compare(shadow, 1, "kys")  # both flag it
        compare(shadow, 2, "hello")  # neither
        await shadow.close(0.1)
        return shadow

    shadow = asyncio.run(scenario())
    assert shadow.compared == {("chat-v2", "cand1"): 3}
    assert shadow.flips == {("chat-v2", "cand1", "safe_to_violation", "harassment"): 1}
    assert not shadow.skipped


def test_outside_the_sample_or_without_a_candidate_nothing_is_asked():
    async def scenario(policies: dict[str, Policy], fraction: float) -> Shadow:
        shadow = shadow_stage(policies, sample_fraction=fraction)
        for offset in range(20):
            compare(shadow, offset, "you loser")
        await shadow.close(0.1)
        return shadow

    assert not asyncio.run(scenario({"chat": LIVE, "chat-v2": CANDIDATE}, 0.0)).compared
    assert not asyncio.run(scenario({"chat": LIVE}, 1.0)).compared


def test_a_candidate_whose_live_policy_is_not_in_force_is_logged_once_and_ignored(caplog):
    orphan = Policy(id="spam-v2", version="o1", text="...", shadow_of="spam", patterns=("buy",))

    async def scenario() -> Shadow:
        store = {"current": {"chat": LIVE, "spam-v2": orphan}}
        shadow = shadow_stage(lambda: store["current"], sample_fraction=1.0)
        compare(shadow, 0, "buy now")
        store["current"] = {"chat": LIVE, "spam-v2": orphan}  # a reload: the same orphan is not logged again
        compare(shadow, 1, "buy now")
        await shadow.close(0.1)
        return shadow

    with caplog.at_level(logging.WARNING, logger="consumer.pipeline.shadow"):
        shadow = asyncio.run(scenario())
    assert not shadow.compared
    warnings = [r.getMessage() for r in caplog.records if "spam-v2" in r.getMessage()]
    assert warnings == ["shadow candidate spam-v2: its live policy spam is not in force; the candidate is ignored"]


def test_a_communitys_candidate_of_a_platform_policy_sees_that_communitys_events_only():
    kids = Policy(id="chat-kids", version="k1", text="...", categories={"harassment": ""}, patterns=("loser",),
                  shadow_of="chat", community="kids")  # fmt: skip

    async def scenario() -> Shadow:
        shadow = shadow_stage({"chat": LIVE, "kids/chat-kids": kids}, sample_fraction=1.0)
        compare(shadow, 0, "you loser", community="kids")
        compare(shadow, 1, "you loser", community="gamers")
        compare(shadow, 2, "you loser")
        await shadow.close(0.1)
        return shadow

    shadow = asyncio.run(scenario())
    assert shadow.compared == {("kids/chat-kids", "k1"): 1}


def test_candidates_waiting_for_the_engine_beyond_the_limit_are_skipped_not_waited_for():
    async def scenario() -> Shadow:
        classifier = WaitingClassifier()
        shadow = shadow_stage({"chat": LIVE, "chat-v2": CANDIDATE}, classifier, sample_fraction=1.0, max_in_flight=2)
        for offset in range(5):
            compare(shadow, offset, "you loser")  # returns at once: nothing waits for the candidate
        classifier.release.set()
        while sum(shadow.compared.values()) < 2:
            await asyncio.sleep(0.01)
        await shadow.close(0.1)
        return shadow

    shadow = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert shadow.compared == {("chat-v2", "cand1"): 2}
    assert shadow.skipped == {("chat-v2", "busy"): 3}


def test_the_report_counts_each_source_record_and_candidate_version_once():
    def record(offset: int, live: bool, candidate: bool, version: str = "cand1", key: str = "chat-v2") -> bytes:
        answer = {"policy_id": "x", "policy_version": "v", "category": "harassment", "rule_ids": [],
                  "confidence": None, "stage": None, "model": "keyword", "decided_by": "cheap"}  # fmt: skip
        return orjson.dumps({
            "event_id": f"e{offset}", "source": {"topic": "chat", "partition": 0, "offset": offset},
            "live": {**answer, "policy_id": "chat", "violation": live},
            "candidate": {**answer, "policy_id": key.split("/")[-1], "policy_key": key, "policy_version": version,
                          "violation": candidate},
            "content": f"message {offset}",
        })  # fmt: skip

    report = ShadowReport("chat-v2", max_examples=1)
    for value in (record(0, False, True), record(0, False, True), record(1, False, True), record(2, True, False),
                  record(3, True, True), record(4, False, True, version="cand2"), record(5, False, True, key="kids/x"),
                  b"{not json"):  # fmt: skip
        report.add_bytes(value)
    document = report.as_document()
    assert (document["compared"], document["duplicates"], document["unreadable"]) == (5, 1, 1)
    assert document["flips"] == {"safe_to_violation": 3, "violation_to_safe": 1, "category_changed": 0}
    assert document["candidate_versions"] == {"cand1": 4, "cand2": 1}
    assert [e["source"]["offset"] for e in document["examples"]] == [0, 2]  # one per direction
    assert all("content" not in e for e in document["examples"])
    assert report.as_document(show_content=True)["examples"][0]["content"] == "message 0"
    only = ShadowReport("chat-v2", version="cand2")
    for value in (record(0, False, True), record(4, False, True, version="cand2")):
        only.add_bytes(value)
    assert only.as_document()["compared"] == 1


def test_on_a_served_fleet_candidates_run_on_a_low_priority_twin_elsewhere_on_the_live_classifier():
    # The remote classifier needs httpx: imported where it is tested.
    from consumer.classify.engine import engine_settings, make_remote_classifier
    from consumer.classify.engine.remote.classifier import RemoteClassifier

    store = PolicyStore(REPO / "policies")
    fleet = load_settings(None, {"classifier.kind": "reasoner", "classifier.reasoner": "remote",
                                 "engine.endpoints": [{"url": "http://vllm-0.vllm:8000/v1"}]})  # fmt: skip
    live = make_remote_classifier(engine_settings(fleet.engine, "remote"))  # type: ignore[arg-type]
    twin = shadow_classifier(fleet, live, store)
    assert isinstance(twin, RemoteClassifier) and twin is not live
    assert (live.settings.priority, twin.settings.priority) == ("live", "low")
    keyword = KeywordClassifier()
    assert shadow_classifier(load_settings(None, {}), keyword, store) is keyword


def test_a_candidates_series_show_at_zero_from_the_start_then_count_its_flips():
    reader = InMemoryMetricReader()
    live = KeywordClassifier()

    def points(name: str) -> dict[tuple, int]:
        data = reader.get_metrics_data()
        return {tuple(sorted(point.attributes.items())): point.value
                for resource in data.resource_metrics for scope in resource.scope_metrics
                for metric in scope.metrics if metric.name == name for point in metric.data.data_points}  # fmt: skip

    async def scenario() -> tuple[dict, dict]:
        shadow = Shadow(ShadowSettings(enabled=True, sample_fraction=1.0), live, live,
                        lambda: {"chat": LIVE, "chat-v2": CANDIDATE},
                        {"bootstrap.servers": "127.0.0.1:9", "log_level": 0},
                        MeterProvider(metric_readers=[reader]).get_meter("test"), timeout_s=5, has_reasoner=False)
        await shadow.start()
        before = points("safeguard.shadow.flips")
        compare(shadow, 0, "you loser")
        after = points("safeguard.shadow.flips")
        await shadow.close(0.1)
        return before, after

    before, after = asyncio.run(scenario())
    assert len(before) == 3 * 2 and set(before.values()) == {0}  # each direction, each of its two categories
    key = (("safeguard.candidate", "chat-v2"), ("safeguard.candidate_version", "cand1"),
           ("safeguard.category", "harassment"), ("safeguard.flip", "safe_to_violation"))  # fmt: skip
    assert after[key] == 1 and sum(after.values()) == 1


def test_run_needs_the_shadow_topic_writable_only_when_shadow_runs_are_on():
    on = load_settings(None, {"shadow.enabled": True, "shadow.topic": "candidates"})
    assert TopicNeed("shadow.topic", "candidates", write=True) in run_needs(on).topics
    assert all(need.key != "shadow.topic" for need in run_needs(load_settings(None, {})).topics)
