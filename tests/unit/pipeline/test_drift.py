"""The drift watch's community labels (top N by volume, the rest `other`, bounded over a long
run) and the per-version series the pipeline's metrics export from one counter."""

from __future__ import annotations

from prometheus_client import generate_latest

from consumer import stages
from consumer.pipeline.telemetry import Telemetry
from consumer.pipeline.telemetry.drift import OTHER, CommunityLabels
from consumer.pipeline.telemetry.metrics import prometheus_meter_provider


def feed(labels: CommunityLabels, volumes: dict[str, int], now: float) -> dict[str, str]:
    """Count each community's events at `now`; the label each was counted under last."""
    last = {}
    for community, n in volumes.items():
        for _ in range(n):
            last[community] = labels.count(community, now)
    return last


def test_the_top_communities_by_volume_get_a_label_and_the_rest_count_as_other():
    labels = CommunityLabels(top=2, rank_interval_s=60)
    # Before the first ranking every community is `other`.
    assert feed(labels, {"a": 5, "b": 3, "c": 1}, now=0) == {"a": OTHER, "b": OTHER, "c": OTHER}
    # The first event an interval later ranks the interval's volumes: a (5) and b (3) win.
    assert labels.count("c", now=60) == OTHER
    assert labels.labelled == {"a", "b"}
    assert feed(labels, {"a": 1, "b": 1, "c": 1}, now=61) == {"a": "a", "b": "b", "c": OTHER}
    assert labels.count(None, now=61) == OTHER  # no community: other, and never ranked


def test_an_incumbent_keeps_its_label_on_a_tie_and_loses_it_when_outranked():
    lost: list[set[str]] = []
    labels = CommunityLabels(top=2, rank_interval_s=60, evicted=lost.append)
    feed(labels, {"a": 5, "b": 3}, now=0)
    labels.rank(now=60)
    feed(labels, {"a": 4, "b": 2, "c": 2}, now=61)  # c ties b: b stays
    labels.rank(now=120)
    assert labels.labelled == {"a", "b"} and lost == []
    feed(labels, {"a": 4, "b": 2, "c": 9}, now=121)  # a raid in c
    labels.rank(now=180)
    assert labels.labelled == {"a", "c"} and lost == [{"b"}]
    labels.rank(now=240)  # a quiet interval: nobody keeps a label
    assert labels.labelled == set() and lost == [{"b"}, {"a", "c"}]


def test_no_label_is_given_with_top_0():
    labels = CommunityLabels(top=0, rank_interval_s=1)
    feed(labels, {"a": 10}, now=0)
    assert labels.count("a", now=5) == OTHER and labels.labelled == set()


def scrape(telemetry_registry) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in generate_latest(telemetry_registry).decode().splitlines()
            if line.startswith("safeguard_")}  # fmt: skip


def series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_one_count_per_result_feeds_the_verdicts_and_the_drift_series():
    provider, registry = prometheus_meter_provider()
    telemetry = Telemetry.create("group", provider, registry=registry)
    community = telemetry.communities.count("gaming", now=0)
    for violation, stage in ((True, stages.LEXICAL), (False, stages.LEXICAL), (True, stages.UNDECIDED)):
        action = "delete" if violation else "allow"
        telemetry.verdicts[("chat-harassment", violation, action, "v1", stage, community)] += 1
    telemetry.dead_letters[("unparseable_output", "chat-harassment", "v1", community)] += 2
    telemetry.dead_letters[("invalid_json", "", "", OTHER)] += 1
    lines = scrape(registry)
    verdicts = "safeguard_verdicts_total"
    assert lines[series(verdicts, safeguard_policy_id="chat-harassment", safeguard_violation="true",
                        safeguard_action="delete")] == 2  # fmt: skip
    results = dict(safeguard_policy_id="chat-harassment", safeguard_policy_version="v1", safeguard_community=OTHER)
    name = "safeguard_policy_results_total"
    assert lines[series(name, **results, safeguard_stage=stages.LEXICAL, safeguard_violation="true")] == 1
    assert lines[series(name, **results, safeguard_stage=stages.LEXICAL, safeguard_violation="false")] == 1
    assert lines[series(name, **results, safeguard_stage=stages.UNDECIDED, safeguard_violation="true")] == 1
    letters = "safeguard_policy_dead_letters_total"
    assert lines[series(letters, error_type="unparseable_output", **results)] == 2
    assert lines[series(letters, error_type="invalid_json", safeguard_policy_id="none", safeguard_policy_version="none",
                        safeguard_community=OTHER)] == 1  # fmt: skip
    assert lines[series("safeguard_dead_letters_total", error_type="unparseable_output")] == 2


def test_a_community_that_loses_its_label_leaves_the_drift_series_and_stays_in_the_totals():
    provider, registry = prometheus_meter_provider()
    telemetry = Telemetry.create("group", provider, registry=registry)
    telemetry.communities.top = 1
    telemetry.communities.count("raid", now=0)
    label = telemetry.communities.count("raid", now=60)  # ranked: raid is the top community
    assert label == "raid"
    telemetry.verdicts[("chat-harassment", True, "delete", "v1", stages.LEXICAL, label)] += 3
    telemetry.dead_letters[("timeout", "chat-harassment", "v1", label)] += 1
    assert sum('safeguard_community="raid"' in line for line in scrape(registry)) == 2
    for _ in range(3):
        telemetry.communities.count("calm", now=61)
    telemetry.communities.count("calm", now=120)  # ranked: calm (3) outranks raid (1)
    assert telemetry.communities.labelled == {"calm"}
    lines = scrape(registry)
    assert not any('safeguard_community="raid"' in line for line in lines)
    assert lines[series("safeguard_verdicts_total", safeguard_policy_id="chat-harassment", safeguard_violation="true",
                        safeguard_action="delete")] == 3  # fmt: skip
    assert lines[series("safeguard_dead_letters_total", error_type="timeout")] == 1


def test_a_communitys_own_policy_has_series_of_its_own_only_while_its_community_is_labelled():
    provider, registry = prometheus_meter_provider()
    telemetry = Telemetry.create("group", provider, registry=registry)
    labels = telemetry.communities
    labels.top = 1
    feed(labels, {"gaming": 3, "kids": 1}, now=0)
    labels.rank(now=60)  # gaming is labelled, kids is not
    assert labels.policy_series("gaming/rules", "gaming") == "gaming/rules"
    assert labels.policy_series("kids/rules", "kids") == OTHER  # a thousand such share one series
    assert labels.policy_series("chat-harassment", None) == "chat-harassment"  # the platform's: always
    telemetry.verdicts[("gaming/rules", True, "delete", "v7", stages.LEXICAL, "gaming")] += 4
    telemetry.verdicts[("chat-harassment", True, "delete", "v1", stages.LEXICAL, "gaming")] += 1
    telemetry.tokens[("gaming/rules", "prompt")] += 100
    telemetry.engine_latency.record(0.02, "gaming/rules", 4)

    labels.rank(now=120)  # a quiet interval: gaming loses its label, its own policy's series fold
    lines = scrape(registry)
    verdicts = "safeguard_verdicts_total"
    assert lines[series(verdicts, safeguard_policy_id=OTHER, safeguard_violation="true", safeguard_action="delete")] == 4
    assert not any('"gaming/rules"' in line for line in lines), [line for line in lines if "gaming" in line]
    assert lines[series(verdicts, safeguard_policy_id="chat-harassment", safeguard_violation="true",
                        safeguard_action="delete")] == 1  # fmt: skip
    assert lines[series("safeguard_tokens_total", safeguard_policy_id=OTHER, safeguard_token_kind="prompt")] == 100
    assert lines['safeguard_classify_duration_seconds_count{safeguard_policy_id="other"}'] == 4
