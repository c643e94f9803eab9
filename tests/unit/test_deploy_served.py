"""The served shape's deployment files (deploy/k8s/served, compose profile `served`), checked offline.

The same tools as tests/unit/test_deploy.py (Kubernetes API schemas in strict mode, KEDA's
CRD models, the consumer's own config loader), and the agreements that make the shape work:
consumers without a GPU on `engine.kind: remote`, one endpoint per vLLM replica KEDA may run,
vLLM scheduling by priority where the config says it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.classify.engine import RemoteSettings, engine_settings
from tests.unit.test_deploy import COMPOSE, K8S_VERSIONS, ROOT, _leaves, _load, _settings, _tool

SERVED = ROOT / "deploy" / "k8s" / "served"


def _docs() -> list[dict[str, Any]]:
    kustomization = _load(SERVED / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((SERVED / name).read_text())]


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_served_manifests_match_the_api_schemas_and_keda() -> None:
    kv = _tool("kubernetes_validate")
    keda = _tool("cloudcoil.models.keda.v1alpha1")
    for doc in _docs():
        if doc["kind"] == "ScaledObject":
            dumped = keda.ScaledObject.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert set(_leaves(doc)) - set(_leaves(dumped)) == set(), doc["metadata"]["name"]
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} against {version}: {exc.message}")
    listed = set(_load(SERVED / "kustomization.yaml")["resources"]) | {"config.yaml", "kustomization.yaml"}
    assert listed == {p.name for p in SERVED.iterdir()}


def test_consumers_on_cpu_reach_every_replica_keda_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(SERVED / "config.yaml", monkeypatch)
    remote = engine_settings(settings.engine, "remote")
    assert isinstance(remote, RemoteSettings) and settings.classifier.reasoner_place == "remote"

    consumer = _one("Deployment", "safeguard-consumer")["spec"]["template"]["spec"]
    (container,) = consumer["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in consumer
    assert consumer["terminationGracePeriodSeconds"] >= settings.pipeline.shutdown_deadline_s + 20
    env = {e["name"] for e in container["env"]}
    assert {e.api_key_env for e in remote.endpoints if e.api_key_env} <= env

    vllm = _one("StatefulSet", "vllm")
    service = _one("Service", "vllm")
    assert service["spec"]["clusterIP"] == "None" and vllm["spec"]["serviceName"] == "vllm"
    scaler = _one("ScaledObject", "vllm")["spec"]
    assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "vllm"}
    assert [e.url for e in remote.endpoints] == [
        f"http://vllm-{i}.vllm:8000/v1" for i in range(scaler["maxReplicaCount"])
    ]
    assert "vllm:num_requests_waiting" in scaler["triggers"][0]["metadata"]["query"]

    args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--scheduling-policy=priority" in args and all(e.priority_scheduling for e in remote.endpoints)
    assert f"--served-model-name={remote.model}" in args

    lag = _one("ScaledObject", "safeguard-consumer")["spec"]
    assert lag["triggers"][0]["type"] == "kafka"
    assert lag["triggers"][0]["metadata"]["consumerGroup"] == settings.kafka.group_id


def test_compose_served_profile_runs_vllm_and_a_consumer_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _load(COMPOSE)["services"]
    vllm, consumer = services["vllm"], services["consumer-served"]
    assert vllm["profiles"] == consumer["profiles"] == ["served"]
    assert "profiles" not in services["consumer"]  # the default stack is unchanged
    assert "deploy" not in consumer
    mounts = {target: source for source, target, *_ in (v.split(":") for v in consumer["volumes"])}
    settings = _settings(ROOT / mounts["/etc/safeguard/config.yaml"], monkeypatch)
    remote = engine_settings(settings.engine, "remote")
    assert isinstance(remote, RemoteSettings)
    assert [e.url for e in remote.endpoints] == ["http://vllm:8000/v1"]
    assert "--scheduling-policy=priority" in vllm["command"]
    assert settings.kafka.group_id == "safeguard-consumer"


def test_served_config_is_a_file_the_served_kustomization_ships() -> None:
    generator = _load(SERVED / "kustomization.yaml")["configMapGenerator"][0]
    assert generator["files"] == ["config.yaml"] and Path(SERVED / "config.yaml").is_file()
