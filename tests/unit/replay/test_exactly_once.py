"""Exactly-once cannot be honoured by a replaced sink, and a replay says so instead of running without it."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from consumer.classify.keyword import KeywordClassifier
from consumer.cli import app
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from consumer.sinks.kafka import KafkaSink
from tests.conftest import REPO
from tests.runner import settings_for


def test_a_pipeline_with_exactly_once_refuses_a_sink_factory():
    settings = settings_for("127.0.0.1:9", "group", "chat", REPO / "policies", pipeline={"delivery": "exactly_once"})
    with pytest.raises(ValueError, match="exactly_once needs the transactional sink"):
        Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory), sink_factory=KafkaSink.open)


def test_a_replay_with_exactly_once_exits_2_before_planning_anything(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "live", "input_topics": ["chat"]},
        "policies": {"directory": str(REPO / "policies"), "default": "chat-harassment"},
        "pipeline": {"delivery": "exactly_once"},
    }))  # fmt: skip
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["replay", "--config", str(config), "--topic", "chat", "--from", "earliest",
                                      "--to", "now", "--output", str(output)])  # fmt: skip
    assert result.exit_code == 2
    assert "exactly_once, which a replay cannot honour" in result.output
    assert list(tmp_path.iterdir()) == [config]  # no checkpoint, no output
