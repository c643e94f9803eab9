"""A thousand communities, each with its own policy, on one stream routed by `community_id`,
against the real broker: every verdict carries the platform's baseline policy's result and its
own community's policy's (the right id, version and `policy_community`, never another
community's, though all thousand share one id), a community's `baseline_actions` change the
baseline's action for its events only, a community's `offender_thresholds` apply to its
authors only, and no record is lost."""

from __future__ import annotations

import shutil
from collections import Counter

import orjson
import pytest

from bench.communities_bench import community_id, token, write_community_policies
from consumer.classify.keyword import KeywordClassifier
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.conftest import REPO
from tests.kafka_helpers import Collector, create_topics, produce, unique
from tests.runner import settings_for

pytestmark = pytest.mark.kafka

COMMUNITIES = 1000
LENIENT = range(0, COMMUNITIES, 10)  # these communities allow what the baseline calls a scam
STRICT = 7  # this community escalates an author's second violation
OVERRIDES = {n: "baseline_actions:\n  spam-scams:\n    scam: allow\n" for n in LENIENT} | {
    STRICT: "offender_thresholds:\n  - {violations: 2, action: escalate}\n"
}
SCAM = "free nitro at discord-gift.xyz"


def events() -> list[tuple[bytes, dict]]:
    """Three per community, keyed by it (so in order): its own word, the next community's word, a scam."""
    found = []
    for n in range(COMMUNITIES):
        for kind, content in (("own", f"you {token(n)}"), ("other", f"you {token((n + 1) % COMMUNITIES)}"),
                              ("scam", SCAM)):  # fmt: skip
            found.append((community_id(n).encode(), {
                "event_id": f"{community_id(n)}-{kind}", "content": content, "community_id": community_id(n),
                "author_id": f"author-{n}",
            }))  # fmt: skip
    return found


def test_every_verdict_names_its_communitys_policy_beside_the_baseline(kafka, tmp_path):
    policies = tmp_path / "policies"
    write_community_policies(policies, COMMUNITIES, OVERRIDES)
    shutil.copy(REPO / "policies" / "spam-scams.md", policies)  # the baseline: every event, whatever its community
    topic, group = unique("communities"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", partitions=3)
    sent = events()
    produce(kafka, topic, [orjson.dumps(e) for _, e in sent], keys=[k for k, _ in sent])
    store = PolicyStore(policies)
    versions = {key: policy.version for key, policy in store.get().items()}
    assert len(versions) == COMMUNITIES + 1
    settings = settings_for(kafka, group, topic, policies, policies={"default": "spam-scams"})
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        with BackgroundPipeline(Pipeline(settings, KeywordClassifier(), store)) as running:
            messages = outputs.until(len(sent), timeout=180)
            result = running.stop()
        messages = outputs.collect(wait=1.0)
    finally:
        outputs.close()
    assert result.exit_code == 0
    assert {m.topic() for m in messages} == {f"{topic}.verdicts"}  # no dead letter
    verdicts = {v["event_id"]: v for v in (orjson.loads(m.value()) for m in messages)}
    assert len(messages) == len(verdicts) == len(sent)  # every event once: 0 lost

    actions: Counter[tuple[str, str]] = Counter()
    for event_id, verdict in verdicts.items():
        community, kind = event_id.split("-")
        n = int(community[1:])
        baseline, own = verdict["results"]
        assert (baseline["policy_id"], baseline["policy_version"], baseline["policy_community"]) == (
            "spam-scams", versions["spam-scams"], None)  # fmt: skip
        assert (own["policy_id"], own["policy_version"], own["policy_community"]) == (
            "chat-harassment", versions[f"{community}/chat-harassment"], community)  # fmt: skip
        # Only the community's own word is a violation of its policy: never the next community's.
        assert own["violation"] is (kind == "own"), event_id
        assert baseline["violation"] is (kind == "scam"), event_id
        if kind == "scam":
            actions[("lenient" if n in LENIENT else "strict" if n == STRICT else "other", verdict["action"])] += 1
        assert verdict["community_id"] == community
        # Offender counts only where thresholds apply: the strict community's authors.
        assert (verdict["offender_violations"] is not None) is (n == STRICT), event_id
    # The lenient communities' scams are allowed (their baseline_actions), the others' deleted as the
    # baseline says; the strict community's author's second violation escalates.
    assert actions == {("lenient", "allow"): len(LENIENT), ("other", "delete"): COMMUNITIES - len(LENIENT) - 1,
                       ("strict", "escalate"): 1}  # fmt: skip
    assert verdicts[f"{community_id(STRICT)}-scam"]["offender_violations"] == 2
