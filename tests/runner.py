"""Run a Pipeline in a background thread (its own asyncio loop), for in-process tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from consumer.classify import Classifier
from consumer.config import Settings, load_settings
from consumer.pipeline import Pipeline, RunResult
from consumer.policy import load_policies
from consumer.route import Router


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
        **sections,
    }
    overrides = {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}
    return load_settings(None, overrides)


class RunningPipeline:
    def __init__(self, settings: Settings, classifier: Classifier):
        policies = load_policies(settings.policies.directory)
        self.pipeline = Pipeline(settings, classifier, Router(settings.policies, lambda: policies))
        self.result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(self.pipeline.run(install_signal_handlers=False))

    def __enter__(self) -> RunningPipeline:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> RunResult:
        self.pipeline.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "pipeline did not stop"
        assert self.result is not None
        return self.result

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()
