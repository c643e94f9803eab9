"""`policy publish|list|show|retire|promote` and `topics create` against the real broker's policy topic."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from typer.testing import CliRunner

from consumer.cli import app
from consumer.policy import parse_policy
from consumer.policy.topic import PROMOTED_FROM, PUBLISHED_BY
from tests.conftest import REPO
from tests.kafka_helpers import create_topic, read_all, unique

pytestmark = pytest.mark.kafka

GOOD = (REPO / "policies" / "chat-harassment.md").read_text()
SPAM = (REPO / "policies" / "spam-scams.md").read_text()
CANDIDATE = GOOD.replace("id: chat-harassment\n", "id: chat-harassment-v2\nshadow_of: chat-harassment\n").replace(
    "patterns:\n", "patterns:\n  - 'everyone hates you'\n"
)


@pytest.fixture
def policy_topic(kafka) -> str:
    name = unique("policies")
    create_topic(kafka, name, 1, {"cleanup.policy": "compact"})
    return name


def config_file(tmp_path: Path, kafka: str, policy_topic: str | None, **kafka_settings: object) -> Path:
    path = tmp_path / "config.yaml"
    policies = {"topic": policy_topic} if policy_topic else {}
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": kafka, **kafka_settings}, "policies": policies}))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def policy_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def listed(config: Path) -> list[list[str]]:
    result = cli("policy", "list", "--config", str(config))
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["key", "id", "community", "version", "published_at", "published_by", "shadow_of"]
    return [row.split() for row in rows]


def test_publish_refuses_an_invalid_file_with_its_problems_and_publishes_nothing(kafka, tmp_path, policy_topic):
    config = config_file(tmp_path, kafka, policy_topic)
    broken = policy_file(tmp_path, "broken.md", GOOD.replace("## SAFE (0)", "## NOT SAFE"))
    result = cli("policy", "publish", str(broken), "--config", str(config))
    assert result.exit_code == 1
    assert f"{broken}:20: error: missing section `## SAFE`" in result.stderr
    assert "refused: 1 errors; nothing was published" in result.stderr
    assert read_all(kafka, policy_topic, expected=1, timeout=3) == []


def test_publish_list_show_and_retire_read_and_write_the_policy_topic(kafka, tmp_path, policy_topic):
    config = config_file(tmp_path, kafka, policy_topic)
    chat = policy_file(tmp_path, "chat.md", GOOD)
    spam = policy_file(tmp_path, "spam.md", SPAM)
    published = cli("policy", "publish", str(chat), "--config", str(config), "--by", "ana")
    assert published.exit_code == 0, published.output
    chat_version = parse_policy(GOOD.encode()).version
    assert published.stdout.startswith(f"published chat-harassment@{chat_version} to {policy_topic}[0]@0")
    scoped = cli("policy", "publish", str(spam), "--community", "kids-club", "--config", str(config), "--by", "bo")
    assert scoped.exit_code == 0, scoped.output

    rows = listed(config)
    assert len(rows) == 2
    assert rows[0][:4] == ["chat-harassment", "chat-harassment", "-", chat_version]
    assert rows[0][5:] == ["ana", "-"]
    assert rows[1][:3] == ["kids-club/spam-scams", "spam-scams", "kids-club"] and rows[1][5] == "bo"

    shown = cli("policy", "show", "kids-club/spam-scams", "--config", str(config))
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == SPAM.replace("id: spam-scams\n", "id: spam-scams\ncommunity: kids-club\n")
    assert parse_policy(shown.stdout.encode()).version == rows[1][3]  # the text as published: the same version
    assert "published_by: bo" in shown.stderr and f"where: {policy_topic}[0]@1" in shown.stderr

    retired = cli("policy", "retire", "chat-harassment", "--config", str(config))
    assert retired.exit_code == 0, retired.output
    assert [row[0] for row in listed(config)] == ["kids-club/spam-scams"]
    again = cli("policy", "retire", "chat-harassment", "--config", str(config))
    assert again.exit_code == 1 and f"no policy 'chat-harassment' on {policy_topic}" in again.stderr
    missing = cli("policy", "show", "chat-harassment", "--config", str(config))
    assert missing.exit_code == 1

    other = cli("policy", "publish", str(spam), "--community", "other", "--config", str(config))
    assert other.exit_code == 0  # the file has no community of its own: --community scopes it
    scoped_file = policy_file(tmp_path, "scoped.md", shown.stdout)
    conflict = cli("policy", "publish", str(scoped_file), "--community", "other", "--config", str(config))
    assert conflict.exit_code == 1 and "its front matter says community 'kids-club'" in conflict.stderr


def test_promote_makes_the_candidate_live_with_one_record_and_retires_the_candidate(kafka, tmp_path, policy_topic):
    config = config_file(tmp_path, kafka, policy_topic)
    candidate = policy_file(tmp_path, "candidate.md", CANDIDATE)
    assert cli("policy", "publish", str(candidate), "--community", "kids-club", "--config", str(config)).exit_code == 0
    rows = listed(config)
    assert [(row[0], row[6]) for row in rows] == [("kids-club/chat-harassment-v2", "chat-harassment")]

    promoted = cli("policy", "promote", "kids-club/chat-harassment-v2", "--config", str(config), "--by", "lead")
    assert promoted.exit_code == 0, promoted.output
    live_text = CANDIDATE.replace("id: chat-harassment-v2\nshadow_of: chat-harassment\n",
                                  "id: chat-harassment\ncommunity: kids-club\n")  # fmt: skip
    live_version = parse_policy(live_text.encode()).version
    assert f"promoted kids-club/chat-harassment-v2: kids-club/chat-harassment@{live_version}" in promoted.stdout
    rows = listed(config)
    assert [row[:4] for row in rows] == [["kids-club/chat-harassment", "chat-harassment", "kids-club", live_version]]
    assert rows[0][5:] == ["lead", "-"]
    shown = cli("policy", "show", "kids-club/chat-harassment", "--config", str(config))
    assert shown.stdout == live_text

    # On the topic: the candidate, then the promotion's one live record and the candidate's tombstone.
    records = read_all(kafka, policy_topic, expected=3, timeout=30)
    assert [(m.key(), m.value() is None) for m in records] == [
        (b"kids-club/chat-harassment-v2", False), (b"kids-club/chat-harassment", False),
        (b"kids-club/chat-harassment-v2", True),
    ]  # fmt: skip
    assert dict(records[1].headers())[PROMOTED_FROM] == b"kids-club/chat-harassment-v2"
    assert dict(records[1].headers())[PUBLISHED_BY] == b"lead"

    not_candidate = cli("policy", "promote", "kids-club/chat-harassment", "--config", str(config))
    assert not_candidate.exit_code == 1 and "is not a candidate" in not_candidate.stderr
    gone = cli("policy", "promote", "kids-club/chat-harassment-v2", "--config", str(config))
    assert gone.exit_code == 1 and "nothing promoted" in gone.stderr


def test_topics_create_makes_the_policy_topic_compacted_with_one_partition(kafka, tmp_path):
    name = unique("policies")
    config = tmp_path / "config.yaml"
    topic = unique("pt-create")
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka, "input_topics": [topic], "verdict_topic": f"{topic}.verdicts",
                  "dead_letter_topic": f"{topic}.dlq"},
        "policies": {"topic": name},
    }))  # fmt: skip
    result = cli("topics", "create", "--config", str(config), "--partitions", "2")
    assert result.exit_code == 0, result.output
    assert f"{name} (policies): created (1 partitions, replication 1)" in result.stdout
    admin = AdminClient({"bootstrap.servers": kafka})
    described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name)])
    configs = next(iter(described.values())).result(30)
    assert configs["cleanup.policy"].value == "compact"


def test_the_policy_commands_run_the_pre_flight(kafka, tmp_path):
    unset = config_file(tmp_path, kafka, None)
    result = cli("policy", "list", "--config", str(unset))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: policies.topic is not set: `policy list` reads and writes the policy topic it names"
    ]
    absent = unique("policies")
    missing = cli("policy", "list", "--config", str(config_file(tmp_path, kafka, absent)))
    assert missing.exit_code == 2
    assert f"policies.topic: topic {absent!r} does not exist; create it with: safeguard-consumer topics create" \
        in missing.stderr  # fmt: skip
    down = config_file(tmp_path, "127.0.0.1:1", absent, startup_timeout_s=1)
    unreachable = cli("policy", "retire", "x", "--config", str(down))
    assert unreachable.exit_code == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: brokers unreachable")
