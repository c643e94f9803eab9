"""deploy/k8s/replay-job.yaml, checked offline: valid for the Kubernetes API (strict), an indexed
Job of workers that all run `replay --run` with options the command has, at a priority below
every default pod, against the served fleet of deploy/k8s/served at low priority."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from consumer.classify.engine import RemoteSettings, engine_settings
from consumer.cli import app
from tests.unit.test_deploy import K8S, K8S_VERSIONS, _settings, _tool

JOB = K8S / "replay-job.yaml"
SERVED_CONFIG = K8S / "served" / "config.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(JOB.read_text(encoding="utf-8"))}


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(_docs()["ConfigMap"]["data"]["config.yaml"])
    return path


def test_replay_job_matches_the_api_schemas() -> None:
    kv = _tool("kubernetes_validate")
    docs = _docs()
    assert set(docs) == {"PriorityClass", "ConfigMap", "Job"}
    for kind, doc in docs.items():
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{kind} against Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_an_indexed_job_of_workers_joining_one_run_at_low_priority() -> None:
    docs = _docs()
    job = docs["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] >= 2  # each worker exits 0 only once the whole run is complete
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] > 0  # a dead worker is replaced
    priority = docs["PriorityClass"]
    assert pod["priorityClassName"] == priority["metadata"]["name"]
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never" and not priority["globalDefault"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "replay" and args[args.index("--priority") + 1] == "low"
    assert "--run" in args and "--output-topic" in args and "--output" not in args  # a run writes to a topic
    # Every option given is one the command has, and every $(VAR) is set in the container's env.
    replay_command = typer.main.get_command(app).commands["replay"]  # type: ignore[attr-defined]
    options = {name for param in replay_command.params for name in param.opts}
    assert {a for a in args[1:] if a.startswith("--")} <= options
    env = {e["name"] for e in container["env"]}
    assert {a[2:-1] for a in args if a.startswith("$(")} <= env
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["volumes"]}
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]


def test_the_replay_config_uses_the_served_fleet_and_drains_within_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(_config(tmp_path), monkeypatch)
    served = _settings(SERVED_CONFIG, monkeypatch)
    assert settings.classifier.reasoner_place == "remote" and settings.pipeline.delivery == "at_least_once"
    remote = engine_settings(settings.engine, "remote")
    assert isinstance(remote, RemoteSettings)
    served_remote = engine_settings(served.engine, "remote")
    assert [e.url for e in remote.endpoints] == [e.url for e in served_remote.endpoints]  # type: ignore[union-attr]
    assert remote.model == served_remote.model and remote.priority == "low"
    assert settings.policies.directory == served.policies.directory
    pod = _docs()["Job"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= settings.pipeline.shutdown_deadline_s + 20
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert {e.api_key_env for e in remote.endpoints if e.api_key_env} <= env
