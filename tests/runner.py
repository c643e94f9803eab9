"""Run the consumer for tests against the real broker: in process (a Pipeline) or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from consumer.classify import Classifier
from consumer.config import Settings, load_settings
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore
from tests.kafka_helpers import wait_for

REPO = Path(__file__).resolve().parent.parent


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


def wait_while_running(running: BackgroundPipeline, condition, timeout: float, message: str) -> None:
    """`wait_for`, failing at once with the run's exit code and reason if the pipeline stops first.

    A pipeline that exits on a fatal error (e.g. the schema registry never answering at start-up)
    would otherwise leave the test waiting out its whole timeout with nothing said about why.
    """

    def met() -> bool:
        if running.result is not None:
            raise AssertionError(f"the pipeline stopped while waiting for {message}: {running.result}")
        return condition()

    wait_for(met, timeout=timeout, message=message)


def write_config(path: Path, bootstrap: str, group: str, topic: str, policies_dir: Path, **extra: dict) -> Path:
    """A YAML config for `safeguard-consumer run` in a subprocess (start_consumer)."""
    config = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "input_topics": [topic],
            "verdict_topic": f"{topic}.verdicts",
            "dead_letter_topic": f"{topic}.dlq",
            # A killed member is noticed after the session timeout: keep it at the broker's minimum.
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        },
        "policies": {"directory": str(policies_dir), "default": "chat-harassment"},
        "pipeline": {"commit_interval_s": 0.2, "max_in_flight_events": 200},
        "telemetry": {"http_port": 0},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_consumer(config: Path, log: Path) -> subprocess.Popen:
    """`python -m consumer run` on `config`, its output appended to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
