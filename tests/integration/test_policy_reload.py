"""Hot reload under a running consumer with the real broker: new versions apply, broken edits don't."""

import shutil
import time

import pytest

from consumer.classify.keyword import KeywordClassifier
from tests.conftest import REPO
from tests.kafka_helpers import Collector, create_topics, decoded, event_json, produce, unique, wait_for
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka


def versions(messages) -> set[str]:
    return {r["policy_version"] for v in decoded(messages) for r in v["results"]}


def test_edited_policy_applies_to_later_events_and_a_broken_edit_keeps_the_old_one(kafka, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    topic, group = unique("reload"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, group, topic, policies, policies={"reload_interval_s": 0.2})
    outputs = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    policy_file = policies / "chat-harassment.md"
    original = policy_file.read_text()
    try:
        with running_pipeline(settings, KeywordClassifier()) as running:
            store = running.pipeline.policies
            v1 = store.get()["chat-harassment"].version
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(10)])
            first = list(outputs.until(10, timeout=60))
            assert versions(first) == {v1}
            assert not any(v["violation"] for v in decoded(first))

            policy_file.write_text(original.replace("patterns:\n", "patterns:\n  - 'everyone hates you'\n"))
            wait_for(lambda: store.reloads == 1, timeout=10, message="the reload")
            v2 = store.get()["chat-harassment"].version
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(10, 20)])
            second = outputs.until(20, timeout=60)[10:]
            assert v2 != v1 and versions(second) == {v2}
            assert all(v["violation"] and v["action"] == "delete" for v in decoded(second))

            policy_file.write_text(original.replace("## VIOLATES (1)", "## BROKEN"))
            time.sleep(1.0)  # several reload rounds see the broken file
            produce(kafka, topic, [event_json(i, "everyone hates you") for i in range(20, 30)])
            third = outputs.until(30, timeout=60)[20:]
            assert versions(third) == {v2}  # the last good version stays in force
            assert store.reloads == 1
            result = running.stop()
        assert result.exit_code == 0
    finally:
        outputs.close()
