"""Build an in-process pipeline for tests against the real broker."""

from __future__ import annotations

from pathlib import Path

from consumer.classify import Classifier
from consumer.config import Settings, load_settings
from consumer.pipeline.pipeline import BackgroundPipeline, Pipeline
from consumer.policy import PolicyStore


def settings_for(bootstrap: str, group: str, topic: str, policies_dir: Path, **sections: dict) -> Settings:
    data = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "input_topics": [topic],
            "verdict_topic": f"{topic}.verdicts",
            "dead_letter_topic": f"{topic}.dlq",
            **sections.pop("kafka", {}),
        },
        "policies": {"directory": str(policies_dir), "default": "chat-harassment", **sections.pop("policies", {})},
        "pipeline": {"commit_interval_s": 0.2, "shutdown_deadline_s": 20, **sections.pop("pipeline", {})},
        "telemetry": {"http_port": 0, **sections.pop("telemetry", {})},
        **sections,
    }
    overrides = {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}
    return load_settings(None, overrides)


def running_pipeline(settings: Settings, classifier: Classifier) -> BackgroundPipeline:
    return BackgroundPipeline(Pipeline(settings, classifier, PolicyStore(settings.policies.directory)))
